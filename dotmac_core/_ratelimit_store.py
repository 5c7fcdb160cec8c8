"""The seam of rate limiting: a store that decides one call, and the local store."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one call: admitted or not, what is left, when to retry."""

    allowed: bool
    #: Calls still admitted in the current window after this one.
    remaining: int
    #: Seconds until a call would be admitted again (0 when this one was).
    retry_after: float


class WindowStore(Protocol):
    """Counts calls per key in a sliding window and admits at most `limit`."""

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Admit and count one call for `key` if fewer than `limit` ran in `window`.

        Raises:
            ServiceError: the store could not decide (its server is down).
        """
        ...


#: Seconds between sweeps that forget keys with no call in their window.
_SWEEP_INTERVAL = 10.0


@dataclass(slots=True)
class _Log:
    window: float
    #: Admission times, oldest first.
    times: deque[float]


class LocalWindowStore:
    """A sliding-window log per key, in this process.

    Exact: at most `limit` calls are admitted in any `window`-long interval.
    It keeps one timestamp per admitted call still in its window, so memory
    grows with `limit` per active key; idle keys are forgotten. The decision
    takes a lock and never awaits, so it is atomic across tasks and threads.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        self._next_sweep = -math.inf

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Admit and count one call for `key` if fewer than `limit` ran in `window`."""
        return self.hit_now(key, limit, window)

    def hit_now(self, key: str, limit: int, window: float) -> Decision:
        """The synchronous decision behind `hit`."""
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            log = self._logs.get(key)
            if log is None:
                log = self._logs[key] = _Log(window, deque())
            times = log.times
            # A call admitted at t counts until t + window, exclusive.
            while times and times[0] <= now - window:
                times.popleft()
            if len(times) < limit:
                times.append(now)
                return Decision(True, limit - len(times), 0.0)
            return Decision(False, 0, times[0] + window - now)

    def clear(self) -> None:
        """Forget every key's calls (for tests)."""
        with self._lock:
            self._logs.clear()

    def __len__(self) -> int:
        return len(self._logs)

    def _sweep(self, now: float) -> None:
        idle = [
            key
            for key, log in self._logs.items()
            if not log.times or log.times[-1] <= now - log.window
        ]
        for key in idle:
            del self._logs[key]
        self._next_sweep = now + _SWEEP_INTERVAL


#: The process's local store: limits with the same key share a budget.
LOCAL_STORE = LocalWindowStore()
