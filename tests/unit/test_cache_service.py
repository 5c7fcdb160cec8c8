"""`CacheService` construction, validation and failure policy, without servers.

Faults a real server cannot be made to produce on demand (a backend that
outlives the service's deadline, a generation created by another writer
between two calls) come from small wrappers around `MemoryBackend`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from dotmac_core import CacheConfig, ConfigurationError, ValidationError
from dotmac_core.cache import (
    CacheService,
    CacheUnavailableError,
    MemoryBackend,
    RedisBackend,
    RedisClusterBackend,
    TenantAwareCacheManager,
    cached,
    configure_cache,
    create_cache_service,
    get_cache,
)
from dotmac_core.cache.service import _reset_default_cache


@pytest.fixture(autouse=True)
def _no_default_cache() -> Iterator[None]:
    """Each test starts and ends without a registered default cache."""
    _reset_default_cache()
    yield
    _reset_default_cache()


class SlowBackend(MemoryBackend):
    """A memory store whose reads take longer than its deadline."""

    timeout = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.delay = 1.0

    async def get(self, key: str) -> bytes | None:
        """Read after `delay` seconds."""
        await asyncio.sleep(self.delay)
        return await super().get(key)


class RacingBackend(MemoryBackend):
    """A memory store where another writer creates each generation first."""

    def __init__(self, theirs: bytes | None) -> None:
        super().__init__()
        self.theirs = theirs

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Lose the race: the other writer's token (or nothing, if evicted) wins."""
        if self.theirs is not None:
            await self.set(key, self.theirs, ttl)
        return False


class AddFailsBackend(MemoryBackend):
    """A memory store that can read but fails to create keys."""

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Fail."""
        raise CacheUnavailableError("down")


class BrokenBackend(MemoryBackend):
    """A memory store that fails every call, closing included."""

    name = "broken"

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Fail."""
        raise CacheUnavailableError("down")

    async def aclose(self) -> None:
        """Fail."""
        raise CacheUnavailableError("down")


