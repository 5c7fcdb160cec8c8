"""The cache through its public API, on memory, Redis and a real Redis Cluster.

Every test here takes the `cache` fixture, parametrised over the backends; the
service is built with `fail_open=False`, so a Redis error fails the test
instead of passing silently as a miss.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel, PositiveInt
from sqlalchemy import inspect as sa_inspect

from dotmac_core import (
    AsyncRepository,
    CacheConfig,
    Database,
    TenantError,
    TransactionManager,
    ValidationError,
    tenant_scope,
)
from dotmac_core.cache import (
    CacheService,
    TenantAwareCacheManager,
    cached,
    create_cache_service,
)

from ..models import Member, UserProfile

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", id="redis-cluster", marks=pytest.mark.redis),
]


@dataclass
class Target:
    """Where a test's caches live: backend name, URL(s), a key prefix of its own."""

    backend: Any
    url: str | list[str] | None
    prefix: str

    def make(self, **settings: Any) -> CacheService:
        """Build a service on this target (fail closed unless told otherwise)."""
        settings.setdefault("fail_open", False)
        config = CacheConfig(key_prefix=self.prefix, **settings)
        return create_cache_service(self.backend, url=self.url, config=config)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest) -> Target:
    """A backend to test on; Redis targets use the shared server / test cluster."""
    unique = f"dotmac-test:{uuid.uuid4().hex[:12]}:"
    if request.param == "memory":
        return Target("memory", None, unique)
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return Target("redis", url, request.getfixturevalue("redis_prefix"))
    cluster = request.getfixturevalue("redis_cluster")
    return Target("redis-cluster", cluster.urls, unique)


@pytest.fixture
async def cache(target: Target) -> AsyncIterator[CacheService]:
    """A `CacheService` on each backend; its keys are removed afterwards."""
    service = target.make()
    yield service
    await service.clear()
    await service.aclose()


class Profile(BaseModel):
    """A plain pydantic value."""

    user_id: str
    tags: list[str] = []


class UserService:
    """The handbook's shape: a service holding its cache as `self.cache`."""

    def __init__(self, cache: CacheService | TenantAwareCacheManager) -> None:
        self.cache = cache
        self.calls = 0

    @cached(ttl=60, key="user:{user_id}")
    async def get_user_profile(self, user_id: str) -> UserProfile:
        """Load a profile (counts the calls)."""
        self.calls += 1
        await asyncio.sleep(0.02)
        return UserProfile(display_name=f"user {user_id}", email=f"{user_id}@x.io")

    @cached(ttl=60)
    async def score(self, user_id: str) -> int:
        """A value that depends on the tenant context (counts the calls)."""
        self.calls += 1
        return len(user_id)


# --- the basic operations -------------------------------------------------------------


async def test_reports_backend_name(cache: CacheService, target: Target) -> None:
    """`backend_name` names the backend and `config` is the effective config."""
    assert cache.backend_name == target.backend
    assert cache.config.backend == target.backend
    assert cache.config.key_prefix == target.prefix


async def test_set_get_round_trips_json_values(cache: CacheService) -> None:
    """Values come back as their JSON form; a miss returns the default."""
    await cache.set("a", {"n": 1, "items": [1, "2", None]}, ttl=30)
    assert await cache.get("a") == {"n": 1, "items": [1, "2", None]}
    assert await cache.get("missing") is None
    assert await cache.get("missing", "default") == "default"


async def test_none_is_cached_apart_from_a_miss(cache: CacheService) -> None:
    """A stored `None` is a hit, distinct from a miss."""
    miss = object()
    await cache.set("none", None)
    assert await cache.get("none", miss) is None
    assert await cache.exists("none")
    assert await cache.get("absent", miss) is miss
    assert not await cache.exists("absent")


async def test_as_type_validates_models(cache: CacheService) -> None:
    """`as_type` turns the stored JSON back into the model."""
    await cache.set("p", Profile(user_id="u1", tags=["a"]))
    value = await cache.get("p", as_type=Profile)
    assert value == Profile(user_id="u1", tags=["a"])
    assert await cache.get("p") == {"user_id": "u1", "tags": ["a"]}


