"""Rate limit decisions on Redis: one atomic script, the server's clock, no retries.

Imported only when a limit uses Redis, so redis-py stays an optional extra.

Each decision is one `EVALSHA` of `_SCRIPT` on one key (a sorted set of the
admitted calls, scored by the Redis server's `TIME` in microseconds):

- atomic: the server runs the script alone, so concurrent callers in any
  number of processes never both take the last slot;
- one clock: every process measures the window with the server's clock;
- no double counting: the client is built with command retries off. A
  command that timed out may still have run; sending it again would count the
  call twice (redis-py's default retries would do just that);
- no immortal keys: every write in the script also sets the key's expiry;
- Redis Cluster: one key per decision, so it never spans slots.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from ._ratelimit_store import Decision
from .exceptions import ServiceError, translate_error

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import CacheConfig

logger = logging.getLogger("dotmac_core.ratelimit")

# KEYS[1]: the limit's sorted set; ARGV: limit, window (µs), key expiry (ms).
# Returns {admitted (0/1), remaining, retry after (µs)}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  -- Unique member: at one instant the count grows with each admission.
  redis.call('ZADD', KEYS[1], now, t[1] .. '.' .. t[2] .. '.' .. count)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, limit - count - 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, 0, tonumber(oldest[2]) + window - now}
"""
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis' script id


