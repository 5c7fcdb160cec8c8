"""Row-level security: raw SQL through the toolkit sees one tenant (PostgreSQL).

The module makes a throwaway database and two throwaway LOGIN roles on the
server: `app` (no superuser, no BYPASSRLS, owns nothing) and `keeper`
(likewise, but made owner of one table to show what `FORCE` does). The tables
are created by the suite's superuser, the policies applied, and a second
`Database` connects as `app` with row-level security enabled. Database and
roles are dropped afterwards. The tests commit for real; every row is deleted
after each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy import Column, MetaData, String, Table, insert, text
from sqlalchemy.engine import URL, make_url

from dotmac_core import (
    AsyncRepository,
    ConfigurationError,
    Database,
    DatabaseError,
    DBBaseModel,
    TenantError,
    TransactionManager,
    ValidationError,
    apply_row_level_security,
    configure_database,
    enable_row_level_security,
    row_level_security_ddl,
    tenant_scope,
)

from ..conftest import PG_URL, Route, _observe_statements, service_unavailable
from ..models import Invoice, Member, Shipment, Squad, Tag, User

A, B = "tenant-a", "tenant-b"
#: Tables of the tests' models with and without `tenant_id` (others may join).
TENANT_TABLES = {"invoice", "member", "shipment", "squad", "user"}
PLAIN_TABLES = {"invoice_line", "tag", "user_login_log", "user_profile"}
postgres = pytest.mark.postgres


class Invoices(AsyncRepository[Invoice]):
    """Invoices of the current tenant."""


@dataclass
class Setup:
    """The module's database, seen as its superuser owner and as the app role."""

    url: URL
    owner: Database
    app: Database
    role: str
    keeper: str

    def as_role(self, role: str, **options: Any) -> Database:
        """A new `Database` on the module's database, connected as `role`."""
        return Database(self.url.set(username=role, password=None), **options)


async def _server(*statements: str) -> None:
    """Run `statements` on the server's own database, as the suite's superuser."""
    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database="postgres",
        timeout=5,
    )
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def rls() -> AsyncIterator[Setup]:
    """A database with policies on every tenant table and an app role to use it."""
    suffix = uuid4().hex[:12]
    name, role, keeper = f"dotmac_rls_{suffix}", f"rls_app_{suffix}", f"rls_k_{suffix}"
    try:
        await _server(
            f'CREATE DATABASE "{name}"',
            f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOBYPASSRLS',
            f'CREATE ROLE "{keeper}" LOGIN NOSUPERUSER NOBYPASSRLS',
        )
    except (OSError, asyncpg.PostgresError) as exc:
        service_unavailable("PostgreSQL", PG_URL, exc)
    url = make_url(PG_URL).set(database=name)
    owner = Database(url, pool_size=2, max_overflow=2)
    app = Database(url.set(username=role), pool_size=2, max_overflow=2)
    try:
        await owner.create_all()
        await apply_row_level_security(owner, grant_to=role)
        async with owner.engine.begin() as conn:
            await conn.exec_driver_sql(f'ALTER TABLE shipment OWNER TO "{keeper}"')
        enable_row_level_security(app)
        yield Setup(url, owner, app, role, keeper)
    finally:
        await app.dispose()
        await owner.dispose()
        await _server(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f'DROP ROLE IF EXISTS "{role}"',
            f'DROP ROLE IF EXISTS "{keeper}"',
        )


@pytest.fixture
async def rows(rls: Setup) -> AsyncIterator[dict[str, list[Invoice]]]:
    """Two invoices of tenant A and one of B, by the owner; every row goes after."""
    made = {
        A: [Invoice(tenant_id=A, number="a-1"), Invoice(tenant_id=A, number="a-2")],
        B: [Invoice(tenant_id=B, number="b-1")],
    }
    async with rls.owner.engine.begin() as conn:
        values = [invoice.model_dump() for group in made.values() for invoice in group]
        await conn.execute(insert(Invoice.__table__), values)
    yield made
    async with rls.owner.engine.begin() as conn:
        for table in reversed(DBBaseModel.metadata.sorted_tables):
            await conn.execute(table.delete())