async def test_value_of_another_shape_is_a_miss(cache: CacheService) -> None:
    """A value that no longer validates (schema changed) reads as a miss."""
    await cache.set("old", {"unrelated": True})
    assert await cache.get("old", "miss", as_type=Profile) == "miss"
    assert await cache.get_many(["old"], as_type=Profile) == {}


async def test_undecodable_bytes_are_a_miss(cache: CacheService) -> None:
    """Foreign or corrupt bytes under a key read as a miss, never as an error."""
    key = cache.config.key_prefix + "poisoned"
    await cache.backend.set(key, b"\x80\x04\x95 not our envelope", 30)
    assert await cache.get("poisoned", "miss") == "miss"
    assert not await cache.exists("poisoned")
    await cache.backend.set(key, b"dmc1||{not json", 30)
    assert await cache.get("poisoned", "miss") == "miss"


async def test_many_operations(cache: CacheService) -> None:
    """`set_many`, `get_many` and `delete_many` work on many keys at once."""
    values = {f"k{i}": i for i in range(30)}
    await cache.set_many(values, ttl=30)
    assert await cache.get_many([*values, "nope"]) == values
    await cache.delete_many([f"k{i}" for i in range(10)])
    left = await cache.get_many(values)
    assert left == {f"k{i}": i for i in range(10, 30)}
    assert await cache.get_many([]) == {}
    await cache.delete_many([])
    await cache.backend.delete_many([])


async def test_delete_removes_a_key(cache: CacheService) -> None:
    """`delete` removes one key and leaves the others."""
    await cache.set_many({"x": 1, "y": 2})
    await cache.delete("x")
    assert await cache.get_many(["x", "y"]) == {"y": 2}


async def test_entries_expire(cache: CacheService) -> None:
    """An entry is gone after its TTL (jitter only shortens it)."""
    await cache.set("short", 1, ttl=0.05, jitter=0.5)
    await cache.set("long", 2, ttl=30, jitter=0.1)
    await asyncio.sleep(0.15)
    assert await cache.get_many(["short", "long"]) == {"long": 2}


async def test_keys_starting_with_hash_are_user_keys(cache: CacheService) -> None:
    """A user key may start with `#`; it cannot reach the cache's own records."""
    await cache.set("#ns:users", "mine")
    await cache.set("k", "plain", namespace="users")
    await cache.invalidate_namespace("users")
    assert await cache.get("#ns:users") == "mine"
    assert await cache.get("k", namespace="users") is None


async def test_clear_removes_many_entries(cache: CacheService) -> None:
    """`clear` removes more entries than one delete batch holds."""
    await cache.set_many({f"k{i}": i for i in range(1200)}, ttl=60)
    await cache.clear()
    assert await cache.get_many([f"k{i}" for i in range(1200)]) == {}


async def test_clear_removes_every_entry(cache: CacheService) -> None:
    """`clear` removes plain, namespaced and tenant entries of this prefix."""
    tenants = TenantAwareCacheManager(cache)
    await cache.set("a", 1)
    await cache.set("b", 2, namespace="ns")
    await tenants.set("c", 3, tenant_id="acme")
    await cache.clear()
    assert await cache.get("a") is None
    assert await cache.get("b", namespace="ns") is None
    assert await tenants.get("c", tenant_id="acme") is None


# --- namespaces -----------------------------------------------------------------------


async def test_invalidate_namespace_drops_only_that_namespace(
    cache: CacheService,
) -> None:
    """Invalidating a namespace misses its entries; others and plain keys stay."""
    await cache.set_many({"1": "a", "2": "b"}, namespace="users")
    await cache.set("1", "x", namespace="orders")
    await cache.set("1", "plain")
    await cache.invalidate_namespace("users")
    assert await cache.get_many(["1", "2"], namespace="users") == {}
    assert await cache.get("1", namespace="orders") == "x"
    assert await cache.get("1") == "plain"
    await cache.set("1", "new", namespace="users")
    assert await cache.get("1", namespace="users") == "new"
    assert await cache.exists("1", namespace="users")


