import asyncio
import uuid

from sqlmodel import Field

from dotmac_core import (
    CacheService,
    Database,
    DBBaseModel,
    TenantAwareCacheManager,
    TenantError,
    cached,
    create_cache_service,
    require_current_tenant,
    tenant_scope,
)


# --8<-- [start:service]
class UserProfile(DBBaseModel, table=True):
    display_name: str = Field(max_length=100)
    email: str = Field(max_length=255)


class UserService:
    def __init__(self, db: Database, cache: CacheService) -> None:
        self.db = db
        self.cache = cache  # @cached finds it here
        self.loads = 0

    @cached(ttl=300, key="user:{user_id}")
    async def get_user_profile(self, user_id: uuid.UUID) -> UserProfile | None:
        """Load a profile; cached for five minutes."""
        self.loads += 1  # counts the database reads
        async with self.db.session() as session:
            return await session.get(UserProfile, user_id)

    async def update_user(self, user_id: uuid.UUID, display_name: str) -> None:
        """Rename a user, then drop the cached profile."""
        async with self.db.session() as session:
            user = await session.get(UserProfile, user_id)
            assert user is not None
            user.display_name = display_name
            await session.commit()
        # Invalidate after the update has committed, so no reader can put the
        # old row back into the cache.
        await self.cache.delete(f"user:{user_id}")


# --8<-- [end:service]


async def user_profiles(db: Database, cache: CacheService) -> None:
    """Hits, single flight, a cached `None`, and invalidation after an update."""
    ada = UserProfile(display_name="Ada", email="ada@example.com")
    async with db.session() as session:
        session.add(ada)
        await session.commit()
    users = UserService(db, cache)

    # --8<-- [start:hits]
    first = await users.get_user_profile(ada.id)  # a miss: read from the database
    again = await users.get_user_profile(ada.id)  # a hit: no database read
    assert users.loads == 1
    assert isinstance(again, UserProfile)  # the table class, not a dict
    assert again == first

    # Twenty concurrent misses for one key run the function once.
    await users.get_user_profile.invalidate(ada.id)
    results = await asyncio.gather(*(users.get_user_profile(ada.id) for _ in range(20)))
    assert users.loads == 2
    assert {r.display_name for r in results if r is not None} == {"Ada"}

    # "Not found" is cached too: None is a value, not a miss.
    nobody = uuid.uuid4()
    assert await users.get_user_profile(nobody) is None
    assert await users.get_user_profile(nobody) is None
    assert users.loads == 3
    # --8<-- [end:hits]

    # --8<-- [start:update]
    await users.update_user(ada.id, "Ada Lovelace")
    profile = await users.get_user_profile(ada.id)  # re-read after invalidation
    assert profile is not None
    assert profile.display_name == "Ada Lovelace"
    assert users.loads == 4
    # --8<-- [end:update]
    print(f"user profiles: {users.loads} database reads for 25 calls")


# --8<-- [start:tenants]
class ReportService:
    def __init__(self, cache: TenantAwareCacheManager) -> None:
        self.cache = cache  # a tenant-aware cache: keys belong to one tenant
        self.runs = 0

    @cached(ttl=60, key="open-invoices")
    async def open_invoice_count(self) -> int:
        """Count the current tenant's open invoices (a stand-in query)."""
        self.runs += 1
        return {"acme": 3, "globex": 5}[require_current_tenant()]


async def tenant_aware(cache: CacheService) -> None:
    """Each tenant has its own entries; one tenant is invalidated in O(1)."""
    tenants = TenantAwareCacheManager(cache)
    reports = ReportService(tenants)
    with tenant_scope("acme"):
        assert await reports.open_invoice_count() == 3
        assert await reports.open_invoice_count() == 3  # a hit
    with tenant_scope("globex"):
        assert await reports.open_invoice_count() == 5  # never acme's value
    assert reports.runs == 2

    # The tenant can also be given explicitly.
    await tenants.set("user:123", {"plan": "pro"}, tenant_id="acme")
    assert await tenants.get("user:123", tenant_id="acme") == {"plan": "pro"}
    assert await tenants.get("user:123", tenant_id="globex") is None

    await tenants.invalidate_tenant("acme")  # one write, however many keys
    assert await tenants.get("user:123", tenant_id="acme") is None
    with tenant_scope("globex"):
        assert await reports.open_invoice_count() == 5  # globex kept its entry
    assert reports.runs == 2

    try:
        await reports.open_invoice_count()  # no tenant: refused, never shared
    except TenantError:
        pass
    else:
        msg = "a tenant-scoped cache answered without a tenant"
        raise AssertionError(msg)
    # --8<-- [end:tenants]
    print("tenant-aware caching: acme and globex never share an entry")


async def main() -> None:
    """Run each pattern on the memory backend; every check is an assert."""
    cache = create_cache_service("memory")
    async with Database("sqlite+aiosqlite:///caching.db") as db:
        await db.create_all()
        await user_profiles(db, cache)
    await tenant_aware(cache)
    await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