class Breaker:
    """Skips Redis for `reset` seconds once `threshold` calls in a row failed.

    While Redis is down, a limit then decides in microseconds instead of
    waiting for a connect timeout on every call. After `reset` seconds the next
    call tries Redis again; one more failure opens the circuit again.

    It also tells one outage from the next, as the cache's breaker does: an
    outage starts with a failure and ends once Redis has answered for `reset`
    seconds without one. A cluster with one master down (calls to the others
    succeeding in between) is one outage, not an outage per failed call.
    """

    def __init__(
        self, threshold: int, reset: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = threshold
        self._reset = reset
        self._clock = clock
        self._failures = 0
        self._opened_at = -math.inf
        self._outage_since: float | None = None
        self._healthy_since: float | None = None

    def is_open(self) -> bool:
        """Whether calls should skip Redis now."""
        return (
            self._failures >= self._threshold
            and self._clock() < self._opened_at + self._reset
        )

    def failed(self) -> bool:
        """Count a failure; return whether it starts an outage."""
        now = self._clock()
        self._failures += 1
        self._healthy_since = None
        if self._failures >= self._threshold:
            self._opened_at = now
        if self._outage_since is None:
            self._outage_since = now
            return True
        return False

    def succeeded(self) -> float | None:
        """Count a success; return the outage's length in seconds if it ends now."""
        self._failures = 0
        if self._outage_since is None:
            return None
        now = self._clock()
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since < self._reset:
            return None
        lasted = self._healthy_since - self._outage_since
        self._outage_since = self._healthy_since = None
        return lasted


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """What a Redis store connects with; equal settings share one store."""

    url: str = field(repr=False)  # may hold a password
    cluster: bool
    socket_timeout: float
    socket_connect_timeout: float
    max_connections: int
    breaker_threshold: int
    breaker_reset: float

    @classmethod
    def from_config(cls, config: CacheConfig) -> RedisSettings:
        """Take the connection settings of a `CacheConfig`."""
        return cls(
            url=config.redis_url(),
            cluster=config.backend == "redis-cluster",
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.socket_connect_timeout,
            max_connections=config.max_connections,
            breaker_threshold=config.circuit_breaker_threshold,
            breaker_reset=config.circuit_breaker_reset,
        )

    @property
    def address(self) -> str:
        """`host:port` for log lines: the URL without credentials."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 6379}"


def _client(settings: RedisSettings) -> Redis | RedisCluster:
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "max_connections": settings.max_connections,
        # Never resend: the script may have run before the error (see above).
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.cluster:
        # As the cache's cluster client: while a failed master's replica takes
        # over, limits on the other masters' slots keep being checked.
        return RedisCluster.from_url(
            settings.url, require_full_coverage=False, **options
        )
    return Redis.from_url(settings.url, **options)


@dataclass(slots=True)
class _LoopClient:
    """A client and its in-flight bound, for one event loop."""

    client: Redis | RedisCluster
    #: At most `max_connections` commands in flight. redis-py's pools raise
    #: `MaxConnectionsError` instead of waiting when they run dry, which under a
    #: burst would look like an outage and let calls through.
    slots: asyncio.Semaphore

    async def ensure_ready(self) -> None:
        """Load the cluster map if it is missing or stale (a no-op on Redis).

        redis-py 8.1's async RedisCluster fails commands sent concurrently
        while it (re)initialises: connections are closed mid-handshake. Its
        `initialize()` takes a lock and returns at once when the map is loaded,
        so calling it before each command is cheap and serialises the reload.
        """
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()


class RedisWindowStore:
    """Sliding-window log per key in Redis, shared by every process using it.

    A client is made lazily per event loop (a redis-py client is bound to the
    loop it first ran in) and closed by `close()`.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _LoopClient
        ] = weakref.WeakKeyDictionary()
        self._breaker = Breaker(settings.breaker_threshold, settings.breaker_reset)

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Admit and count one call for `key` if fewer than `limit` ran in `window`.

        Raises:
            ServiceError: Redis failed or is skipped while its circuit is open.
        """
        window_us = max(1, round(window * 1_000_000))
        args = (limit, window_us, max(1, math.ceil(window_us / 1000)))
        self._skip_if_open()
        loop_client = self._loop_client()
        async with loop_client.slots:
            # Checked again: the circuit may have opened while this call queued.
            self._skip_if_open()
            client = loop_client.client
            try:
                await loop_client.ensure_ready()
                try:
                    reply = await client.evalsha(_SCRIPT_SHA, 1, key, *args)
                except NoScriptError:
                    # First use on this server: EVAL runs the script and caches it.
                    reply = await client.eval(_SCRIPT, 1, key, *args)
            except Exception as exc:
                # Any failure on the Redis path, a redis-py bug included, is the
                # backend failing: the limit's fail_open decides what happens.
                raise self._failure(exc) from exc
        lasted = self._breaker.succeeded()
        if lasted is not None:
            logger.info(
                "rate limiting: Redis at %s answers again; limits checked again "
                "after %.1f s",
                self._settings.address,
                lasted,
            )
        admitted, remaining, retry_after_us = reply
        return Decision(bool(admitted), int(remaining), int(retry_after_us) / 1e6)

    async def close(self) -> None:
        """Close this event loop's client, if one was made."""
        loop_client = self._clients.pop(asyncio.get_running_loop(), None)
        if loop_client is not None:
            await loop_client.client.aclose()

    def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        loop_client = self._clients.get(loop)
        if loop_client is None:
            loop_client = self._clients[loop] = _LoopClient(
                _client(self._settings),
                asyncio.Semaphore(self._settings.max_connections),
            )
        return loop_client

    def _skip_if_open(self) -> None:
        if self._breaker.is_open():
            msg = f"Redis at {self._settings.address} is unavailable (circuit open)"
            error = ServiceError(msg)
            error.transient = True
            raise error

    def _failure(self, exc: BaseException) -> ServiceError:
        if self._breaker.failed():
            logger.warning(
                "rate limiting: Redis at %s failed (%s); limits with "
                "fail_open=True let calls through, the others raise ServiceError",
                self._settings.address,
                type(exc).__name__,
            )
        error = translate_error(exc)
        if not isinstance(error, ServiceError):
            # Not a redis-py error: an unencodable key, a socket error, a bug.
            kind = type(exc).__name__
            error = ServiceError(f"rate limit check on Redis failed ({kind})")
            error.transient = isinstance(exc, OSError)
        return error


_STORES: dict[RedisSettings, RedisWindowStore] = {}


def store_for(config: CacheConfig) -> RedisWindowStore:
    """Return the store for `config`'s connection settings, shared by equal ones."""
    settings = RedisSettings.from_config(config)
    store = _STORES.get(settings)
    if store is None:
        store = _STORES[settings] = RedisWindowStore(settings)
    return store


async def close_all() -> None:
    """Close the clients every store made in the running event loop."""
    for store in list(_STORES.values()):
        await store.close()