async def test_namespace_names_cannot_collide(cache: CacheService) -> None:
    """Namespaces `a:b` and `a` (with key `b:k`) are different places."""
    await cache.set("k", 1, namespace="a:b")
    await cache.set("b:k", 2, namespace="a")
    assert await cache.get("k", namespace="a:b") == 1
    assert await cache.get("b:k", namespace="a") == 2


# --- read-through ---------------------------------------------------------------------


async def test_get_or_set_computes_once_and_hits_after(cache: CacheService) -> None:
    """`get_or_set` stores the factory's value; `as_type` keeps the type on hits."""
    calls = 0

    async def build() -> Profile:
        nonlocal calls
        calls += 1
        return Profile(user_id="u")

    first = await cache.get_or_set("gs", build, ttl=30, as_type=Profile)
    second = await cache.get_or_set("gs", build, ttl=30, as_type=Profile)
    assert first == second == Profile(user_id="u")
    assert calls == 1


async def test_twenty_concurrent_misses_run_the_function_once(
    cache: CacheService,
) -> None:
    """20 concurrent misses for one key make one call; all get the value."""
    service = UserService(cache)
    results = await asyncio.gather(*(service.get_user_profile("u1") for _ in range(20)))
    assert service.calls == 1
    assert {r.email for r in results} == {"u1@x.io"}
    assert len({id(r) for r in results}) == 20  # each caller has its own object


async def test_cached_sqlmodel_round_trip(cache: CacheService) -> None:
    """A `table=True` SQLModel comes back as that class, detached, equal fields."""
    service = UserService(cache)
    made = await service.get_user_profile("u2")
    hit = await service.get_user_profile("u2")
    assert service.calls == 1
    assert type(hit) is UserProfile
    assert hit is not made
    assert hit.model_dump() == made.model_dump()
    assert sa_inspect(hit).detached
    assert await cache.get("user:u2", as_type=UserProfile) == hit


async def test_delete_after_update_invalidates_cached(cache: CacheService) -> None:
    """The handbook's `cache.delete(f"user:{user_id}")` drops the @cached entry."""
    service = UserService(cache)
    await service.get_user_profile("u3")
    await cache.delete("user:u3")
    await service.get_user_profile("u3")
    await service.get_user_profile.invalidate("u3")
    await service.get_user_profile("u3")
    assert service.calls == 3


async def test_lock_serialises_misses_across_services(
    cache: CacheService, target: Target
) -> None:
    """With `lock=True`, two services (two processes' worth) compute once."""
    shared_memory = target.backend == "memory"
    # Two services with their own single-flight maps over one store.
    other = (
        CacheService(cache.backend, cache.config) if shared_memory else target.make()
    )
    calls = 0

    async def build() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return 42

    try:
        results = await asyncio.gather(
            *(
                svc.get_or_set("locked", build, lock=True, lock_timeout=5)
                for svc in (cache, other)
                for _ in range(5)
            )
        )
    finally:
        if not shared_memory:
            await other.aclose()
    assert results == [42] * 10
    assert calls == 1
    assert await cache.backend.get(cache.config.key_prefix + "#lock:locked") is None


async def test_lock_the_server_refuses_means_computing_without_it(
    target: Target,
) -> None:
    """If taking the lock fails (an expiry Redis refuses), the call still answers."""
    cache = target.make(fail_open=True)

    async def build() -> str:
        return "computed"

    try:
        got = await cache.get_or_set("refused", build, lock=True, lock_timeout=1e17)
        assert got == "computed"
    finally:
        await cache.clear()
        await cache.aclose()


async def test_lock_waiters_compute_after_the_wait(cache: CacheService) -> None:
    """A lock held past `lock_timeout` makes the waiter compute by itself."""
    lock_key = cache.config.key_prefix + "#lock:stuck"
    await cache.backend.set(lock_key, b"someone-else", 30)

    async def build() -> str:
        return "computed"

    assert await cache.get_or_set("stuck", build, lock=True, lock_timeout=0.1) == (
        "computed"
    )


