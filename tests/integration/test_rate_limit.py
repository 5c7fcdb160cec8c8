"""rate_limit on a real Redis and a real Redis Cluster, and with Redis down."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio.to_thread
import pytest
import redis.asyncio as redis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster as ClusterClient

from dotmac_core import CacheConfig, RateLimitExceededError, ServiceError
from dotmac_core import _ratelimit_redis as redis_store
from dotmac_core.ratelimit import close_rate_limiters, rate_limit

from ..faults import dead_port
from ..redis_servers import RedisCluster

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
async def _close_limiters() -> AsyncIterator[None]:
    """Close the limits' Redis clients and forget their stores after each test."""
    yield
    await close_rate_limiters()
    redis_store._STORES.clear()


@pytest.fixture(params=["redis", "redis-cluster"])
def configs(request: pytest.FixtureRequest) -> tuple[CacheConfig, CacheConfig]:
    """Two configs for one Redis (or Redis Cluster) that share no client.

    With socket timeouts of seconds, not the 0.25 s default: these tests
    count exact admissions, and a limiter whose Redis call times out on a busy
    machine fails open (`test_redis_down_*` cover that behaviour).
    """
    patient = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        # Different pool sizes: two stores, two clients, like two processes.
        return (
            CacheConfig(
                backend="redis",
                url=url,
                key_prefix=prefix,
                max_connections=20,
                **patient,
            ),
            CacheConfig(
                backend="redis",
                url=url,
                key_prefix=prefix,
                max_connections=21,
                **patient,
            ),
        )
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    prefix = f"dotmac-test:{uuid.uuid4().hex[:12]}:"  # keys expire with the window
    first, second = cluster.urls[:2]  # two startup nodes: two clients
    return (
        CacheConfig(backend="redis-cluster", url=first, key_prefix=prefix, **patient),
        CacheConfig(backend="redis-cluster", url=second, key_prefix=prefix, **patient),
    )


def _raw_client(config: CacheConfig) -> redis.Redis | ClusterClient:
    if config.backend == "redis-cluster":
        return ClusterClient.from_url(config.redis_url())
    return redis.Redis.from_url(config.redis_url())


async def _count_admitted(calls: list[Awaitable[Any]]) -> int:
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
            result, RateLimitExceededError
        ):
            raise result
    return sum(not isinstance(r, BaseException) for r in results)


async def test_two_limiters_share_exactly_max_calls(
    configs: tuple[CacheConfig, CacheConfig],
) -> None:
    """Two independent limiters on one Redis admit exactly max_calls between them."""
    first_config, second_config = configs

    @rate_limit(10, 30, key="checkout", backend=first_config)
    async def on_pod_a() -> str:
        return "a"

    @rate_limit(10, 30, key="checkout", backend=second_config)
    async def on_pod_b() -> str:
        return "b"

    assert redis_store.store_for(first_config) is not redis_store.store_for(
        second_config
    )
    calls = [on_pod_a() if i % 2 else on_pod_b() for i in range(60)]
    assert await _count_admitted(calls) == 10
    with pytest.raises(RateLimitExceededError) as caught:
        await on_pod_a()
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 30

    client = _raw_client(first_config)
    try:
        key = f"{first_config.key_prefix}ratelimit:{{checkout}}:10/30.0s"
        assert await client.zcard(key) == 10
        assert 0 < await client.pttl(key) <= 30_000  # never an immortal key
    finally:
        await client.aclose()


async def test_window_slides_on_the_server_clock(
    configs: tuple[CacheConfig, CacheConfig],
) -> None:
    """After retry_after, a call is admitted again."""
    config = configs[0]

    @rate_limit(2, 0.3, backend=config)
    async def endpoint() -> None:
        return None

    await endpoint()
    await endpoint()
    with pytest.raises(RateLimitExceededError) as caught:
        await endpoint()
    retry_after = caught.value.retry_after
    assert retry_after is not None
    assert 0 < retry_after <= 0.3
    await asyncio.sleep(retry_after + 0.02)
    await endpoint()


async def test_key_expires_with_its_window(redis_url: str, redis_prefix: str) -> None:
    """Every write sets an expiry, so the key disappears one window later."""
    config = CacheConfig(backend="redis", url=redis_url, key_prefix=redis_prefix)

    @rate_limit(1, 0.2, key="short", backend=config)
    async def endpoint() -> None:
        return None

    await endpoint()
    with pytest.raises(RateLimitExceededError):
        await endpoint()
    client = redis.Redis.from_url(redis_url)
    try:
        key = f"{redis_prefix}ratelimit:{{short}}:1/0.2s"
        assert 0 < await client.pttl(key) <= 200
        await asyncio.sleep(0.25)
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


async def test_url_and_service_backends(redis_url: str, redis_prefix: str) -> None:
    """A Redis URL, or any object with a `config`, gives a shared Redis limit."""

    class CacheService:
        backend_name = "redis"

        def __init__(self, config: CacheConfig) -> None:
            self.config = config

    service = CacheService(
        CacheConfig(backend="redis", url=redis_url, key_prefix=redis_prefix)
    )
    name = f"{redis_prefix}url"  # under the URL's default prefix, "dotmac:"

    @rate_limit(1, 1, key=name, backend=redis_url)
    async def by_url() -> None:
        return None

    @rate_limit(1, 1, key="service", backend=service)
    async def by_service() -> None:
        return None

    await by_url()
    await by_service()
    with pytest.raises(RateLimitExceededError):
        await by_url()
    with pytest.raises(RateLimitExceededError):
        await by_service()
    client = redis.Redis.from_url(redis_url)
    try:
        assert await client.exists(f"dotmac:ratelimit:{{{name}}}:1/1.0s") == 1
        assert await client.exists(f"{redis_prefix}ratelimit:{{service}}:1/1.0s") == 1
    finally:
        await client.aclose()


