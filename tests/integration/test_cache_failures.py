"""The failure policy against real sockets: a dead port, a hung listener, an outage.

Faults come from sockets this module opens itself: a port nobody listens on,
a listener that accepts and never answers, and a TCP relay to the real Redis
that can be switched off and on again (`Relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import anyio
import pytest

from dotmac_core import CacheConfig, ServiceError
from dotmac_core.cache import (
    CacheService,
    CacheUnavailableError,
    TenantAwareCacheManager,
    cached,
    create_cache_service,
)

pytestmark = pytest.mark.redis

FAST = {
    "socket_timeout": 0.1,
    "socket_connect_timeout": 0.1,
    "circuit_breaker_threshold": 3,
    "circuit_breaker_reset": 0.3,
}


@pytest.fixture
def dead_url() -> str:
    """A Redis URL on a loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


class Relay:
    """A TCP relay to a real server: `up()`, `down()` (refuse) or `hang()`."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.accepted = 0
        self.delay = 0.0
        self._hang = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The relay's `redis://` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def up(self) -> None:
        """Listen (again, on the same port) and forward to the server."""
        await self._drop()
        self._hang = False
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def hang(self) -> None:
        """Accept connections but never answer (a hung server)."""
        await self._drop()
        self._hang = True
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def down(self) -> None:
        """Stop listening and cut every connection (a dead server)."""
        await self._drop()

    async def _drop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._writers.clear()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        self._writers.add(writer)
        if self._hang:
            return  # keep the socket open, never read or write
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.add(up_writer)
        self._spawn(self._pipe(reader, up_writer, 0.0))
        self._spawn(self._pipe(up_reader, writer, self.delay))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    """A relay in front of the shared Redis server, up at the start."""
    parts = urlsplit(redis_url)
    proxy = Relay(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.up()
    yield proxy
    await proxy.down()


@pytest.fixture
def cache_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the `dotmac_core.cache` logger, INFO and above."""
    with caplog.at_level(logging.INFO, logger="dotmac_core.cache"):
        yield caplog


def _warnings(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno == logging.WARNING]


def _service(url: str | list[str], prefix: str, **settings: object) -> CacheService:
    backend = "redis-cluster" if isinstance(url, list) else "redis"
    config = CacheConfig(key_prefix=prefix, **{**FAST, **settings})  # type: ignore[arg-type]
    return create_cache_service(backend, url=url, config=config)


async def test_dead_port_fails_open_fast(
    dead_url: str, redis_prefix: str, cache_log: pytest.LogCaptureFixture
) -> None:
    """Redis at a dead port: the decorated function answers, each call in < 1 s."""
    cache = _service(dead_url, redis_prefix)
    calls = 0

    @cached(ttl=60, key="user:{user_id}", cache=cache)
    async def profile(user_id: str) -> dict[str, str]:
        nonlocal calls
        calls += 1
        return {"id": user_id}

    for _ in range(20):
        with anyio.fail_after(1):  # a deadline, far above the expected ~1 ms
            assert await profile("7") == {"id": "7"}
    assert calls == 20
    assert await cache.get("user:7", "miss") == "miss"
    await cache.set("k", 1)
    await cache.delete("k")
    assert not await cache.exists("k")
    assert len(_warnings(cache_log)) == 1  # one warning per outage, not per call
    await cache.aclose()


async def test_hung_server_opens_the_circuit(
    relay: Relay, redis_prefix: str, cache_log: pytest.LogCaptureFixture
) -> None:
    """A hung server costs a socket timeout per call until the circuit opens."""
    await relay.hang()
    cache = _service(relay.url, redis_prefix, circuit_breaker_reset=60)
    for _ in range(10):
        with anyio.fail_after(1):
            assert await cache.get("k", "miss") == "miss"
    assert relay.accepted == FAST["circuit_breaker_threshold"]
    assert len(_warnings(cache_log)) == 1
    await cache.aclose()


async def test_cache_heals_when_redis_returns(
    relay: Relay, redis_prefix: str, cache_log: pytest.LogCaptureFixture
) -> None:
    """Down: misses and no-ops; back up: the breaker probes and caching resumes."""
    cache = _service(relay.url, redis_prefix)
    await cache.set("k", "before")
    assert await cache.get("k") == "before"

    await relay.down()
    for _ in range(5):
        assert await cache.get("k", "miss") == "miss"
        await cache.set("k", "during")  # skipped

    await relay.up()
    await asyncio.sleep(FAST["circuit_breaker_reset"] + 0.1)
    assert await cache.get("k") == "before"  # the server kept it; the write was skipped
    await cache.set("k", "after")
    assert await cache.get("k") == "after"
    await asyncio.sleep(FAST["circuit_breaker_reset"])
    assert await cache.exists("k")  # healthy for a while: the outage is over
    messages = [r.getMessage() for r in cache_log.records]
    assert len(_warnings(cache_log)) == 1
    assert any("answers again" in m for m in messages)
    await cache.aclose()