async def test_invalidation_during_a_miss_is_not_overwritten(
    cache: CacheService,
) -> None:
    """A value computed before a delete / namespace invalidation is not stored."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "old"

    for namespace in (None, "ns"):
        started.clear()
        release.clear()
        task = asyncio.create_task(cache.get_or_set("race", slow, namespace=namespace))
        await started.wait()
        if namespace is None:
            await cache.delete("race")
        else:
            await cache.invalidate_namespace(namespace)
        release.set()
        assert await task == "old"  # the caller still gets its result ...
        assert not await cache.exists("race", namespace=namespace)  # ... unstored


async def test_value_that_does_not_round_trip_is_recomputed(
    cache: CacheService,
) -> None:
    """A result that fails its own annotation is returned but never served."""
    calls = 0

    @cached(ttl=30, key="neg", cache=cache)
    async def negative() -> PositiveInt:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return -1  # type: ignore[return-value]

    assert await asyncio.gather(negative(), negative()) == [-1, -1]
    assert await negative() == -1
    assert calls == 3


async def test_failing_function_shares_its_error_and_caches_nothing(
    cache: CacheService,
) -> None:
    """Concurrent callers of a failing miss get its error; nothing is stored."""
    calls = 0

    @cached(ttl=30, key="boom", cache=cache)
    async def boom() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)  # the others reach the cache meanwhile
        raise LookupError("nope")

    results = await asyncio.gather(boom(), boom(), boom(), return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)
    assert calls == 1
    assert not await cache.exists("boom")


@pytest.mark.parametrize("fails", [False, True], ids=["value", "error"])
async def test_a_miss_read_before_the_store_joins_the_finished_computation(
    cache: CacheService, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """A caller whose miss comes back after the computation ended shares its outcome.

    Its read went out while the key was missing, so it is a miss; the first
    caller computed, stored and returned meanwhile. Computing again would
    run the function twice for one miss.
    """
    calls = 0
    missed = asyncio.Event()

    async def build() -> int:
        nonlocal calls
        calls += 1
        await missed.wait()  # the second caller's read is back, a miss
        if fails:
            raise LookupError("nope")
        return 7

    first = asyncio.ensure_future(cache.get_or_set("late", build, ttl=30))
    real_get = cache.backend.get

    delayed = []

    async def get_late(key: str) -> bytes | None:
        raw = await real_get(key)
        if asyncio.current_task() is second:
            missed.set()
            await asyncio.wait([first])  # the read returns after the first caller
            delayed.append(raw)
        return raw

    monkeypatch.setattr(cache.backend, "get", get_late)
    second = asyncio.ensure_future(cache.get_or_set("late", build, ttl=30))
    results = await asyncio.gather(first, second, return_exceptions=True)
    monkeypatch.undo()
    assert delayed == [None]  # the second caller's read was a miss
    assert calls == 1
    if fails:
        assert all(isinstance(r, LookupError) for r in results)
    else:
        assert results == [7, 7]
    # Nothing is kept once the late reader is back: the next miss computes.
    await cache.delete("late")
    again = await asyncio.gather(
        cache.get_or_set("late", build, ttl=30), return_exceptions=True
    )
    assert calls == 2
    assert isinstance(again[0], LookupError) if fails else again == [7]


async def test_a_miss_read_after_the_computation_ended_computes_again(
    cache: CacheService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished computation kept for a late reader is not served to newcomers.

    While one caller's read is still out, the computation it would join has
    failed; a caller that begins afterwards computes again (it would
    otherwise get the old error for as long as reads overlap).
    """
    calls = 0
    missed, release = asyncio.Event(), asyncio.Event()

    async def build() -> int:
        nonlocal calls
        calls += 1
        await missed.wait()
        if calls == 1:
            raise LookupError("nope")
        return 7

    first = asyncio.ensure_future(cache.get_or_set("again", build, ttl=30))
    real_get = cache.backend.get

    async def get_late(key: str) -> bytes | None:
        raw = await real_get(key)
        if asyncio.current_task() is second:
            missed.set()
            await release.wait()
        return raw

    monkeypatch.setattr(cache.backend, "get", get_late)
    second = asyncio.ensure_future(cache.get_or_set("again", build, ttl=30))
    with pytest.raises(LookupError):
        await first
    assert await cache.get_or_set("again", build, ttl=30) == 7  # began after
    release.set()
    # Its read, a miss, began before both computations ended: it joins the
    # latest, computing nothing itself.
    assert await second == 7
    assert calls == 2