async def test_script_is_loaded_again_after_a_flush(
    redis_cluster: RedisCluster,
) -> None:
    """If the server lost the script (restart, SCRIPT FLUSH), it is sent again."""
    config = CacheConfig(
        backend="redis-cluster",
        url=redis_cluster.urls[0],
        key_prefix=f"dotmac-test:{uuid.uuid4().hex[:12]}:",
    )

    @rate_limit(5, 1, backend=config)
    async def endpoint() -> int:
        return 1

    assert await endpoint() == 1
    for node in redis_cluster.masters():
        node.cli("script", "flush")
    assert await endpoint() == 1


async def test_clients_are_per_event_loop(redis_url: str, redis_prefix: str) -> None:
    """A limit used from another event loop gets its own client and one budget."""
    config = CacheConfig(backend="redis", url=redis_url, key_prefix=redis_prefix)

    @rate_limit(2, 30, backend=config)
    async def endpoint() -> None:
        return None

    async def in_other_loop() -> None:
        try:
            await endpoint()
        finally:
            await close_rate_limiters()

    await endpoint()
    await anyio.to_thread.run_sync(asyncio.run, in_other_loop())
    with pytest.raises(RateLimitExceededError):
        await endpoint()


@pytest.fixture
def dead_redis() -> CacheConfig:
    """A config pointing at a loopback port nothing listens on."""
    return CacheConfig(backend="redis", url=f"redis://127.0.0.1:{dead_port()}/0")


async def test_redis_down_fails_open_quickly_and_logs_once(
    dead_redis: CacheConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """fail_open=True: every call runs, fast, with one warning for the outage."""
    ran = 0

    @rate_limit(1, 60, backend=dead_redis, fail_open=True)
    async def endpoint() -> None:
        nonlocal ran
        ran += 1

    started = time.monotonic()
    for _ in range(20):
        await endpoint()
    assert time.monotonic() - started < 2
    assert ran == 20
    warnings = [r for r in caplog.records if r.name == "dotmac_core.ratelimit"]
    assert len(warnings) == 1
    assert "failed (ConnectionError)" in warnings[0].getMessage()


async def test_redis_down_fails_closed(dead_redis: CacheConfig) -> None:
    """fail_open=False: the call does not run and ServiceError is raised."""
    ran = False

    @rate_limit(1, 60, backend=dead_redis, fail_open=False)
    async def login() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(ServiceError) as caught:
        await login()
    assert isinstance(caught.value.__cause__, redis_errors.ConnectionError)
    assert caught.value.transient
    for _ in range(dead_redis.circuit_breaker_threshold):
        with pytest.raises(ServiceError):
            await login()
    # The circuit is open: Redis is skipped, the answer is immediate.
    with pytest.raises(ServiceError, match="circuit open"):
        await login()
    assert not ran


async def test_a_redis_error_on_the_key_follows_the_policy(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A command error (WRONGTYPE) is a failure too; recovery is logged."""
    caplog.set_level(logging.INFO, logger="dotmac_core.ratelimit")
    config = CacheConfig(
        backend="redis",
        url=redis_url,
        key_prefix=redis_prefix,
        circuit_breaker_reset=0.05,
    )
    key = f"{redis_prefix}ratelimit:{{clash}}:1/60.0s"

    @rate_limit(1, 60, key="clash", backend=config, fail_open=False)
    async def strict() -> None:
        return None

    @rate_limit(1, 60, key="clash", backend=config, fail_open=True)
    async def lenient() -> None:
        return None

    client = redis.Redis.from_url(redis_url)
    try:
        await client.set(key, "not a sorted set")
        with pytest.raises(ServiceError) as caught:
            await strict()
        assert not caught.value.transient
        await lenient()  # let through
        await client.delete(key)
    finally:
        await client.aclose()
    await strict()
    # Recovery is logged once Redis has answered for circuit_breaker_reset s.
    await asyncio.sleep(0.06)
    with pytest.raises(RateLimitExceededError):
        await strict()
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed (ResponseError)" in m for m in messages)
    assert any("answers again" in m for m in messages)


async def test_limits_stack_with_retry_and_timeout(
    redis_url: str, redis_prefix: str
) -> None:
    """retry_on_failure outside a Redis limit waits out retry_after, then runs."""
    from dotmac_core.decorators import retry_on_failure, timeout

    config = CacheConfig(backend="redis", url=redis_url, key_prefix=redis_prefix)
    calls = 0

    @timeout(5)
    @retry_on_failure(max_retries=2)
    @rate_limit(1, 0.2, backend=config)
    async def send() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await send() == 1
    assert await send() == 2  # refused once, retried after retry_after


async def test_an_unencodable_key_follows_the_policy(
    redis_url: str, redis_prefix: str
) -> None:
    """A failure before anything is sent (a key Redis cannot encode) is one too."""
    config = CacheConfig(backend="redis", url=redis_url, key_prefix=redis_prefix)
    lone_surrogate = "\ud800"

    @rate_limit(1, 60, key=lone_surrogate, backend=config, fail_open=False)
    async def strict() -> None:
        return None

    @rate_limit(1, 60, key=lone_surrogate, backend=config)
    async def lenient() -> str:
        return "ran"

    with pytest.raises(ServiceError, match="UnicodeEncodeError") as caught:
        await strict()
    assert not caught.value.transient
    assert isinstance(caught.value.__cause__, UnicodeEncodeError)
    assert await lenient() == "ran"


async def test_closing_a_store_unused_in_this_loop(redis_url: str) -> None:
    """Closing when this event loop never used the store does nothing."""
    store = redis_store.store_for(CacheConfig(backend="redis", url=redis_url))
    await store.close()
    await close_rate_limiters()
