"""rate_limit in one process: the sliding window, keys, arguments, the breaker."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from dotmac_core import (
    CacheConfig,
    ConfigurationError,
    RateLimitExceededError,
    require_current_tenant,
    tenant_scope,
)
from dotmac_core import testing as dm_testing
from dotmac_core._ratelimit_redis import Breaker
from dotmac_core._ratelimit_store import LOCAL_STORE, Decision, LocalWindowStore
from dotmac_core.ratelimit import close_rate_limiters, rate_limit


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """The current (hand-set) time."""
        return self.now


@pytest.fixture(autouse=True)
def _fresh_local_limits() -> Iterator[None]:
    """Every test starts with no call counted."""
    dm_testing.reset_rate_limits()
    yield
    dm_testing.reset_rate_limits()


async def _admitted(calls: list[Any]) -> int:
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
            result, RateLimitExceededError
        ):
            raise result
    return sum(not isinstance(r, BaseException) for r in results)


async def test_admits_exactly_max_calls_under_concurrency() -> None:
    """Of 50 concurrent calls, exactly max_calls run; the rest are refused."""
    ran = 0

    @rate_limit(max_calls=10, time_window=60)
    async def endpoint() -> dict[str, str]:
        nonlocal ran
        await anyio.lowlevel.checkpoint()
        ran += 1
        return {"message": "success"}

    assert await _admitted([endpoint() for _ in range(50)]) == 10
    assert ran == 10


async def test_refusal_carries_retry_after_and_remaining() -> None:
    """The error says how long to wait, that nothing remains, and the limit."""

    @rate_limit(max_calls=1, time_window=30)
    async def endpoint() -> None:
        return None

    await endpoint()
    with pytest.raises(RateLimitExceededError) as caught:
        await endpoint()
    error = caught.value
    assert error.retry_after is not None
    assert 29 < error.retry_after <= 30
    assert error.remaining == 0
    assert error.details == {
        "retry_after": error.retry_after,
        "limit": 1,
        "window": 30.0,
    }
    assert error.http_status == 429


async def test_window_slides() -> None:
    """Once the oldest call leaves the window, one more call is admitted."""

    @rate_limit(max_calls=2, time_window=0.2)
    async def endpoint() -> None:
        return None

    await endpoint()
    await endpoint()
    with pytest.raises(RateLimitExceededError) as caught:
        await endpoint()
    assert caught.value.retry_after is not None
    await anyio.sleep(caught.value.retry_after + 0.01)
    await endpoint()


def test_sliding_window_arithmetic() -> None:
    """A call admitted at t counts until t + window; retry_after is exact."""
    clock = Clock()
    store = LocalWindowStore(clock)
    assert store.hit_now("k", 2, 10) == Decision(True, 1, 0.0)
    clock.now += 4
    assert store.hit_now("k", 2, 10) == Decision(True, 0, 0.0)
    clock.now += 1
    assert store.hit_now("k", 2, 10) == Decision(False, 0, 5.0)
    clock.now += 5  # the first call is exactly one window old: it has left
    assert store.hit_now("k", 2, 10) == Decision(True, 0, 0.0)
    assert store.hit_now("k", 2, 10) == Decision(False, 0, 4.0)


def test_idle_keys_are_forgotten() -> None:
    """Keys without a call in their window are swept, so memory stays bounded."""
    clock = Clock()
    store = LocalWindowStore(clock)
    for user in range(100):
        store.hit_now(f"user:{user}", 5, 1)
    store.hit_now("busy", 5, 1000)
    assert len(store) == 101
    clock.now += 5  # before the next sweep: nothing forgotten yet
    store.hit_now("other", 5, 1)
    assert len(store) == 102
    clock.now += 10
    store.hit_now("other", 5, 1)
    assert len(store) == 2  # "busy" is still inside its window


async def test_callable_key_gives_each_tenant_a_budget() -> None:
    """A key computed from the call (here the tenant) splits the budget."""

    @rate_limit(1, 60, key=lambda *a, **k: f"search:{require_current_tenant()}")
    async def search(query: str) -> str:
        return query

    with tenant_scope("acme"):
        assert await search("a") == "a"
        with pytest.raises(RateLimitExceededError):
            await search("b")
    with tenant_scope("globex"):
        assert await search("c") == "c"


async def test_callable_key_receives_the_arguments() -> None:
    """The key function gets the call's positional and keyword arguments."""
    seen: list[tuple[Any, ...]] = []

    def per_user(user_id: int, *, verbose: bool = False) -> str:
        seen.append((user_id, verbose))
        return f"user:{user_id}"

    @rate_limit(1, 60, key=per_user)
    async def profile(user_id: int, *, verbose: bool = False) -> int:
        return user_id

    assert await profile(1) == 1
    assert await profile(2, verbose=True) == 2
    with pytest.raises(RateLimitExceededError):
        await profile(1)
    assert seen == [(1, False), (2, True), (1, False)]


async def test_string_key_is_shared_between_functions() -> None:
    """Two functions limited under one key share its budget."""

    @rate_limit(2, 60, key="login")
    async def by_password() -> None:
        return None

    @rate_limit(2, 60, key="login")
    async def by_code() -> None:
        return None

    await by_password()
    await by_code()
    with pytest.raises(RateLimitExceededError):
        await by_password()