async def test_cancelled_leader_hands_over_to_a_waiter(cache: CacheService) -> None:
    """If the computing caller is cancelled, a waiting caller computes instead."""
    calls = 0
    started = asyncio.Event()

    async def build() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0.05)
        return calls

    leader = asyncio.create_task(cache.get_or_set("handover", build))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_set("handover", build))
    await asyncio.sleep(0)
    leader.cancel()
    assert await follower == 2
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_unencodable_value_raises_validation_error(
    cache: CacheService,
) -> None:
    """A value with no JSON form is refused with `ValidationError`, not pickled."""
    with pytest.raises(ValidationError):
        await cache.set("obj", object())


# --- tenants --------------------------------------------------------------------------


async def test_tenant_a_never_sees_tenant_b_values(cache: CacheService) -> None:
    """The same @cached call under two tenants computes and keeps two values."""
    service = UserService(TenantAwareCacheManager(cache))
    with tenant_scope("tenant-a"):
        a = await service.score("abc")
        await service.cache.set("k", "a-value")
    with tenant_scope("tenant-b"):
        assert await service.cache.get("k") is None
        b = await service.score("abc")
    assert a == b == 3
    assert service.calls == 2
    with tenant_scope("tenant-a"):
        assert await service.cache.get("k") == "a-value"


async def test_invalidate_tenant_leaves_other_tenants(cache: CacheService) -> None:
    """`invalidate_tenant` misses one tenant's entries; others keep theirs."""
    tenants = TenantAwareCacheManager(cache)
    for tenant in ("a", "b"):
        await tenants.set_many({"x": tenant, "y": tenant}, tenant_id=tenant)
        await tenants.set("z", tenant, tenant_id=tenant, namespace="ns")
    await tenants.invalidate_tenant("a")
    assert await tenants.get_many(["x", "y"], tenant_id="a") == {}
    assert await tenants.get("z", tenant_id="a", namespace="ns") is None
    assert await tenants.get_many(["x", "y"], tenant_id="b") == {"x": "b", "y": "b"}
    assert await tenants.get("z", tenant_id="b", namespace="ns") == "b"


async def test_tenant_operations(cache: CacheService) -> None:
    """Every manager operation is scoped to the tenant from argument or context."""
    tenants = TenantAwareCacheManager(cache)
    with tenant_scope("acme"):
        await tenants.set("p", Profile(user_id="1"), ttl=30)
        assert await tenants.get("p", as_type=Profile) == Profile(user_id="1")
        assert await tenants.exists("p")
        assert await tenants.get("p", tenant_id="other") is None
        await tenants.delete("p")
        assert not await tenants.exists("p")
        await tenants.set("n", 1, namespace="ns")
        await tenants.invalidate_namespace("ns")
        assert await tenants.get("n", namespace="ns") is None

        async def build() -> Profile:
            return Profile(user_id="2")

        got = await tenants.get_or_set("g", build, as_type=Profile)
        assert got == await tenants.get_or_set("g", build, as_type=Profile)
        await tenants.delete_many(["g"])
        assert await tenants.get_many(["g"]) == {}


