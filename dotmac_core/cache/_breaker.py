"""Circuit breaker for the cache backend, with one log line per outage.

Closed: calls go through. After `threshold` consecutive failures it opens:
calls are skipped (the cache fails open or raises at once) for `reset_after`
seconds. Then one call probes the backend (half-open); its success closes the
circuit, its failure opens it again.

An outage is logged once, as a warning, when it starts, and once, as info,
when it ends: once the backend has answered for `reset_after` seconds without
a failure. A partly failed cluster (one master down, calls to the others
succeeding) is therefore one outage, not a warning per failure.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger("dotmac_core.cache")

#: What `CircuitBreaker.acquire` allows: skip the backend, call it, or probe it.
SKIP, CALL, PROBE = 0, 1, 2


class CircuitBreaker:
    """Counts consecutive failures and decides whether to try the backend."""

    __slots__ = (
        "_clock",
        "_failures",
        "_healthy_since",
        "_name",
        "_opened_at",
        "_outage_since",
        "_probing",
        "reset_after",
        "threshold",
    )

    def __init__(
        self,
        name: str,
        threshold: int,
        reset_after: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self._name = name
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._outage_since: float | None = None
        self._healthy_since: float | None = None
        self._probing = False

    def acquire(self) -> int:
        """Return `CALL` or `PROBE` if a call may go to the backend now, else `SKIP`."""
        if self._opened_at is None:
            return CALL
        if self._probing or self._clock() - self._opened_at < self.reset_after:
            return SKIP
        self._probing = True  # half-open: this call is the one probe
        return PROBE

    def success(self) -> None:
        """Record a call that reached the backend and got an answer."""
        self._failures = 0
        self._opened_at = None
        self._probing = False
        if self._outage_since is not None:
            now = self._clock()
            if self._healthy_since is None:
                self._healthy_since = now
            elif now - self._healthy_since >= self.reset_after:
                logger.info(
                    "cache backend %r answers again; caching resumed after %.1f s",
                    self._name,
                    self._healthy_since - self._outage_since,
                )
                self._outage_since = self._healthy_since = None

    def failure(self, exc: BaseException) -> None:
        """Record a failed call; open the circuit at the threshold."""
        now = self._clock()
        self._failures += 1
        self._healthy_since = None
        if self._outage_since is None:
            self._outage_since = now
            logger.warning(
                "cache backend %r failed (%s: %s); reads miss and writes are "
                "skipped until it answers again",
                self._name,
                type(exc).__name__,
                exc,
            )
        if self._probing or self._failures >= self.threshold:
            self._opened_at = now
            self._probing = False

    def release(self) -> None:
        """Forget an unfinished probe (it was cancelled), so another call may probe."""
        self._probing = False


class FailOpenCounter:
    """Counts decisions taken without a failed backend (fail open); read `count`.

    `CacheService.fail_opens` counts the cache operations answered as a miss
    or skipped as a no-op because the backend failed or its circuit was open;
    `rate_limit_fail_opens()` counts the calls rate limits let through
    unchecked because Redis failed. A count that grows means the backend is
    sick even though nothing raised: export it to your metrics.
    """

    __slots__ = ("count", "last_reason")

    def __init__(self) -> None:
        #: Decisions taken without the backend so far.
        self.count = 0
        #: Why the latest one was taken (`None` before the first).
        self.last_reason: str | None = None

    def record(self, reason: str) -> None:
        """Count one decision taken without the backend, and why."""
        self.count += 1
        self.last_reason = reason

    def reset(self) -> None:
        """Start counting from zero again."""
        self.count = 0
        self.last_reason = None

    def __repr__(self) -> str:
        return f"<FailOpenCounter count={self.count}>"