async def _numbers(session: Any) -> list[str]:
    result = await session.exec(text("SELECT number FROM invoice ORDER BY number"))
    return [number for (number,) in result.all()]


@postgres
async def test_raw_sql_sees_only_the_current_tenant(rls: Setup, rows: Any) -> None:
    """`text()`, `session.connection()` and a bare connection see tenant A only."""
    with tenant_scope(A):
        async with TransactionManager(rls.app) as tx:
            assert await _numbers(tx.session) == ["a-1", "a-2"]
            connection = await tx.session.connection()
            count = await connection.exec_driver_sql("SELECT count(*) FROM invoice")
            assert count.scalar() == 2
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            assert await driver.fetchval("SELECT count(*) FROM invoice") == 2
        async with rls.app.session() as session:
            assert await _numbers(session) == ["a-1", "a-2"]
        async with rls.app.engine.connect() as conn:
            found = await conn.execute(text("SELECT tenant_id FROM invoice"))
            assert set(found.scalars()) == {A}
    with tenant_scope(B):
        async with rls.app.session() as session:
            assert await _numbers(session) == ["b-1"]


@postgres
async def test_without_a_tenant_no_row_is_seen(rls: Setup, rows: Any) -> None:
    """No tenant: the setting is not made and the policies match no row."""
    async with rls.app.session() as session:
        assert await _numbers(session) == []
    async with rls.app.engine.connect() as conn:
        count = await conn.exec_driver_sql("SELECT count(*) FROM invoice")
        assert count.scalar() == 0


@postgres
async def test_the_tenant_does_not_outlive_its_transaction(
    rls: Setup, rows: Any
) -> None:
    """On one pooled connection, the next transaction sees its own tenant or none."""
    single = rls.as_role(rls.role, pool_size=1, max_overflow=0)
    enable_row_level_security(single)
    pids = set()
    show = text("SELECT pg_backend_pid(), current_setting('dotmac.tenant_id', true)")
    try:
        for tenant, expected in ((A, 2), (None, 0), (B, 1), (None, 0)):
            with tenant_scope(tenant):
                async with single.session() as session:
                    pid, setting = (await session.exec(show)).one()
                    count = await session.exec(text("SELECT count(*) FROM invoice"))
                    assert count.scalar() == expected, tenant
            pids.add(pid)
            # Once set on a connection, an unset setting reads '' (not NULL):
            # the policy's NULLIF makes that match no row either.
            assert setting == (tenant or ""), tenant
        assert len(pids) == 1
    finally:
        await single.dispose()


def _insert(tenant: str) -> Any:
    return text(
        "INSERT INTO invoice (id, created_at, updated_at, tenant_id, number, "
        "amount_cents) VALUES (:id, now(), now(), :tenant, :number, 0)"
    ).bindparams(id=uuid4(), tenant=tenant, number=f"x-{uuid4().hex[:8]}")


@postgres
@pytest.mark.parametrize("scope", [A, None], ids=["under-a", "no-tenant"])
async def test_writing_another_tenants_row_is_refused(
    rls: Setup, rows: Any, scope: str | None
) -> None:
    """The policy's WITH CHECK refuses B's row (and, with no tenant, an empty one)."""
    for tenant in (B, ""):
        with tenant_scope(scope), pytest.raises(DatabaseError) as refused:
            async with TransactionManager(rls.app) as tx:
                await tx.session.exec(_insert(tenant))
        assert refused.value.sqlstate == "42501"
    with tenant_scope(A), pytest.raises(DatabaseError) as moved:
        async with TransactionManager(rls.app) as tx:
            await tx.session.exec(
                text("UPDATE invoice SET tenant_id = :b"), params={"b": B}
            )
    assert moved.value.sqlstate == "42501"
    with tenant_scope(A):
        async with TransactionManager(rls.app) as tx:
            await tx.session.exec(_insert(A))
            changed = await tx.session.exec(text("DELETE FROM invoice"))
            assert changed.rowcount == 3  # A's two and the new one, not B's


@pytest.fixture(params=["driver", "session", "transaction"])
def route(request: pytest.FixtureRequest, rls: Setup) -> Iterator[Route]:
    """Each way a repository call runs, on the app role's database (the default)."""
    configure_database(rls.app)
    if request.param != "session":
        yield Route(request.param)
        return
    stop = _observe_statements(rls.app)
    try:
        yield Route("session")
    finally:
        stop()