async def test_fail_closed_raises_service_errors(
    dead_url: str, redis_prefix: str
) -> None:
    """With `fail_open=False` every operation raises `CacheUnavailableError`."""
    cache = _service(dead_url, redis_prefix, fail_open=False)

    @cached(ttl=60, cache=cache)
    async def answer() -> int:
        return 42

    for _ in range(FAST["circuit_breaker_threshold"]):
        with pytest.raises(CacheUnavailableError) as failed:
            await cache.get("k")
        assert isinstance(failed.value.__cause__, Exception)
    # The circuit is open now: calls fail at once, still with the same error.
    with pytest.raises(CacheUnavailableError, match="circuit open"):
        await cache.set("k", 1)
    with pytest.raises(ServiceError):
        await answer()
    assert failed.value.http_status == 503
    await cache.aclose()


async def test_unreachable_cluster_fails_open(
    dead_url: str, redis_prefix: str, cache_log: pytest.LogCaptureFixture
) -> None:
    """A cluster with no reachable node (RedisClusterException) fails open too."""
    cache = _service([dead_url], redis_prefix)

    @cached(ttl=60, cache=cache)
    async def answer() -> int:
        return 42

    with anyio.fail_after(2):
        assert await answer() == 42
        assert await cache.get_many(["a", "b"]) == {}
        await cache.set_many({"a": 1, "b": 2})
    assert len(_warnings(cache_log)) == 1
    await cache.aclose()


async def test_cancelled_reads_leave_the_pool_consistent(
    relay: Relay, redis_prefix: str
) -> None:
    """Reads cancelled between request and reply never hand a reply to another."""
    cache = _service(
        relay.url,
        redis_prefix,
        socket_timeout=5,
        socket_connect_timeout=5,
        fail_open=False,
    )
    values = {f"k{i}": i for i in range(40)}
    await cache.set_many(values)
    relay.delay = 0.02
    await relay.up()  # new connections are slow to answer
    tasks = [asyncio.create_task(cache.get(k)) for k in values]
    await asyncio.sleep(0.01)  # requests sent, replies not yet back
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for key, result in zip(values, results, strict=True):
        if not isinstance(result, asyncio.CancelledError):
            assert result == values[key]
    relay.delay = 0.0
    for key, value in values.items():
        assert await cache.get(key) == value
    await cache.aclose()


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
async def test_every_operation_fails_open(
    dead_url: str, redis_prefix: str, cluster: bool
) -> None:
    """Each operation on a dead server is a miss or a no-op, never an error."""
    url: str | list[str] = [dead_url] if cluster else dead_url
    cache = _service(url, redis_prefix, circuit_breaker_threshold=100)
    tenants = TenantAwareCacheManager(cache)

    async def build() -> int:
        return 3

    assert await cache.get("k", "miss") == "miss"
    assert await cache.get_many(["a", "b"]) == {}
    assert not await cache.exists("k", namespace="ns")
    await cache.set("k", 1)
    await cache.set("k", 1, namespace="ns")
    await cache.set_many({"a": 1, "b": 2})
    await cache.delete("k")
    await cache.delete_many(["a", "b"])
    await cache.invalidate_namespace("ns")
    await cache.clear()
    assert await cache.get_or_set("k", build, lock=True) == 3
    assert await tenants.get_or_set("k", build, tenant_id="t", lock=True) == 3
    await tenants.invalidate_tenant("t")
    await cache.aclose()


async def test_failed_lock_release_does_not_fail_the_call(
    relay: Relay, redis_prefix: str
) -> None:
    """If Redis goes away while the lock holder computes, the call still answers."""
    cache = _service(relay.url, redis_prefix)

    async def build() -> str:
        await relay.down()  # the store and the lock release will fail
        return "value"

    assert await cache.get_or_set("k", build, lock=True) == "value"
    await relay.up()
    await asyncio.sleep(FAST["circuit_breaker_reset"] + 0.1)
    # The lock expires by itself; until then waiters compute without it.
    assert await cache.get("k") is None
    await cache.aclose()


async def test_a_burst_waits_for_a_free_connection(
    redis_url: str, redis_prefix: str
) -> None:
    """More concurrent calls than connections wait for one instead of missing."""
    cache = _service(redis_url, redis_prefix, max_connections=1, fail_open=False)
    await cache.set("k", "v")
    assert await asyncio.gather(*(cache.get("k") for _ in range(20))) == ["v"] * 20
    await cache.aclose()


async def test_waiting_for_a_connection_is_bounded(
    relay: Relay, redis_prefix: str
) -> None:
    """Behind a hung server holding every connection, callers wait briefly."""
    await relay.hang()
    cache = _service(relay.url, redis_prefix, max_connections=1, socket_timeout=1)
    first = asyncio.create_task(cache.get("k", "miss"))
    await asyncio.sleep(0.05)  # it holds the only connection for a second
    with anyio.fail_after(0.5):
        queued = await asyncio.gather(*(cache.get("k", "miss") for _ in range(4)))
    assert queued == ["miss"] * 4
    assert not first.done()
    assert await first == "miss"
    await cache.aclose()