async def test_default_key_is_per_function() -> None:
    """Without a key, each decorated function has a budget of its own."""

    @rate_limit(1, 60)
    async def first() -> None:
        return None

    @rate_limit(1, 60)
    async def second() -> None:
        return None

    await first()
    await second()


async def test_different_limits_never_share_a_budget() -> None:
    """The same key with other figures is another budget (no misread counts)."""

    @rate_limit(1, 60, key="report")
    async def strict() -> None:
        return None

    @rate_limit(5, 60, key="report")
    async def lenient() -> None:
        return None

    await strict()
    for _ in range(5):
        await lenient()


async def test_works_on_methods_with_self_in_the_key() -> None:
    """On a method, the key function receives `self` first."""

    class Account:
        def __init__(self, number: str) -> None:
            self.number = number

        @rate_limit(1, 60, key=lambda self, *a, **k: f"account:{self.number}")
        async def statement(self) -> str:
            return self.number

    first, second = Account("1"), Account("2")
    assert await first.statement() == "1"
    assert await second.statement() == "2"
    with pytest.raises(RateLimitExceededError):
        await first.statement()


async def test_memory_cache_config_keeps_the_limit_local() -> None:
    """A CacheConfig (or service) whose backend is memory limits in-process."""

    class MemoryService:
        backend_name = "memory"
        config = CacheConfig(backend="memory")

    @rate_limit(1, 60, backend=CacheConfig(backend="memory"))
    async def by_config() -> None:
        return None

    @rate_limit(1, 60, backend=MemoryService())
    async def by_service() -> None:
        return None

    await by_config()
    await by_service()
    with pytest.raises(RateLimitExceededError):
        await by_config()
    with pytest.raises(RateLimitExceededError):
        await by_service()


async def test_reset_rate_limits_forgets_local_counts() -> None:
    """`testing.reset_rate_limits()` starts every local budget afresh."""

    @rate_limit(1, 60)
    async def endpoint() -> None:
        return None

    await endpoint()
    dm_testing.reset_rate_limits()
    await endpoint()
    assert len(LOCAL_STORE) == 1


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"max_calls": 0, "time_window": 1}, "max_calls"),
        ({"max_calls": True, "time_window": 1}, "max_calls"),
        ({"max_calls": 1.5, "time_window": 1}, "max_calls"),
        ({"max_calls": 1, "time_window": 0}, "time_window"),
        ({"max_calls": 1, "time_window": float("inf")}, "time_window"),
        ({"max_calls": 1, "time_window": 1, "backend": "http://x"}, "backend"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict[str, Any], field: str) -> None:
    """Out-of-range figures and non-Redis URLs raise ConfigurationError."""
    with pytest.raises(ConfigurationError) as caught:
        rate_limit(**arguments)
    assert caught.value.field == field


def test_a_service_whose_config_disagrees_is_refused() -> None:
    """A service on Redis whose config says memory would limit silently: refused."""

    class Service:
        backend_name = "redis"
        config = CacheConfig(backend="memory")

    with pytest.raises(ConfigurationError, match="'redis' but its config says"):
        rate_limit(1, 1, backend=Service())


def test_unknown_backends_and_sync_callables_are_refused() -> None:
    """A backend of no known kind, or a sync function, is a TypeError."""

    class NoConfig:
        config = "redis://127.0.0.1"

    with pytest.raises(TypeError, match="NoConfig"):
        rate_limit(1, 1, backend=NoConfig())  # type: ignore[arg-type]

    def sync() -> None:
        """Never runs."""

    with pytest.raises(TypeError, match="async"):
        rate_limit(1, 1)(sync)  # type: ignore[arg-type]


async def test_close_without_any_redis_limit_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close_rate_limiters() does nothing (imports nothing) if no limit used Redis."""
    monkeypatch.delitem(sys.modules, "dotmac_core._ratelimit_redis", raising=False)
    await close_rate_limiters()
    assert "dotmac_core._ratelimit_redis" not in sys.modules


def test_breaker_opens_after_threshold_and_probes_after_reset() -> None:
    """Threshold failures open the circuit; after `reset` one call probes again."""
    clock = Clock()
    breaker = Breaker(threshold=3, reset=5, clock=clock)
    assert not breaker.is_open()
    assert breaker.failed()  # the first failure starts the outage
    assert not breaker.failed()
    assert not breaker.is_open()
    assert not breaker.failed()
    assert breaker.is_open()
    clock.now += 5
    assert not breaker.is_open()  # half open: let a probe through
    breaker.failed()
    assert breaker.is_open()  # the probe failed: open again
    clock.now += 5
    assert breaker.succeeded() is None  # the probe worked: the circuit closes
    assert not breaker.is_open()
    clock.now += 5
    # Redis answered for `reset` seconds: the outage (0 s to 10 s) is over.
    assert breaker.succeeded() == 10
    assert breaker.succeeded() is None


def test_breaker_takes_failures_between_successes_for_one_outage() -> None:
    """One master down in a cluster: failures and successes alternate, one outage."""
    clock = Clock()
    breaker = Breaker(threshold=3, reset=5, clock=clock)
    assert breaker.failed()
    for _ in range(10):
        assert breaker.succeeded() is None
        clock.now += 1
        assert not breaker.failed()  # the same outage, not a new one
    assert breaker.succeeded() is None
    clock.now += 5
    assert breaker.succeeded() == 10
    assert breaker.failed()  # a failure after that starts the next outage