def test_default_service_is_memory_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without arguments the service follows `DOTMAC_CACHE_*`: memory by default."""
    monkeypatch.delenv("DOTMAC_CACHE_BACKEND", raising=False)
    monkeypatch.setenv("DOTMAC_CACHE_MAX_ENTRIES", "7")
    cache = create_cache_service()
    assert cache.backend_name == "memory"
    assert isinstance(cache.backend, MemoryBackend)
    assert cache.config.max_entries == 7
    assert repr(cache) == "<CacheService backend='memory'>"


def test_url_alone_means_redis() -> None:
    """A URL without a backend name builds the Redis backend (no I/O yet)."""
    cache = create_cache_service(url="redis://127.0.0.1:1/2")
    assert isinstance(cache.backend, RedisBackend)
    assert cache.backend_name == "redis"
    assert cache.config.backend == "redis"
    assert cache.config.redis_url() == "redis://127.0.0.1:1/2"


def test_cluster_takes_several_startup_urls() -> None:
    """`redis-cluster` accepts a list of node URLs; the config keeps the first."""
    urls = ["redis://127.0.0.1:1", "redis://127.0.0.1:2"]
    cache = create_cache_service("redis-cluster", url=urls)
    assert isinstance(cache.backend, RedisClusterBackend)
    assert cache.config.redis_url() == urls[0]
    config = CacheConfig(backend="redis-cluster", port=3)
    assert create_cache_service(config=config).backend_name == "redis-cluster"


@pytest.mark.parametrize(
    ("backend", "url", "problem"),
    [
        ("memcached", None, "unknown cache backend"),
        ("memory", "redis://x", "takes no url"),
        ("redis", ["redis://a", "redis://b"], "takes one url"),
        (MemoryBackend(), "redis://x", "not beside it"),
    ],
)
def test_bad_construction_is_a_configuration_error(
    backend: Any, url: Any, problem: str
) -> None:
    """Unknown backends and URLs a backend cannot use are refused."""
    with pytest.raises(ConfigurationError, match=problem):
        create_cache_service(backend, url=url)


def test_a_backend_instance_is_used_as_given() -> None:
    """A ready `CacheBackend` is wrapped as it is."""
    store = MemoryBackend(5)
    assert create_cache_service(store).backend is store


def test_default_cache_registry() -> None:
    """`configure_cache` registers the default; `get_cache` insists on one."""
    with pytest.raises(ConfigurationError, match="configure_cache"):
        get_cache()
    built = configure_cache(CacheConfig(key_prefix="x:"))
    assert get_cache() is built
    assert built.config.key_prefix == "x:"
    mine = create_cache_service("memory")
    assert configure_cache(mine) is mine
    assert get_cache() is mine
    with pytest.raises(ConfigurationError):
        configure_cache(mine, backend="memory")
    assert configure_cache(backend="memory").backend_name == "memory"


async def test_tenant_manager_construction() -> None:
    """The manager wraps a service, builds one, or uses the default lazily."""
    lazy = TenantAwareCacheManager()
    assert repr(lazy) == "<TenantAwareCacheManager backend='default'>"
    with pytest.raises(ConfigurationError):
        lazy.cache  # noqa: B018 - no default configured yet
    default = configure_cache(backend="memory")
    assert lazy.cache is default
    built = TenantAwareCacheManager(backend="memory")
    assert built.cache is not default
    assert repr(built) == "<TenantAwareCacheManager backend='memory'>"
    with pytest.raises(ConfigurationError, match="not both"):
        TenantAwareCacheManager(default, backend="memory")
    braced = create_cache_service(config=CacheConfig(key_prefix="{app}:"))
    with pytest.raises(ConfigurationError, match="brace"):
        TenantAwareCacheManager(braced)
    with pytest.raises(ValidationError):
        await TenantAwareCacheManager(default).get("k", tenant_id="")


@pytest.mark.parametrize(
    "settings",
    [{"ttl": 0}, {"ttl": -1.0}, {"jitter": 1.0}, {"jitter": -0.1}],
)
async def test_ttl_and_jitter_are_checked(settings: dict[str, Any]) -> None:
    """Non-positive TTLs and jitter outside [0, 1) are `ValidationError`s."""
    cache = create_cache_service("memory")
    with pytest.raises(ValidationError):
        await cache.set("k", 1, **settings)
    with pytest.raises(ValidationError):
        cached(**settings)


async def test_lock_timeout_is_checked() -> None:
    """A non-positive lock timeout is refused where it is given."""
    cache = create_cache_service("memory")

    async def build() -> int:
        return 1

    with pytest.raises(ValidationError, match="lock_timeout"):
        await cache.get_or_set("k", build, lock=True, lock_timeout=0)
    with pytest.raises(ValidationError, match="lock_timeout"):
        await TenantAwareCacheManager(cache).get_or_set(
            "k", build, lock_timeout=-1, tenant_id="t"
        )
    with pytest.raises(ValidationError, match="lock_timeout"):
        cached(lock=True, lock_timeout=0)


async def test_clear_refuses_an_empty_prefix() -> None:
    """`clear` with an empty key prefix would wipe the database: refused."""
    cache = create_cache_service(config=CacheConfig(key_prefix=""))
    with pytest.raises(ConfigurationError, match="key_prefix"):
        await cache.clear()


async def test_backend_past_its_deadline_fails_open() -> None:
    """A call that outlives the backend's deadline is a miss (fail open)."""
    cache = CacheService(SlowBackend(), CacheConfig())
    assert await cache.get("k", "miss") == "miss"


async def test_backend_past_its_deadline_raises_when_failing_closed() -> None:
    """With `fail_open=False` the deadline raises `CacheUnavailableError`."""
    cache = CacheService(SlowBackend(), CacheConfig(fail_open=False))
    with pytest.raises(CacheUnavailableError, match="timed out") as failed:
        await cache.get("k")
    assert isinstance(failed.value.__cause__, TimeoutError)


async def test_cancelled_probe_lets_another_call_probe() -> None:
    """A probe cancelled mid-call does not leave the circuit stuck half-open."""
    backend = SlowBackend()
    cache = CacheService(
        backend,
        CacheConfig(circuit_breaker_threshold=1, circuit_breaker_reset=0.01),
    )
    assert await cache.get("k", "miss") == "miss"  # the failure opens the circuit
    await asyncio.sleep(0.02)
    probe = asyncio.create_task(cache.get("k"))
    await asyncio.sleep(0.01)
    probe.cancel()  # cancelled within its deadline, before it failed
    with pytest.raises(asyncio.CancelledError):
        await probe
    backend.delay = 0
    await cache.set("k", "v")
    assert await cache.get("k") == "v"  # a new probe ran and closed the circuit


