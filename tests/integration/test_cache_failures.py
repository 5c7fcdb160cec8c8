"""The failure policy against real sockets: a dead port, a hung listener, an outage.

Faults come from a port nobody listens on and from `tests/faults.py`'s
`FaultProxy` in front of the real Redis: black-holed (accepts and never
answers), stopped and started again, slowed down, reset, or cut after a
number of bytes of a request or a reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal
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

from ..faults import FaultProxy, dead_port

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
    return f"redis://127.0.0.1:{dead_port()}/0"


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the shared Redis server, passing through."""
    parts = urlsplit(redis_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as fault:
        yield fault


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


async def test_calls_skipped_by_an_open_circuit_let_other_tasks_run(
    dead_url: str, redis_prefix: str, cache_log: pytest.LogCaptureFixture
) -> None:
    """A loop of cache calls answered without Redis still yields to other tasks."""
    cache = _service(dead_url, redis_prefix, circuit_breaker_reset=60)
    for _ in range(FAST["circuit_breaker_threshold"]):
        await cache.get("k")  # refused: opens the circuit
    ran = 0

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await asyncio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await asyncio.sleep(0)  # let it start
        before = ran
        for _ in range(100):
            assert await cache.get("k", "miss") == "miss"
        assert ran - before >= 99  # once per skipped call, give or take
        tg.cancel_scope.cancel()
    await cache.aclose()


async def test_a_client_bug_fails_open_like_an_outage(
    redis_url: str,
    redis_prefix: str,
    cache_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any exception out of the Redis client is the backend failing, not the call's.

    redis-py's asyncio client has raised `AttributeError` for a command sent
    on a connection closed under it during a cluster failover; here the
    client's `get` raises it (fault injection on a real server).
    """
    cache = _service(redis_url, redis_prefix)
    await cache.set("k", 1)

    async def broken(*_args: object, **_kwargs: object) -> None:
        message = "'NoneType' object has no attribute 'writelines'"
        raise AttributeError(message)

    backend: Any = cache.backend
    monkeypatch.setattr(backend._client, "get", broken)
    assert await cache.get("k", "miss") == "miss"
    assert cache.fail_opens.count == 1
    assert "AttributeError" in (cache.fail_opens.last_reason or "")
    monkeypatch.undo()
    assert await cache.get("k") == 1
    await cache.aclose()


async def test_hung_server_opens_the_circuit(
    proxy: FaultProxy,
    redis_url: str,
    redis_prefix: str,
    cache_log: pytest.LogCaptureFixture,
) -> None:
    """A hung server costs a socket timeout per call until the circuit opens."""
    proxy.black_hole()
    cache = _service(proxy.url(redis_url), redis_prefix, circuit_breaker_reset=60)
    for _ in range(10):
        with anyio.fail_after(1):
            assert await cache.get("k", "miss") == "miss"
    assert proxy.accepted == FAST["circuit_breaker_threshold"]
    assert len(_warnings(cache_log)) == 1
    await cache.aclose()


async def test_cache_heals_when_redis_returns(
    proxy: FaultProxy,
    redis_url: str,
    redis_prefix: str,
    cache_log: pytest.LogCaptureFixture,
) -> None:
    """Down: misses and no-ops; back up: the breaker probes and caching resumes."""
    cache = _service(proxy.url(redis_url), redis_prefix)
    await cache.set("k", "before")
    assert await cache.get("k") == "before"

    await proxy.stop()
    for _ in range(5):
        assert await cache.get("k", "miss") == "miss"
        await cache.set("k", "during")  # skipped

    await proxy.start()
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
    proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    """Reads cancelled between request and reply never hand a reply to another."""
    cache = _service(
        proxy.url(redis_url),
        redis_prefix,
        socket_timeout=5,
        socket_connect_timeout=5,
        fail_open=False,
    )
    values = {f"k{i}": i for i in range(40)}
    await cache.set_many(values)
    proxy.delay(0.02)  # every connection is slow to answer
    tasks = [asyncio.create_task(cache.get(k)) for k in values]
    await asyncio.sleep(0.01)  # requests sent, replies not yet back
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for key, result in zip(values, results, strict=True):
        if not isinstance(result, asyncio.CancelledError):
            assert result == values[key]
    proxy.pass_through()
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
    proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    """If Redis goes away while the lock holder computes, the call still answers."""
    cache = _service(proxy.url(redis_url), redis_prefix)

    async def build() -> str:
        await proxy.stop()  # the store and the lock release will fail
        return "value"

    assert await cache.get_or_set("k", build, lock=True) == "value"
    await proxy.start()
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
    proxy: FaultProxy, redis_url: str, redis_prefix: str
) -> None:
    """Behind a hung server holding every connection, callers wait briefly."""
    proxy.black_hole()
    cache = _service(
        proxy.url(redis_url), redis_prefix, max_connections=1, socket_timeout=1
    )
    first = asyncio.create_task(cache.get("k", "miss"))
    await asyncio.sleep(0.05)  # it holds the only connection for a second
    with anyio.fail_after(0.5):
        queued = await asyncio.gather(*(cache.get("k", "miss") for _ in range(4)))
    assert queued == ["miss"] * 4
    assert not first.done()
    assert await first == "miss"
    await cache.aclose()


@pytest.mark.parametrize("n_bytes", [0, 10, 1000, 100_000])
@pytest.mark.parametrize("side", ["request", "reply"])
async def test_connection_cut_mid_message_is_retried_whole(
    proxy: FaultProxy,
    redis_url: str,
    redis_prefix: str,
    side: Literal["request", "reply"],
    n_bytes: int,
) -> None:
    """A GET or SET whose connection is reset part-way is sent once more, whole.

    Never a truncated value, never another command's reply: the pooled
    connection is dropped, the command resent on a new one (both are
    idempotent), and nothing fails open.
    """
    cache = _service(proxy.url(redis_url), redis_prefix, fail_open=False)
    old, new = "o" * 200_000, "n" * 200_000
    await cache.set_many({"big": old, "small": "s"})
    cuts = proxy.cuts
    proxy.cut_after(n_bytes, of=side)
    if side == "reply":
        assert await cache.get("big") == old
    else:
        await cache.set("big", new)
    assert proxy.cuts == cuts + 1
    assert await cache.get("small") == "s"
    assert await cache.get("big") == (old if side == "reply" else new)
    assert cache.fail_opens.count == 0
    await cache.aclose()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_connections_reset(
    proxy: FaultProxy, redis_url: str, redis_prefix: str, fail_open: bool
) -> None:
    """Every connection reset, new ones too: a counted miss, or CacheUnavailableError.

    Once Redis is reachable again the same service reads its values.
    """
    cache = _service(proxy.url(redis_url), redis_prefix, fail_open=fail_open)
    await cache.set("k", "v")
    proxy.reset()
    with anyio.fail_after(1):  # a reset fails at once, no timeout is waited for
        if fail_open:
            assert await cache.get("k", "miss") == "miss"
            await cache.set("k", "during")  # skipped
            assert cache.fail_opens.count == 2
        else:
            for call in (lambda: cache.get("k"), lambda: cache.set("k", "during")):
                with pytest.raises(CacheUnavailableError) as info:
                    await call()
                assert isinstance(info.value.__cause__, Exception)
    proxy.pass_through()
    await asyncio.sleep(FAST["circuit_breaker_reset"] + 0.1)  # the breaker's reset
    assert await cache.get("k") == "v"
    await cache.aclose()
