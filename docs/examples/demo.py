"""dotmac_core demo on the embedded default: a SQLite file and the memory cache.

Run it with `python docs/examples/demo.py` (the README's first command). It
reads the same `DOTMAC_*` environment variables as any service would, so
`DOTMAC_DB_URL=postgresql://postgres@127.0.0.1/test` runs it on PostgreSQL.
"""

import asyncio
import tempfile
from pathlib import Path

from sqlmodel import Field

from dotmac_core import (
    AsyncRepository,
    AuditMixin,
    BusinessRuleError,
    CacheConfig,
    Database,
    DatabaseConfig,
    DBBaseModel,
    NotFoundError,
    SecurityConfig,
    TenantBaseModel,
    TenantError,
    TransactionManager,
    cached,
    configure_cache,
    configure_database,
    create_cache_service,
    get_tenant_context,
    require_current_tenant,
    tenant_scope,
)


# --8<-- [start:models]
class Team(DBBaseModel, table=True):
    """A plain table: id, created_at, updated_at, and its own column."""

    name: str = Field(max_length=100, unique=True)


class CustomerAccount(TenantBaseModel, AuditMixin, table=True):
    """A tenant-owned, audited table; its name is `customer_account`."""

    name: str = Field(max_length=100)
    balance_cents: int = 0


# --8<-- [end:models]


def show_configuration(db_config: DatabaseConfig) -> None:
    """Print the effective settings; secrets print as '**********'."""
    print("== configuration (from DOTMAC_* variables and defaults)")
    print(f"  database : {db_config.sqlalchemy_url()!r}")
    print(f"  cache    : {CacheConfig().backend}")
    security = SecurityConfig()
    print(f"  secret   : {security.secret_key}  (a SecretStr never prints)")


async def show_tables(db: Database) -> None:
    """Create the example tables and list them with their columns."""
    await db.create_all()
    print("== tables")
    for model in (Team, CustomerAccount):
        table = model.__table__  # type: ignore[attr-defined]
        columns = ", ".join(column.name for column in table.columns)
        print(f"  {table.name}: {columns}")


async def show_tenancy(db: Database) -> None:
    """Stamp rows from the tenant context and show the context in child tasks."""
    print("== tenant context")
    try:
        require_current_tenant()
    except TenantError as exc:
        print(f"  outside a scope: TenantError({exc.message!r})")
    for tenant, user in (("acme", "alice"), ("globex", "bob")):
        with tenant_scope(tenant, user_id=user, roles=("admin",)):
            account = CustomerAccount(name=f"{tenant} main account")
            async with db.session() as session:
                session.add(account)
                await session.commit()
            seen_by_child = await asyncio.create_task(_tenant_in_child_task())
            print(
                f"  {tenant}: row {account.id} tenant_id={account.tenant_id} "
                f"created_by={account.created_by}; child task sees {seen_by_child}"
            )
    before = account.updated_at
    async with db.session() as session:
        account.balance_cents = 500
        session.add(account)
        with tenant_scope("globex", user_id="carol"):
            await session.commit()
    print(
        f"  update by carol: updated_by={account.updated_by}, "
        f"updated_at moved: {account.updated_at > before}"
    )


class CustomerRepository(AsyncRepository[CustomerAccount]):
    """Customers of the current tenant."""


async def show_repositories() -> None:
    """Add customers for two tenants, page through them, and show isolation."""
    print("== repositories")
    repo = CustomerRepository()
    for tenant in ("acme", "globex"):
        with tenant_scope(tenant, user_id="importer"):
            rows = await repo.create_many(
                {"name": f"{tenant} customer {i:02d}", "balance_cents": 1000}
                for i in range(25)
            )
            print(f"  {tenant}: added {len(rows)} customers in one batched insert")
    with tenant_scope("acme"):
        page = await repo.list_paginated(page=2, size=10, order_by="name")
        names = ", ".join(c.name.rsplit(" ", 1)[1] for c in page.items)
        print(
            f"  acme page {page.page}/{page.pages} of {page.total}: {names} "
            f"(has_next={page.has_next})"
        )
        cursor, pages = None, 0
        while True:
            keyset = await repo.list_after(cursor, size=10, order_by="name")
            pages += 1
            cursor = keyset.next_cursor
            if cursor is None:
                break
        print(f"  acme keyset pages of 10: {pages}")
        acme_row = page.items[0]
    with tenant_scope("globex"):
        print(
            f"  globex sees {await repo.count()} customers; "
            f"acme's {acme_row.name!r}: {await repo.get_by_id(acme_row.id)}"
        )


async def transfer(from_id: object, to_id: object, cents: int) -> None:
    """Move money between two accounts in one transaction (the handbook's example)."""
    repo = CustomerRepository()
    async with TransactionManager():
        source = await repo.get_by_id(from_id)
        target = await repo.get_by_id(to_id)
        if source is None or target is None:
            raise NotFoundError("account not found")
        await repo.update(source.id, {"balance_cents": source.balance_cents - cents})
        await repo.update(target.id, {"balance_cents": target.balance_cents + cents})
        if source.balance_cents - cents < 0:
            raise BusinessRuleError("insufficient balance")


async def show_transfer() -> None:
    """A transfer commits as a whole; a failing one leaves both balances alone."""
    print("== transactions")
    repo = CustomerRepository()
    with tenant_scope("acme", user_id="alice"):
        first, second = await repo.list(order_by="name", limit=2)
        await transfer(first.id, second.id, 250)
        try:
            await transfer(first.id, second.id, 5000)
        except BusinessRuleError as exc:
            print(f"  second transfer refused: {exc.message}; nothing was written")
        balances = [
            (await repo.get_one(id=row.id)).balance_cents for row in (first, second)
        ]
    print(f"  balances after one transfer of 250: {balances}")


async def show_cache() -> None:
    """Cache a customer lookup per tenant; the second call is a hit."""
    print("== cache")
    cache = configure_cache(create_cache_service(config=CacheConfig()))
    lookups = 0

    @cached(ttl=60, key="customer:{name}", tenant=True)  # keys kept per tenant
    async def customer_by_name(name: str) -> CustomerAccount | None:
        nonlocal lookups
        lookups += 1
        return await CustomerRepository().get_by_field("name", name)

    with tenant_scope("acme"):
        await customer_by_name("acme customer 03")
        hit = await customer_by_name("acme customer 03")
    assert hit is not None
    print(
        f"  {cache.backend_name} cache: two calls, {lookups} database lookup; "
        f"the hit came back as {type(hit).__name__} {hit.name!r}"
    )
    with tenant_scope("globex"):
        other = await customer_by_name("acme customer 03")
    print(f"  same key for globex: its own lookup ({lookups} in all), found {other}")
    await cache.aclose()


async def _tenant_in_child_task() -> str | None:
    context = get_tenant_context()
    return None if context is None else context.tenant_id


async def main() -> None:
    """Run every part of the demo against the configured database."""
    with tempfile.TemporaryDirectory(prefix="dotmac-demo-") as workdir:
        db_config = DatabaseConfig()
        if db_config.url is None and db_config.dialect == "sqlite":
            # The embedded default: a fresh SQLite file for each run.
            db_config = DatabaseConfig(database=str(Path(workdir) / "demo.db"))
        show_configuration(db_config)
        async with Database(db_config) as db:
            configure_database(db)
            await db.drop_all()
            await show_tables(db)
            await show_tenancy(db)
            await show_repositories()
            await show_transfer()
            await show_cache()
            await db.drop_all()
    print("== done")


if __name__ == "__main__":
    asyncio.run(main())