@postgres
async def test_repository_calls_work_under_the_policies(
    rls: Setup, rows: dict[str, list[Invoice]], route: Route
) -> None:
    """Every kind of repository call reads and writes tenant A's rows, on each route."""
    invoices = Invoices()
    theirs = rows[B][0].id
    with tenant_scope(A):
        async with route.scope():
            made = await invoices.create({"number": "a-3", "amount_cents": 5})
            assert made.tenant_id == A
        async with route.scope():
            assert (await invoices.get_by_id(made.id)) is not None
            assert await invoices.get_by_id(theirs) is None
            assert len(await invoices.list()) == 3
            assert await invoices.count() == 3
            assert await invoices.exists({"number": "a-3"})
            assert (await invoices.list_paginated(size=2)).total == 3
        async with route.scope():
            updated = await invoices.update(made.id, {"amount_cents": 7})
            assert updated.amount_cents == 7
            assert (
                await invoices.update_many({"number": "a-3"}, {"amount_cents": 8}) == 1
            )
        await _create_many(invoices, route)
        async with route.scope():
            assert await invoices.count() == 6
            assert await invoices.delete(made.id, hard=True)
    with tenant_scope(B):
        assert await invoices.count() == 1
    async with rls.owner.engine.connect() as conn:
        stored = await conn.execute(
            text("SELECT tenant_id, count(*) FROM invoice GROUP BY 1 ORDER BY 1")
        )
        assert stored.all() == [(A, 5), (B, 1)]


async def _create_many(invoices: Invoices, route: Route) -> None:
    """Three rows through `create_many`, on every route, all written.

    The server refuses COPY FROM into a table under row-level security, so
    bulk inserts take SQLAlchemy's executemany INSERT there.
    """
    items = [{"number": f"m-{i}"} for i in range(3)]
    async with route.scope():
        many = await invoices.create_many(items)
    assert [m.tenant_id for m in many] == [A] * 3


@postgres
async def test_the_raw_driver_connection_of_a_transaction_has_the_tenant(
    rls: Setup, rows: Any
) -> None:
    """Statements a transaction runs on its raw driver connection see the setting."""
    with tenant_scope(A):
        async with TransactionManager(rls.app) as tx:
            connection = await tx.session.connection()
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            setting = "SELECT current_setting('dotmac.tenant_id', true)"
            assert await driver.fetchval(setting) == A
            assert len(await Invoices().list()) == 2


@postgres
async def test_superusers_bypass_and_force_binds_the_owner(
    rls: Setup, rows: Any
) -> None:
    """The superuser sees every tenant; a non-superuser owner only under FORCE."""
    async with rls.owner.engine.connect() as conn:
        every = await conn.execute(text("SELECT DISTINCT tenant_id FROM invoice"))
        assert set(every.scalars()) == {A, B}
    keeper = rls.as_role(rls.keeper, pool_size=1, max_overflow=0)
    enable_row_level_security(keeper)
    count = text("SELECT count(*) FROM shipment")
    try:
        async with rls.owner.engine.begin() as conn:
            await conn.execute(
                insert(Shipment.__table__),
                [Shipment(tenant_id=t, carrier="c").model_dump() for t in (A, B, B)],
            )
        with tenant_scope(A):
            async with keeper.session() as session:
                assert (await session.exec(count)).scalar() == 1
        async with keeper.engine.begin() as conn:
            await conn.exec_driver_sql(
                "ALTER TABLE shipment NO FORCE ROW LEVEL SECURITY"
            )
        try:
            with tenant_scope(A):
                async with keeper.session() as session:
                    assert (await session.exec(count)).scalar() == 3
        finally:
            async with keeper.engine.begin() as conn:
                await conn.exec_driver_sql(
                    "ALTER TABLE shipment FORCE ROW LEVEL SECURITY"
                )
    finally:
        await keeper.dispose()