@pytest.mark.parametrize("theirs", [b"their-token", None])
async def test_generation_created_by_another_writer(theirs: bytes | None) -> None:
    """A generation another writer created first is adopted; if gone, no write."""
    cache = CacheService(RacingBackend(theirs), CacheConfig())
    await cache.set("k", 1, namespace="ns")
    expected = 1 if theirs is not None else "miss"
    assert await cache.get("k", "miss", namespace="ns") == expected


async def test_failing_generation_write_skips_the_entry() -> None:
    """If the namespace generation cannot be created, nothing is written."""
    cache = CacheService(AddFailsBackend(), CacheConfig())
    await cache.set("k", 1, namespace="ns")
    assert await cache.get("k", "miss", namespace="ns") == "miss"


async def test_failing_lock_means_computing_without_it() -> None:
    """If the lock cannot be taken (backend error), the value is still computed."""
    cache = CacheService(AddFailsBackend(), CacheConfig())

    async def build() -> int:
        return 9

    assert await cache.get_or_set("k", build, lock=True) == 9
    assert await cache.get("k") == 9


async def test_closing_ignores_backend_errors() -> None:
    """`aclose` (and `async with`) never raise because the backend is down."""
    async with CacheService(BrokenBackend(), CacheConfig()) as cache:
        assert await cache.get_many(["a", "b"]) == {}
        assert cache.backend_name == "broken"


async def test_cache_can_be_used_without_tenant_for_plain_keys() -> None:
    """A plain service needs no tenant; a stored value is readable everywhere."""
    cache = create_cache_service("memory")
    await cache.set("k", [1, 2], ttl=5, jitter=0.5)
    assert await cache.get("k") == [1, 2]
    assert await cache.get("k", as_type=tuple[int, int]) == (1, 2)


async def test_delete_marks_only_its_own_computation_stale() -> None:
    """Deleting one key while two are being computed drops only that result."""
    cache = create_cache_service("memory")
    release = asyncio.Event()

    async def slow(value: str) -> str:
        await release.wait()
        return value

    first = asyncio.create_task(cache.get_or_set("a", lambda: slow("a")))
    second = asyncio.create_task(cache.get_or_set("b", lambda: slow("b")))
    await asyncio.sleep(0.01)
    await cache.delete("a")
    release.set()
    assert await asyncio.gather(first, second) == ["a", "b"]
    assert await cache.get_many(["a", "b"]) == {"b": "b"}


async def test_clear_during_a_computation_drops_its_result() -> None:
    """A value computed across a `clear()` is returned but not stored."""
    cache = create_cache_service("memory")
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "old"

    task = asyncio.create_task(cache.get_or_set("k", slow))
    await asyncio.sleep(0.01)
    await cache.clear()
    release.set()
    assert await task == "old"
    assert not await cache.exists("k")


async def test_lock_waiter_takes_the_value_another_process_stored() -> None:
    """A caller waiting on a held lock returns the value once it appears."""
    cache = create_cache_service("memory")
    await cache.backend.set(cache.config.key_prefix + "#lock:k", b"other", 30)

    async def never() -> int:
        raise AssertionError("the waiter must not compute")

    waiter = asyncio.create_task(cache.get_or_set("k", never, lock=True))
    await asyncio.sleep(0.02)
    await cache.set("k", 7)  # the lock holder (elsewhere) stores its value
    assert await waiter == 7


async def test_lock_waiter_computes_if_the_stored_value_does_not_fit() -> None:
    """A value found after waiting that fails the wanted type is recomputed."""
    cache = create_cache_service("memory")
    await cache.backend.set(cache.config.key_prefix + "#lock:k", b"other", 30)

    async def build() -> int:
        return 5

    waiter = asyncio.create_task(cache.get_or_set("k", build, as_type=int, lock=True))
    await asyncio.sleep(0.02)
    await cache.set("k", "not a number")
    assert await waiter == 5
