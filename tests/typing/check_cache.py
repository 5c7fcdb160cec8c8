"""Uses the cache API as users will; type-checked by mypy, never run."""

from __future__ import annotations

from typing import Any, assert_type

from dotmac_core import CacheConfig
from dotmac_core.cache import (
    BoundCachedFunction,
    CachedFunction,
    CacheService,
    MemoryBackend,
    TenantAwareCacheManager,
    cached,
    configure_cache,
    create_cache_service,
    get_cache,
)
from dotmac_core.db.models import DBBaseModel


class Profile(DBBaseModel):
    """A schema returned by cached functions."""

    name: str


@cached(ttl=60, key="profile:{user_id}")
async def load_profile(user_id: str, *, fresh: bool = False) -> Profile:
    """A cached module-level function."""
    return Profile(name=user_id)


class ProfileService:
    """The handbook's service shape: `self.cache` is used by `@cached`."""

    def __init__(self, cache: CacheService) -> None:
        self.cache = cache

    @cached(ttl=300, key="user:{user_id}")
    async def get_profile(self, user_id: str) -> Profile | None:
        """A cached method."""
        return None

    @cached(ttl=30)
    async def count(self, tenant: str, limit: int = 10) -> int:
        """Default key from the arguments."""
        return limit


async def use_cache() -> None:
    """Exercise the typed surface."""
    cache = create_cache_service("memory", config=CacheConfig(key_prefix="t:"))
    assert_type(cache, CacheService)
    assert_type(configure_cache(cache), CacheService)
    assert_type(get_cache(), CacheService)
    own = CacheService(MemoryBackend(max_entries=10))
    name: str = own.backend_name
    settings: CacheConfig = own.config

    function: CachedFunction[..., Profile] = load_profile
    profile = await load_profile("u1")
    assert_type(profile, Profile)
    await load_profile.invalidate("u1", fresh=True)

    service = ProfileService(cache)
    method: BoundCachedFunction[..., Profile | None] = service.get_profile
    maybe = await service.get_profile("u1")
    assert_type(maybe, Profile | None)
    await service.get_profile.invalidate("u1")
    assert_type(await service.count("t", limit=3), int)

    raw: Any = await cache.get("k")
    typed = await cache.get("k", as_type=Profile)
    assert_type(typed, Profile | None)
    with_default = await cache.get("k", 0, as_type=int)
    assert_type(with_default, int)

    async def build() -> Profile:
        return Profile(name="x")

    assert_type(await cache.get_or_set("k", build, as_type=Profile), Profile)
    await cache.set("k", {"a": 1}, 30, jitter=0.1, namespace="ns")
    await cache.invalidate_namespace("ns")

    tenants = TenantAwareCacheManager(cache)
    await tenants.set("user:1", {"a": 1}, tenant_id="acme")
    assert_type(await tenants.get("user:1", as_type=Profile), Profile | None)
    await tenants.invalidate_tenant("acme")
    print(raw, name, settings, function, method)


async def misuse() -> None:
    """Wrong calls are type errors (an unneeded ignore would fail mypy)."""
    await load_profile(1)  # type: ignore[arg-type]
    await load_profile.invalidate()  # type: ignore[call-arg]
    service = ProfileService(create_cache_service())
    await service.get_profile("u", "extra")  # type: ignore[call-arg]