@postgres
async def test_a_bypass_is_refused_where_the_role_is_subject(
    rls: Setup, rows: Any
) -> None:
    """`tenant_scope(None, bypass=True)` fails loudly, unless the role bypasses RLS."""
    with tenant_scope(None, bypass=True, reason="test"):
        with pytest.raises(TenantError, match="BYPASSRLS"):
            async with TransactionManager(rls.app) as tx:
                await tx.session.exec(text("SELECT 1"))
        admin = Database(rls.url, pool_size=1, max_overflow=0)  # the superuser
        enable_row_level_security(admin)
        try:
            async with TransactionManager(admin) as tx:
                assert len(await _numbers(tx.session)) == 3
        finally:
            await admin.dispose()


@postgres
async def test_autocommit_with_a_tenant_is_refused(rls: Setup) -> None:
    """An AUTOCOMMIT connection has no transaction to carry the tenant: refused."""
    engine = rls.app.engine.execution_options(isolation_level="AUTOCOMMIT")
    with tenant_scope(A), pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")


@postgres
async def test_applying_again_replaces_the_policy(rls: Setup) -> None:
    """Policies are dropped and made again: one per tenant table, RLS forced."""
    done = await apply_row_level_security(rls.owner)
    assert set(done) >= TENANT_TABLES
    assert set(done).isdisjoint(PLAIN_TABLES)
    async with rls.owner.engine.connect() as conn:
        policies = await conn.execute(
            text(
                "SELECT tablename, count(*) FROM pg_policies "
                "WHERE policyname = 'dotmac_tenant' GROUP BY 1"
            )
        )
        assert dict(policies.all()) == dict.fromkeys(done, 1)
        flags = await conn.execute(
            text(
                "SELECT relname FROM pg_class WHERE relrowsecurity "
                "AND relforcerowsecurity AND relkind = 'r'"
            )
        )
        assert set(flags.scalars()) == set(done)


def test_the_statements_quote_every_name() -> None:
    """Tables, columns and roles are quoted by the identifier preparer."""
    odd = Table("Odd Name", MetaData(), Column("tenant_id", String), schema="s x")
    statements = row_level_security_ddl([User, odd], grant_to='app"role')
    check = "NULLIF(current_setting('dotmac.tenant_id', true), '')"
    assert statements[:5] == [
        'ALTER TABLE "user" ENABLE ROW LEVEL SECURITY',
        'ALTER TABLE "user" FORCE ROW LEVEL SECURITY',
        'DROP POLICY IF EXISTS dotmac_tenant ON "user"',
        f'CREATE POLICY dotmac_tenant ON "user" AS PERMISSIVE FOR ALL '
        f"USING (tenant_id = {check}) WITH CHECK (tenant_id = {check})",
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "user" TO "app""role"',
    ]
    assert statements[5] == 'ALTER TABLE "s x"."Odd Name" ENABLE ROW LEVEL SECURITY'


def test_the_default_covers_the_tenant_tables_only() -> None:
    """Without a target, every `DBBaseModel` table with `tenant_id` gets a policy."""
    statements = row_level_security_ddl()
    named = {
        s.split(" ON ")[1].split()[0].strip('"') for s in statements if "CREATE" in s
    }
    assert named >= TENANT_TABLES
    assert named.isdisjoint(PLAIN_TABLES)
    assert len(row_level_security_ddl([Member, Squad, Member.__table__])) == 8


@pytest.mark.parametrize(
    ("target", "grant_to"),
    [
        ([Tag], None),
        ([Invoice, "invoice"], None),
        ("invoice", None),
        ([Invoice], ""),
        ([Invoice], "a\x00b"),
        ([Invoice], "r" * 64),
        ([Invoice], 5),
    ],
    ids=[
        "no-tenant-column",
        "not-a-model",
        "a-str",
        "empty-role",
        "nul",
        "long",
        "int",
    ],
)
def test_bad_targets_and_roles_are_refused(target: Any, grant_to: Any) -> None:
    """A table without `tenant_id`, a non-table, or a bad role name: ValidationError."""
    with pytest.raises(ValidationError):
        row_level_security_ddl(target, grant_to=grant_to)


async def test_sqlite_is_refused(tmp_path: Path) -> None:
    """Row-level security is PostgreSQL's: SQLite gets a ConfigurationError."""
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}") as db:
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            enable_row_level_security(db)
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            await apply_row_level_security(db)
