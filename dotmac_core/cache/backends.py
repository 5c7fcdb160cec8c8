"""Byte stores under the cache: one small protocol, three implementations.

`CacheService` speaks only `CacheBackend`: bytes in, bytes out, TTLs in
seconds. `MemoryBackend` keeps entries in the process (TTL and an LRU bound);
`RedisBackend` and `RedisClusterBackend` use redis-py's asyncio clients. The
Redis backends turn every failure of the server or the network into
`CacheUnavailableError`; the service decides what that means (fail open or
raise) and runs the circuit breaker.

Redis clients are set up for a cache that must stay cheap when Redis is sick:
short socket and connect timeouts from `CacheConfig`, no client retries
except one immediate retry on a fresh connection after a dropped one (a pooled
connection that died while idle), and one pool of `max_connections` that a
burst waits for (briefly) instead of failing. redis-py picks the hiredis
parser when `hiredis` is installed (the `redis` extra installs it).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from ..config import CacheConfig
from ..exceptions import ServiceError
from ..guards import require_cache

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = [
    "CacheBackend",
    "CacheUnavailableError",
    "MemoryBackend",
    "RedisBackend",
    "RedisClusterBackend",
]


class CacheUnavailableError(ServiceError):
    """The cache server cannot be reached or failed; raised when `fail_open=False`."""

    default_code = "cache_unavailable"
    http_status = 503
    transient = True


@runtime_checkable
class CacheBackend(Protocol):
    """What `CacheService` needs from a store: a few byte operations.

    Keys are complete (prefixes applied); values are opaque bytes; a TTL is in
    seconds, `None` meaning no expiry. Failures of the store raise
    `CacheUnavailableError`; nothing else is caught by the service.
    """

    @property
    def name(self) -> str:
        """Short name: `memory`, `redis` or `redis-cluster`."""
        ...

    @property
    def timeout(self) -> float | None:
        """Deadline the service puts on each call, in seconds.

        `None` when every call is bounded already: in-process stores, or a
        client whose socket timeouts bound each call.
        """
        ...

    async def get(self, key: str) -> bytes | None:
        """Return the value of `key`, or `None`."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of `keys`, in order, `None` where absent."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store `value` under `key`, replacing any value."""
        ...

    async def set_many(self, items: Sequence[tuple[str, bytes, float | None]]) -> None:
        """Store several `(key, value, ttl)` entries."""
        ...

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store `value` only if `key` is absent; return whether it was stored."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove `keys`; absent keys are ignored."""
        ...

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Remove `key` only while it holds `value` (atomically); return whether."""
        ...

    async def clear(self, prefix: str) -> None:
        """Remove every key that starts with `prefix`."""
        ...

    async def aclose(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...


def _px(ttl: float) -> int:
    """Milliseconds for Redis `PX`, at least 1."""
    return max(1, int(ttl * 1000))


class MemoryBackend:
    """In-process store: entries expire after their TTL; the LRU bound evicts.

    Args:
        max_entries: Entries kept before the least recently used is evicted.
        clock: Monotonic seconds; tests pass a fake to move time.
    """

    name = "memory"
    timeout = None

    def __init__(
        self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._data)

    def _lookup(self, key: str, now: float) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[0]

    def _store(self, key: str, value: bytes, ttl: float | None, now: float) -> None:
        self._data[key] = (value, float("inf") if ttl is None else now + ttl)
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        """Return the value of `key`, or `None`."""
        return self._lookup(key, self._clock())

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of `keys`, in order, `None` where absent."""
        now = self._clock()
        return [self._lookup(key, now) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store `value` under `key`, replacing any value."""
        self._store(key, value, ttl, self._clock())

    async def set_many(self, items: Sequence[tuple[str, bytes, float | None]]) -> None:
        """Store several `(key, value, ttl)` entries."""
        now = self._clock()
        for key, value, ttl in items:
            self._store(key, value, ttl, now)

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store `value` only if `key` is absent; return whether it was stored."""
        now = self._clock()
        if self._lookup(key, now) is not None:
            return False
        self._store(key, value, ttl, now)
        return True

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove `keys`; absent keys are ignored."""
        for key in keys:
            self._data.pop(key, None)

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Remove `key` only while it holds `value`; return whether it did."""
        if self._lookup(key, self._clock()) != value:
            return False
        del self._data[key]
        return True

    async def clear(self, prefix: str) -> None:
        """Remove every key that starts with `prefix`."""
        for key in [k for k in self._data if k.startswith(prefix)]:
            del self._data[key]

    async def aclose(self) -> None:
        """Drop every entry."""
        self._data.clear()


#: KEYS[1] = lock key, ARGV[1] = the holder's token: delete only our own lock.
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def _glob_escape(prefix: str) -> str:
    """Escape Redis glob characters so SCAN MATCH sees a literal prefix."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


#: Exceptions that mean "the backend failed": any the Redis client raises.
#: Its own errors, the network's, and its bugs alike: redis-py's asyncio
#: connection has raised `AttributeError` ("'NoneType' object has no
#: attribute 'writelines'") or `TypeError` for a command sent on a connection
#: closed under it (seen with 5.x and 6.0 during cluster failovers;
#: redis/redis-py#4287 on Python 3.12 and later). Whatever the client raises,
#: the cache fails open (or raises `CacheUnavailableError`) and the reason
#: names the exception; `RedisClusterException` (not a `RedisError` since
#: redis-py 7) is covered too.
_FAILURES: tuple[type[BaseException], ...] = (Exception,)


def _answers() -> tuple[
    tuple[type[BaseException], ...], tuple[type[BaseException], ...]
]:
    """A server's error replies, and those of them that concern the cluster."""
    from redis.exceptions import ClusterError, ResponseError

    return (ResponseError,), (ClusterError,)


def _connection_options(config: CacheConfig) -> dict[str, Any]:
    """redis-py connection settings of the standalone client."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return {
        "max_connections": config.max_connections,
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.socket_connect_timeout,
        # One immediate retry, on a dropped connection only: it replaces a
        # pooled connection the server closed while idle. Timeouts are not
        # retried, so a hung server costs one socket_timeout, not eleven.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        # Some redis-py releases (5.x) retry only the errors named here,
        # whatever the Retry supports; naming them costs nothing on others.
        "retry_on_error": [RedisConnectionError],
    }


class _Slots:
    """At most `size` operations at once; a caller waits `wait` seconds at most.

    Each Redis operation holds a slot while it runs, so the connection pool
    never runs dry (redis-py would raise at once and the cache would miss
    under load): a burst waits for a slot instead. The wait is bounded, so
    when a hung server holds every slot, callers queued behind it fail after
    `wait` seconds instead of taking turns at timing out. Cheaper per call
    than redis-py's `BlockingConnectionPool` (about 15 us less under load).
    """

    __slots__ = ("_semaphore", "_wait")

    def __init__(self, size: int, wait: float) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self._wait = wait

    async def __aenter__(self) -> None:
        if self._semaphore.locked():
            async with asyncio.timeout(self._wait):
                await self._semaphore.acquire()
        else:
            await self._semaphore.acquire()  # free: returns at once

    async def __aexit__(self, *exc_info: object) -> None:
        self._semaphore.release()


class _RedisCommon:
    """Operations that read the same on a server and on a cluster."""

    name: str
    timeout: float | None
    _client: Redis | RedisCluster

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self._failures = _FAILURES
        self._release = self._client.register_script(_RELEASE_SCRIPT)
        self._slots = _Slots(config.max_connections, config.socket_connect_timeout)
        #: Whether the client must be set up (alone) before its first command.
        self._cold = False

    async def _warm(self) -> Redis | RedisCluster:
        """Set the client up before its first command (the cluster client does)."""
        raise NotImplementedError

    def _unavailable(self, exc: BaseException) -> CacheUnavailableError:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return CacheUnavailableError(
            f"cache backend {self.name!r} failed: {reason}",
            details={"backend": self.name},
        )

    async def get(self, key: str) -> bytes | None:
        """Return the value of `key`, or `None`."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                return cast("bytes | None", await client.get(key))
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store `value` under `key` (`SET ... PX`)."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                await client.set(key, value, px=None if ttl is None else _px(ttl))
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def set_many(self, items: Sequence[tuple[str, bytes, float | None]]) -> None:
        """Store several entries in one pipeline (per node on a cluster)."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                pipe = client.pipeline(transaction=False)
                for key, value, ttl in items:
                    pipe.set(key, value, px=None if ttl is None else _px(ttl))
                await pipe.execute()
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store `value` only if `key` is absent (`SET ... NX`)."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                px = None if ttl is None else _px(ttl)
                return bool(await client.set(key, value, nx=True, px=px))
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove `keys` with `UNLINK` (split per slot on a cluster)."""
        if not keys:
            return
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                await client.unlink(*keys)
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Remove `key` only while it holds `value` (one Lua script)."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                deleted = await self._release(keys=[key], args=[value], client=client)
        except self._failures as exc:
            raise self._unavailable(exc) from exc
        return bool(deleted)

    async def clear(self, prefix: str) -> None:
        """Remove every key under `prefix`: `SCAN MATCH` + `UNLINK`, in batches.

        Proportional to the keys in the database (on every master of a
        cluster): meant for tests and maintenance, not for request paths.
        """
        pattern = _glob_escape(prefix) + "*"
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._client
                batch: list[bytes] = []
                async for key in client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        await client.unlink(*batch)
                        batch.clear()
                if batch:
                    await client.unlink(*batch)
        except self._failures as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._client.aclose()


class RedisBackend(_RedisCommon):
    """A Redis server through one `redis.asyncio` client and one pool.

    Every call is bounded by the socket timeouts (one connect, one reply, one
    immediate reconnect after a dropped connection), so the service adds no
    deadline of its own (`timeout` is `None`).

    Args:
        config: Connection settings; `config.redis_url()` unless `url` is given.
        url: `redis://` or `rediss://` URL; wins over the config.
    """

    name = "redis"
    timeout = None

    def __init__(self, config: CacheConfig | None = None, *, url: str | None = None):
        require_cache()
        from redis.asyncio import ConnectionPool, Redis

        config = config or CacheConfig()
        pool = ConnectionPool.from_url(
            url or config.redis_url(), **_connection_options(config)
        )
        self._client = Redis.from_pool(pool)
        super().__init__(config)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of `keys` with one `MGET`."""
        try:
            async with self._slots:
                return cast("list[bytes | None]", await self._client.mget(keys))
        except self._failures as exc:
            raise self._unavailable(exc) from exc


class RedisClusterBackend(_RedisCommon):
    """A Redis Cluster through `redis.asyncio.cluster.RedisCluster`.

    Multi-key reads and writes are split per slot and sent to the nodes
    concurrently. The client does not insist on full slot coverage, so while
    a failed master's replica takes over, keys on the other masters keep
    working. After a failure the client re-discovers the topology, possibly
    asking several nodes in turn, so the service bounds each call by one
    connect plus one reply (`timeout`).

    Args:
        config: Connection settings; `config.redis_url()` unless `url` is given.
        url: One startup node URL, or several (any live one will do).
    """

    name = "redis-cluster"

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        url: str | Sequence[str] | None = None,
    ) -> None:
        require_cache()
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.connection import parse_url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        config = config or CacheConfig()
        urls = [url] if isinstance(url, str) else list(url or [config.redis_url()])
        nodes = []
        for each in urls[1:]:
            parsed = parse_url(each)
            nodes.append(ClusterNode(parsed["host"], parsed.get("port", 6379)))
        self._client = self._cluster = RedisCluster.from_url(
            urls[0],
            startup_nodes=nodes,
            require_full_coverage=False,
            max_connections=config.max_connections,
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.socket_connect_timeout,
            # The cluster client re-discovers the topology after a failure;
            # it does not retry the command itself (the next call will).
            retry=Retry(NoBackoff(), 0),
        )
        super().__init__(config)
        self.timeout = config.socket_connect_timeout + config.socket_timeout
        # redis-py 8.1's cluster client fails most commands that run while its
        # first topology discovery is in flight; discover once, alone.
        self._cold = True
        self._warm_lock = asyncio.Lock()
        self._discovered = False
        #: Set by a failure that may mean the slot map is out of date.
        self._stale = False
        self._replies, self._cluster_replies = _answers()

    def _unavailable(self, exc: BaseException) -> CacheUnavailableError:
        if not isinstance(exc, self._replies) or isinstance(exc, self._cluster_replies):
            # Anything but a server's plain error reply (a lost node, a
            # timeout, a cluster error, a client bug): with its retries off,
            # the cluster client keeps a dead master in its slot map after a
            # failed pipeline (`get_many`, `set_many`, split `UNLINK`), and
            # those keys would fail until a single-key command failed too.
            # Re-discover before the next command instead.
            self._stale = self._cold = True
        return super()._unavailable(exc)

    async def _warm(self) -> RedisCluster:
        """Discover the topology, first or again after a failure; one at a time."""
        async with self._warm_lock:
            if not self._discovered:
                await self._cluster.initialize()
                self._discovered = True
            elif self._stale:
                await self._cluster.nodes_manager.initialize()
            self._stale = self._cold = False
        return self._cluster

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values of `keys`: one `MGET` per slot, nodes in parallel."""
        try:
            async with self._slots:
                client = await self._warm() if self._cold else self._cluster
                return cast("list[bytes | None]", await client.mget_nonatomic(keys))
        except self._failures as exc:
            raise self._unavailable(exc) from exc