async def test_tenant_ids_with_separators_do_not_collide(cache: CacheService) -> None:
    """Ids with `:`, braces or spaces get their own keys and cannot hijack others."""
    tenants = TenantAwareCacheManager(cache)
    ids = ["a", "a:b", "a}:{b", "{a}", "a b", "a%3Ab", "é"]
    for tenant in ids:
        await tenants.set("k", tenant, tenant_id=tenant)
        await tenants.set("b:k", f"{tenant}+", tenant_id=tenant)
    for tenant in ids:
        assert await tenants.get("k", tenant_id=tenant) == tenant
        assert await tenants.get("b:k", tenant_id=tenant) == f"{tenant}+"


async def test_no_tenant_raises_before_touching_the_cache(
    cache: CacheService,
) -> None:
    """Without a tenant, tenant-scoped reads, writes and @cached raise TenantError."""
    tenants = TenantAwareCacheManager(cache)
    service = UserService(tenants)
    with pytest.raises(TenantError):
        await tenants.get("k")
    with pytest.raises(TenantError):
        await tenants.set("k", 1)
    with pytest.raises(TenantError):
        await service.score("x")
    assert service.calls == 0


async def test_tenant_flag_scopes_a_plain_service(cache: CacheService) -> None:
    """`@cached(tenant=True)` on a plain service keys by the current tenant."""
    calls = 0

    @cached(ttl=30, key="report", cache=cache, tenant=True)
    async def report() -> str:
        nonlocal calls
        calls += 1
        return f"for {calls}"

    with tenant_scope("a"):
        assert await report() == "for 1"
        assert await report() == "for 1"
    with tenant_scope("b"):
        assert await report() == "for 2"
        await report.invalidate()
        assert await report() == "for 3"
    with pytest.raises(TenantError):
        await report()


class _Members(AsyncRepository[Member]):
    """Members, for the invalidate-after-commit tests."""


@pytest.mark.usefixtures("repo_db")
async def test_invalidation_waits_for_commit(cache: CacheService) -> None:
    """A delete inside a transaction happens after the commit, on every backend."""
    await cache.set("member:1", {"name": "old"})
    async with TransactionManager():
        await cache.delete("member:1")
        await cache.invalidate_namespace("members")
        # Until the commit, readers still get the value the database still has.
        assert await cache.get("member:1") == {"name": "old"}
    assert await cache.get("member:1") is None


@pytest.mark.usefixtures("repo_db")
async def test_invalidation_is_dropped_on_rollback(cache: CacheService) -> None:
    """A transaction that rolls back leaves the cache as it was."""
    await cache.set("member:2", {"name": "kept"})
    with pytest.raises(RuntimeError):
        async with TransactionManager():
            await cache.delete_many(["member:2"])
            raise RuntimeError
    assert await cache.get("member:2") == {"name": "kept"}


@pytest.mark.usefixtures("repo_db")
async def test_update_then_invalidate_never_serves_the_old_row(
    cache: CacheService,
) -> None:
    """The handbook pattern: update, delete the key; readers see the new row."""
    reads = 0

    @cached(ttl=60, key="member:{member_id}", cache=cache)
    async def get_member(member_id: str) -> Member | None:
        nonlocal reads
        reads += 1
        return await _Members().get_by_id(member_id)

    with tenant_scope("acme"):
        member = await _Members().create({"email": "c@x", "name": "Old"})
        assert (await get_member(str(member.id))).name == "Old"  # type: ignore[union-attr]
        async with TransactionManager():
            await _Members().update(member.id, {"name": "New"})
            await cache.delete(f"member:{member.id}")
            # A reader during the transaction re-caches the committed old row...
            assert (await get_member(str(member.id))).name == "Old"  # type: ignore[union-attr]
        # ...which the delete after commit removes again.
        fresh = await get_member(str(member.id))
        assert fresh is not None
        assert fresh.name == "New"


async def test_invalidation_after_commit_can_be_switched_off() -> None:
    """With `invalidate_after_commit=False` a delete in a transaction is immediate."""
    config = CacheConfig(backend="memory", invalidate_after_commit=False)
    service = create_cache_service(config=config)
    db = Database("sqlite+aiosqlite://")
    await service.set("k", 1)
    async with TransactionManager(db):
        await service.delete("k")
        assert await service.get("k") is None
    await db.dispose()
    await service.aclose()
