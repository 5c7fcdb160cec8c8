"""How the cache reads and writes: guarded backend calls, envelopes, flights.

`Engine` is the machinery under `CacheService` (which keeps the public API
and its checks). It runs each backend call under the circuit breaker, the
backend's deadline and the failure policy; wraps values in envelopes stamped
with their keyspace's generation tokens; and reads through on a miss with
single flight (one computation per key in the process) and, if asked, a lock
in the backend (one per key across processes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from ._breaker import PROBE, SKIP, CircuitBreaker, FailOpenCounter
from .backends import CacheUnavailableError
from .codec import DecodeError, encode, header, pack, unpack

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from ..config import CacheConfig
    from ._keys import Keyspace
    from .backends import CacheBackend
    from .codec import ValueCodec

T = TypeVar("T")

logger = logging.getLogger("dotmac_core.cache")

#: Returned by a guarded call that did not reach the backend (fail open).
FAILED: Any = object()
#: Given to single-flight followers when the leader was cancelled: try again.
_RETRY: Any = object()
#: Seconds a cleanup (lock release) may take when it runs shielded.
_CLEANUP_SECONDS = 1.0


def new_token() -> bytes:
    """Return a fresh random token (generations, lock holders)."""
    return os.urandom(8).hex().encode()


def decode(payload: bytes | None, codec: ValueCodec, default: Any) -> Any:
    """Decode `payload`, or return `default` for a miss or an undecodable value."""
    if payload is None:
        return default
    try:
        return codec.decode(payload)
    except DecodeError as exc:
        logger.debug("cache entry does not decode (treated as a miss): %s", exc)
        return default


#: Header of entries outside any namespace or tenant (no generation tokens).
_PLAIN_HEAD = header(b"")


def head_for(tokens: Sequence[bytes | None] | None) -> bytes | None:
    """The envelope header valid under `tokens`; `None` if nothing can be valid."""
    if not tokens:
        return None if tokens is None else _PLAIN_HEAD
    if None in tokens:
        return None
    return header(b",".join(cast("Sequence[bytes]", tokens)))


class _Flight:
    """One in-process computation of a missing entry that others may join."""

    __slots__ = ("future", "landed", "stale")

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future
        #: Set when the key is invalidated meanwhile: the result is not stored.
        self.stale = False
        #: The engine's read ticket when it finished: only reads that began
        #: before then may join it (see `Engine.parked`).
        self.landed: int | None = None

    def retries(self) -> bool:
        """Whether the (finished) computation was cancelled: callers try again."""
        return self.future.exception() is None and self.future.result() is _RETRY


_FlightKey = tuple[str, tuple[bytes | None, ...] | None]


class Engine:
    """Reads, writes and read-through over one backend, under one breaker."""

    def __init__(self, backend: CacheBackend, config: CacheConfig) -> None:
        self.backend = backend
        self.fail_open = config.fail_open
        self.ttl_default = config.ttl_default
        self.breaker = CircuitBreaker(
            backend.name,
            config.circuit_breaker_threshold,
            config.circuit_breaker_reset,
        )
        self.deadline = backend.timeout
        #: Operations answered without the backend (see `CacheService.fail_opens`).
        self.fail_opens = FailOpenCounter()
        self.flights: dict[_FlightKey, _Flight] = {}
        #: Callers of `load` whose read of a key is on its way, by full key.
        self.reading: dict[str, int] = {}
        #: Finished flights kept for those readers: their read may predate
        #: the store, and they join the outcome instead of computing again.
        #: A read that began after the flight finished never joins it.
        self.parked: dict[str, set[_FlightKey]] = {}
        #: Numbers the reads of `load`, in the order they begin.
        self.tickets = 0

    # --- guarded backend calls ---------------------------------------------------

    async def call(
        self,
        fallback: T,
        op: Callable[..., Awaitable[T]],
        *args: Any,
        bounded: bool = True,
    ) -> T:
        """Run one backend operation under the breaker, deadline and policy.

        Returns `fallback` when the backend is skipped or fails and the cache
        fails open; raises `CacheUnavailableError` when it does not.
        """
        mode = self.breaker.acquire()
        if mode == SKIP:
            # Still a point where other tasks run: a loop of calls answered
            # without Redis would otherwise hold the event loop to itself.
            await asyncio.sleep(0)
            return self._unavailable(fallback, None)
        try:
            if self.deadline is None or not bounded:
                result = await op(*args)
            else:
                async with asyncio.timeout(self.deadline):
                    result = await op(*args)
        except (CacheUnavailableError, TimeoutError) as exc:
            self.breaker.failure(exc)
            return self._unavailable(fallback, exc)
        except BaseException:
            if mode == PROBE:
                self.breaker.release()
            raise
        self.breaker.success()
        return result

    def _unavailable(self, fallback: T, exc: BaseException | None) -> T:
        if self.fail_open:
            # The first failure of an outage is a warning (the breaker's);
            # each decision is counted, and logged at debug level.
            reason = "circuit open" if exc is None else f"{type(exc).__name__}: {exc}"
            self.fail_opens.record(reason)
            logger.debug(
                "cache backend %r unavailable (%s); failing open (%d so far)",
                self.backend.name,
                reason,
                self.fail_opens.count,
            )
            return fallback
        if isinstance(exc, CacheUnavailableError):
            raise exc
        name = self.backend.name
        reason = "timed out" if exc is not None else "is skipped (circuit open)"
        msg = f"cache backend {name!r} {reason}"
        raise CacheUnavailableError(msg, details={"backend": name}) from exc

    # --- reading -------------------------------------------------------------------

    async def fetch(
        self, space: Keyspace, keys: Sequence[str]
    ) -> tuple[list[bytes | None], list[bytes | None] | None]:
        """Read entries and their keyspace's generation tokens in one round trip.

        Returns:
            The raw entries, and the tokens (`None` for an unset generation),
            or `None` instead of the tokens when the backend could not be read.
        """
        count = len(space.generations)
        if count == 0 and len(keys) == 1:
            raw = await self.call(FAILED, self.backend.get, keys[0])
            if raw is FAILED:
                return [None], None
            return [raw], []
        values = await self.call(
            FAILED, self.backend.get_many, [*space.generations, *keys]
        )
        if values is FAILED:
            return [None] * len(keys), None
        return values[count:], values[:count]

    async def payloads(
        self, space: Keyspace, keys: Sequence[str]
    ) -> list[bytes | None]:
        """Return the current payload of each user key (`None`: a miss)."""
        raws, tokens = await self.fetch(space, [space.key(k) for k in keys])
        head = head_for(tokens)
        if head is None:
            return [None] * len(keys)
        return [None if raw is None else unpack(raw, head) for raw in raws]

    # --- writing -------------------------------------------------------------------

    def expiry(self, ttl: float | None, jitter: float) -> float:
        """Seconds to keep an entry: `ttl` (or the default), shortened by jitter."""
        seconds = float(self.ttl_default if ttl is None else ttl)
        if jitter:
            seconds *= 1 - jitter * random.random()  # noqa: S311 - spreads expiries
        return seconds

    async def settle(
        self, space: Keyspace, tokens: list[bytes | None] | None
    ) -> bytes | None:
        """Create missing generations; return the header to write entries with.

        Returns `None` when the backend cannot be reached (nothing to write).
        """
        if tokens is None:
            return None
        settled = list(tokens)
        for index, token in enumerate(tokens):
            if token is not None:
                continue
            generation = space.generations[index]
            fresh = new_token()
            added = await self.call(FAILED, self.backend.add, generation, fresh, None)
            if added is FAILED:
                return None
            if not added:  # another writer created it first: use theirs
                theirs = await self.call(FAILED, self.backend.get, generation)
                if theirs is FAILED or theirs is None:
                    return None
                fresh = theirs
            settled[index] = fresh
        return head_for(settled)

    async def store(
        self,
        head: bytes | None,
        entries: Sequence[tuple[str, bytes]],
        ttl: float | None,
        jitter: float,
    ) -> None:
        """Write `(full key, payload)` entries under `head` (skipped if `None`)."""
        if head is None or not entries:
            return
        if len(entries) == 1:
            full, payload = entries[0]
            expiry = self.expiry(ttl, jitter)
            await self.call(None, self.backend.set, full, pack(head, payload), expiry)
            return
        items = [
            (full, pack(head, payload), self.expiry(ttl, jitter))
            for full, payload in entries
        ]
        await self.call(None, self.backend.set_many, items)

    async def write(
        self,
        space: Keyspace,
        mapping: Mapping[str, Any],
        ttl: float | None,
        jitter: float,
    ) -> None:
        """Encode and store every `user key: value` of `mapping` in `space`."""
        entries = [(space.key(k), encode(v)) for k, v in mapping.items()]
        if space.generations:
            _, tokens = await self.fetch(space, [])
            head = await self.settle(space, tokens)
        else:
            head = _PLAIN_HEAD
        await self.store(head, entries, ttl, jitter)

    # --- invalidating -------------------------------------------------------------

    async def invalidate(self, keys: Sequence[str], generations: Sequence[str]) -> None:
        """Delete full `keys` and renew `generations`.

        A computation of a deleted key running in this process is marked
        stale, so its result (read before the delete) is not stored.
        """
        if keys:
            doomed = set(keys)
            for flight_key, flight in list(self.flights.items()):
                if flight_key[0] in doomed:
                    flight.stale = True
                    del self.flights[flight_key]
            await self.call(None, self.backend.delete_many, list(keys))
        for generation in generations:
            await self.call(None, self.backend.set, generation, new_token(), None)

    async def clear(self, prefix: str) -> None:
        """Remove every key under `prefix`; computations in flight are not stored."""
        for flight in self.flights.values():
            flight.stale = True
        self.flights.clear()
        await self.call(None, self.backend.clear, prefix, bounded=False)

    # --- read-through ---------------------------------------------------------------

    async def load(
        self,
        space: Keyspace,
        key: str,
        codec: ValueCodec,
        factory: Callable[[], Awaitable[T]],
        ttl: float | None,
        jitter: float,
        lock_timeout: float | None,
    ) -> T:
        """Read through: a hit decoded by `codec`, or one coalesced `factory()`."""
        full = space.key(key)
        self.reading[full] = self.reading.get(full, 0) + 1
        self.tickets += 1
        ticket = self.tickets
        try:
            raws, tokens = await self.fetch(space, [full])
            raw, head = raws[0], head_for(tokens)
            if raw is not None and head is not None:
                value = decode(unpack(raw, head), codec, FAILED)
                if value is not FAILED:
                    return cast("T", value)
            flight_key: _FlightKey = (full, None if tokens is None else tuple(tokens))
            flight = self.flights.get(flight_key)
            landed = None if flight is None else flight.landed
            if landed is not None and landed < ticket:
                flight = None  # finished before this read began: a new miss
        finally:
            self._read(full)
        while flight is not None:
            outcome = await asyncio.shield(flight.future)
            if outcome is _RETRY:
                flight = self.flights.get(flight_key)
                continue
            value = decode(outcome, codec, FAILED)
            if value is FAILED:  # it does not round-trip: no point in caching
                return await factory()
            return cast("T", value)
        flight = _Flight(asyncio.get_running_loop().create_future())
        self.flights[flight_key] = flight
        try:
            result, payload = await self._lead(
                space,
                key,
                full,
                tokens,
                codec,
                factory,
                flight,
                ttl,
                jitter,
                lock_timeout,
            )
        except BaseException as exc:
            if isinstance(exc, Exception):
                flight.future.set_exception(exc)
                flight.future.exception()  # retrieved: no "never retrieved" log
            else:
                flight.future.set_result(_RETRY)  # cancelled: a follower takes over
            raise
        else:
            flight.future.set_result(payload)
        finally:
            self._land(flight_key, flight)
        return result

    def _land(self, flight_key: _FlightKey, flight: _Flight) -> None:
        """Retire a finished flight, or park it while reads of its key are out."""
        if self.flights.get(flight_key) is not flight:
            return  # invalidated meanwhile
        full = flight_key[0]
        if self.reading.get(full) and not flight.retries():
            flight.landed = self.tickets
            self.parked.setdefault(full, set()).add(flight_key)
        else:
            del self.flights[flight_key]

    def _read(self, full: str) -> None:
        """A caller's read of `full` is back; the last one retires parked flights."""
        left = self.reading[full] - 1
        if left:
            self.reading[full] = left
            return
        del self.reading[full]
        for flight_key in self.parked.pop(full, ()):
            flight = self.flights.get(flight_key)
            if flight is not None and flight.future.done():
                del self.flights[flight_key]

    async def _lead(
        self,
        space: Keyspace,
        key: str,
        full: str,
        tokens: list[bytes | None] | None,
        codec: ValueCodec,
        factory: Callable[[], Awaitable[T]],
        flight: _Flight,
        ttl: float | None,
        jitter: float,
        lock_timeout: float | None,
    ) -> tuple[T, bytes]:
        # Generations are settled before computing: a namespace invalidated
        # while the factory runs then makes this entry a miss, never stale.
        head = await self.settle(space, tokens)
        lock_token = None
        if lock_timeout is not None and head is not None:
            found, lock_token = await self._lock_or_wait(
                space, key, full, head, lock_timeout
            )
            if found is not None:
                value = decode(found, codec, FAILED)
                if value is not FAILED:
                    return cast("T", value), found
        try:
            result = await factory()
            payload = encode(result)
            if not flight.stale:
                await self.store(head, [(full, payload)], ttl, jitter)
        finally:
            if lock_token is not None:
                # Shielded: a cancelled holder must still release its lock.
                with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
                    await self.call(
                        False,
                        self.backend.delete_if_equal,
                        space.lock_key(key),
                        lock_token,
                    )
        return result, payload

    async def _lock_or_wait(
        self, space: Keyspace, key: str, full: str, head: bytes, wait: float
    ) -> tuple[bytes | None, bytes | None]:
        """Take the cross-process lock for `key`, or wait for its holder's value.

        Returns:
            `(payload, None)` when another process stored the value meanwhile,
            `(None, token)` when this caller holds the lock, and `(None, None)`
            when it should compute without the lock (backend down, or `wait`
            seconds ran out).
        """
        lock_key = space.lock_key(key)
        token = new_token()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.005
        while True:
            taken = await self.call(FAILED, self.backend.add, lock_key, token, wait)
            if taken is FAILED:
                return None, None
            # Read after trying the lock: a holder that finished just before
            # has stored the value, and it must not be computed twice.
            raw = await self.call(None, self.backend.get, full)
            payload = None if raw is None else unpack(raw, head)
            if payload is not None:
                if taken:
                    await self.call(
                        False, self.backend.delete_if_equal, lock_key, token
                    )
                return payload, None
            if taken:
                return None, token
            if loop.time() >= deadline:
                return None, None
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311
            delay = min(delay * 2, 0.1)
