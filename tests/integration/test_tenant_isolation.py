"""Tenant isolation: tenant A cannot see or touch tenant B's rows, by any path."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, literal, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import select

from dotmac_core import (
    AsyncRepository,
    Database,
    NotFoundError,
    TenantError,
    TransactionManager,
    ValidationError,
    tenant_scope,
)
from dotmac_core.db.session import AsyncSession

from ..models import Member, Squad, User

pytestmark = pytest.mark.usefixtures("repo_db", "executor")


class Members(AsyncRepository[Member]):
    """Members."""


async def _seed() -> tuple[Member, Member]:
    with tenant_scope("tenant-a", user_id="a-user"):
        mine = await Members().create({"email": "same@x", "name": "A", "rank": 1})
    with tenant_scope("tenant-b", user_id="b-user"):
        theirs = await Members().create({"email": "same@x", "name": "B", "rank": 1})
    return mine, theirs


async def _b_rows_untouched(theirs: Member) -> None:
    with tenant_scope("tenant-b"):
        rows = await Members().list(include_deleted=True)
    assert len(rows) == 1
    row = rows[0]
    assert (row.id, row.name, row.rank, row.deleted_at) == (theirs.id, "B", 1, None)
    assert row.updated_at == theirs.updated_at


async def test_repository_methods_are_isolated() -> None:
    """Every repository method run as A leaves B's row unseen and unchanged."""
    mine, theirs = await _seed()
    repo = Members()
    with tenant_scope("tenant-a", user_id="a-user"):
        assert await repo.get_by_id(theirs.id) is None
        assert await repo.get_by_id(theirs.id, include_deleted=True) is None
        assert [m.id for m in await repo.list()] == [mine.id]
        assert [m.id for m in await repo.list({"name": "B"})] == []
        assert await repo.count() == 1
        assert await repo.count({"tenant_id": "tenant-b"}) == 0
        assert not await repo.exists({"id": theirs.id})
        assert await repo.get_by_field("name", "B") is None
        with pytest.raises(NotFoundError):
            await repo.get_one(id=theirs.id)
        with pytest.raises(NotFoundError):
            await repo.update(theirs.id, {"name": "hacked"})
        assert await repo.update_many(None, {"rank": 99}) == 1  # only A's row
        assert await repo.update_many({"id": theirs.id}, {"rank": 99}) == 0
        assert not await repo.delete(theirs.id)
        assert not await repo.delete(theirs.id, hard=True)
        with pytest.raises(NotFoundError):
            await repo.restore(theirs.id)
        page = await repo.list_paginated(size=10)
        assert [m.id for m in page.items] == [mine.id]
        assert page.total == 1
        keyset = await repo.list_after(size=10)
        assert [m.id for m in keyset.items] == [mine.id]
        # Upsert on the shared key touches A's own row, never B's.
        upserted = await repo.upsert(
            {"email": "same@x", "name": "A2"}, conflict_on=["email"]
        )
        assert upserted.id == mine.id
        # Naming B explicitly is refused, not silently re-stamped.
        with pytest.raises(TenantError):
            await repo.create({"email": "new@x", "name": "N", "tenant_id": "tenant-b"})
        with pytest.raises(TenantError):
            await repo.upsert(
                {"email": "same@x", "name": "X", "tenant_id": "tenant-b"},
                conflict_on=["email"],
            )
        with pytest.raises(TenantError):
            await repo.update(mine.id, {"tenant_id": "tenant-b"})
        with pytest.raises(TenantError):
            await repo.update_many(None, {"tenant_id": "tenant-b"})
    await _b_rows_untouched(theirs)


async def test_raw_orm_statements_are_scoped(db: Database) -> None:
    """Plain ORM select / update / delete / get on a toolkit session see one tenant."""
    mine, theirs = await _seed()
    with tenant_scope("tenant-a"):
        async with db.session() as session:
            rows = (await session.exec(select(Member))).all()
            assert [r.id for r in rows] == [mine.id]
            count = (await session.exec(select(func.count()).select_from(Member))).one()
            assert count == 1
            sub = select(Member.id).subquery()
            assert (
                await session.exec(select(func.count()).select_from(sub))
            ).one() == 1
            assert await session.get(Member, theirs.id) is None
            await session.exec(update(Member).values(rank=50))
            await session.exec(delete(Member).where(Member.id == theirs.id))
            await session.commit()
    await _b_rows_untouched(theirs)


async def test_raw_orm_inserts_are_stamped_and_checked(db: Database) -> None:
    """ORM INSERTs on a toolkit session get the tenant; another tenant is refused."""
    with tenant_scope("tenant-a"):
        async with db.session() as session:
            await session.exec(insert(Member), params=[{"email": "i@x", "name": "I"}])
            with pytest.raises(TenantError):
                await session.exec(
                    insert(Member),
                    params=[{"email": "j@x", "name": "J", "tenant_id": "tenant-b"}],
                )
            with pytest.raises(TenantError):
                await session.exec(
                    insert(Member).values(email="k@x", name="K", tenant_id="tenant-b")
                )
            await session.commit()
        assert await Members().count() == 1
    with tenant_scope("tenant-b"):
        assert await Members().count() == 0


async def test_identity_map_cannot_cross_tenants(db: Database) -> None:
    """A session that loaded A's rows refuses to work for B (no SQL would run)."""
    mine, _ = await _seed()
    async with db.session() as session:
        with tenant_scope("tenant-a"):
            assert await session.get(Member, mine.id) is not None
        with tenant_scope("tenant-b"), pytest.raises(TenantError, match="tenant-a"):
            await session.get(Member, mine.id)
        with tenant_scope("tenant-b"), pytest.raises(TenantError):
            await session.exec(select(Member))


async def test_flush_refuses_foreign_rows(db: Database) -> None:
    """Adding, changing or deleting another tenant's object fails at flush."""
    _, theirs = await _seed()
    with tenant_scope("tenant-a"):
        async with db.session() as session:
            session.add(Member(email="f@x", name="F", tenant_id="tenant-b"))
            with pytest.raises(TenantError):
                await session.flush()
    with tenant_scope("tenant-b"):
        async with db.session() as session:
            row = await session.get(Member, theirs.id)
            assert row is not None
            row.tenant_id = "tenant-a"
            with pytest.raises(TenantError, match="cannot change"):
                await session.flush()
    await _b_rows_untouched(theirs)


async def test_no_tenant_fails_closed(db: Database) -> None:
    """Without a tenant, tenant-scoped reads and writes raise TenantError."""
    await _seed()
    async with db.session() as session:
        with pytest.raises(TenantError):
            await session.exec(select(Member))
    with pytest.raises(TenantError):
        await Members().list()
    with pytest.raises(TenantError):
        Member(email="x@x", name="X")  # no tenant to stamp


async def test_bypass_for_admin_jobs(caplog: pytest.LogCaptureFixture) -> None:
    """An explicit, logged bypass sees every tenant; writes must name theirs."""
    mine, theirs = await _seed()
    with (
        caplog.at_level(logging.WARNING, logger="dotmac_core.tenancy"),
        tenant_scope(None, bypass=True, reason="nightly report"),
    ):
        rows = await Members().list(order_by="name")
        assert [r.id for r in rows] == [mine.id, theirs.id]
        assert await Members().count() == 2
        created = await Members().create(
            {"email": "adm@x", "name": "Adm", "tenant_id": "tenant-b"}
        )
        assert created.tenant_id == "tenant-b"
        with pytest.raises(ValidationError):
            async with TransactionManager() as tx:
                await tx.session.exec(
                    insert(Member), params=[{"email": "n@x", "name": "N"}]
                )
    assert "nightly report" in caplog.text
    with pytest.raises(ValidationError), tenant_scope("tenant-a", bypass=True):
        pass  # pragma: no cover - refused before the block


async def test_relationship_loads_are_scoped(db: Database) -> None:
    """Loading a relationship never brings in another tenant's rows."""
    with tenant_scope("tenant-a"):
        team = Squad(name="shared")
        async with db.session() as session:
            session.add(team)
            await session.commit()
    # Tenant B's member points at A's team (bypass: an admin job wrote it).
    with tenant_scope(None, bypass=True):
        await Members().create(
            {"email": "b@x", "name": "B", "team_id": team.id, "tenant_id": "tenant-b"}
        )
    with tenant_scope("tenant-a"):
        loaded = await AsyncRepositoryTeams().get_by_id(team.id, load=["members"])
        assert loaded is not None
        assert loaded.members == []


class AsyncRepositoryTeams(AsyncRepository[Squad]):
    """Teams."""


@asynccontextmanager
async def _session(db: Database, kind: str) -> AsyncIterator[AsyncSession]:
    """A toolkit session: `Database.session()` or a `TransactionManager`'s."""
    if kind == "transaction":
        async with TransactionManager(db) as tx:
            yield tx.session
        return
    async with db.session() as session:
        yield session
        await session.commit()


SESSIONS = ["session", "transaction"]

#: ORM UPDATEs that would move rows to another tenant, and how they are run.
MOVES: dict[str, Callable[[Member], tuple[Any, Any]]] = {
    "values": lambda _: (update(Member).values(tenant_id="tenant-b"), None),
    "values by column": lambda _: (
        update(Member).values({Member.tenant_id: "tenant-b"}),
        None,
    ),
    "ordered values": lambda _: (
        update(Member).ordered_values((Member.tenant_id, "tenant-b")),
        None,
    ),
    "expression": lambda _: (update(Member).values(tenant_id=Member.name), None),
    "execute parameters": lambda mine: (
        update(Member).where(Member.id == mine.id),
        {"tenant_id": "tenant-b"},
    ),
    "bulk by key": lambda mine: (
        update(Member),
        [{"id": mine.id, "tenant_id": "tenant-b"}],
    ),
}


@pytest.mark.parametrize("kind", SESSIONS)
@pytest.mark.parametrize("move", sorted(MOVES))
async def test_orm_updates_cannot_move_rows(db: Database, kind: str, move: str) -> None:
    """An ORM UPDATE that sets tenant_id raises TenantError, also under a bypass."""
    mine, theirs = await _seed()
    statement, params = MOVES[move](mine)
    for scope in (tenant_scope("tenant-a"), tenant_scope(None, bypass=True)):
        with scope, pytest.raises(TenantError, match="cannot change"):
            async with _session(db, kind) as session:
                await session.exec(statement, params=params)
    with tenant_scope("tenant-a"):
        assert [(m.id, m.tenant_id) for m in await Members().list()] == [
            (mine.id, "tenant-a")
        ]
    await _b_rows_untouched(theirs)


@pytest.mark.parametrize("kind", SESSIONS)
async def test_bulk_update_by_key_is_scoped(db: Database, kind: str) -> None:
    """`session.execute(update(Model), rows)` changes this tenant's rows only."""
    mine, theirs = await _seed()
    with tenant_scope("tenant-a"):
        async with _session(db, kind) as session:
            loaded = await session.get(Member, mine.id)
            assert loaded is not None
            await session.exec(
                update(Member),
                params=[
                    {"id": theirs.id, "name": "hacked"},
                    {"id": mine.id, "name": "A2"},
                ],
            )
            assert loaded.name == "A2"  # the session's object follows the UPDATE
        assert [m.name for m in await Members().list()] == ["A2"]
    await _b_rows_untouched(theirs)


def _core_statements(theirs: Member) -> dict[str, Any]:
    table: Any = Member.__table__
    return {
        "select": select(table.c.email),
        "update": update(table).values(rank=7),
        "delete": delete(table).where(table.c.id == theirs.id),
        "insert": insert(table).values(
            id=uuid.uuid4(),
            email="c@x",
            name="C",
            tenant_id="tenant-b",
            created_at=theirs.created_at,
            updated_at=theirs.updated_at,
        ),
        "from_statement": select(Member).from_statement(select(table)),
    }


@pytest.mark.parametrize("kind", SESSIONS)
@pytest.mark.parametrize(
    "name", ["select", "update", "delete", "insert", "from_statement"]
)
async def test_core_statements_on_tenant_tables_are_refused(
    db: Database, kind: str, name: str
) -> None:
    """Core statements on a tenant table's Table object: TenantError on a session."""
    _, theirs = await _seed()
    statement = _core_statements(theirs)[name]
    with tenant_scope("tenant-a"), pytest.raises(TenantError, match="Core statement"):
        async with _session(db, kind) as session:
            await session.exec(statement)
    await _b_rows_untouched(theirs)
    with tenant_scope(None, bypass=True):
        async with _session(db, kind) as session:
            await session.exec(select(Member.__table__.c.email))  # type: ignore[attr-defined]


def _inserts(dialect: str) -> dict[str, Any]:
    dml: Any = postgresql if dialect == "postgresql" else sqlite
    row = {"email": "n@x", "name": "N"}
    return {
        "multi-row values": insert(Member).values(
            [{**row, "tenant_id": "tenant-a"}, {**row, "tenant_id": "tenant-b"}]
        ),
        "expression": insert(Member).values(**row, tenant_id=func.lower("TENANT-B")),
        "from select": insert(Member).from_select(
            ["id", "email", "name", "tenant_id", "created_at", "updated_at"],
            select(
                Member.id,
                Member.email,
                Member.name,
                literal("tenant-b"),
                Member.created_at,
                Member.updated_at,
            ),
        ),
        "on conflict without tenant": dml.insert(User)
        .values(email="ub@x", name="U", tenant_id="tenant-a")
        .on_conflict_do_update(index_elements=["email"], set_={"name": "hacked"}),
        "on conflict setting tenant": dml.insert(Member)
        .values(**row)
        .on_conflict_do_update(
            index_elements=["tenant_id", "email"], set_={"tenant_id": "tenant-b"}
        ),
        "none": insert(Member).values(**row, tenant_id=None),
    }


INSERTS = [
    "multi-row values",
    "expression",
    "from select",
    "on conflict without tenant",
    "on conflict setting tenant",
    "none",
]


@pytest.mark.parametrize("kind", SESSIONS)
@pytest.mark.parametrize("name", INSERTS)
async def test_orm_inserts_naming_no_checkable_tenant_are_refused(
    db: Database, kind: str, name: str
) -> None:
    """ORM INSERTs that could write another tenant's row raise TenantError."""
    with tenant_scope("tenant-b"):
        await Users().create({"email": "ub@x", "name": "B"})
    statement = _inserts(db.dialect)[name]
    with tenant_scope("tenant-a"), pytest.raises(TenantError):
        async with _session(db, kind) as session:
            await session.exec(statement)
    with tenant_scope(None, bypass=True):
        assert await Members().count() == 0
        assert [u.name for u in await Users().list()] == ["B"]


@pytest.mark.parametrize("kind", SESSIONS)
async def test_orm_inserts_are_stamped(db: Database, kind: str) -> None:
    """ORM INSERTs that leave tenant_id out get the current tenant, in every form."""
    dml: Any = postgresql if db.dialect == "postgresql" else sqlite
    with tenant_scope("tenant-a"):
        async with _session(db, kind) as session:
            await session.exec(insert(Member).values(email="v@x", name="V"))
            await session.exec(
                insert(Member).values(
                    [{"email": "m1@x", "name": "M"}, {"email": "m2@x", "name": "M"}]
                )
            )
            await session.exec(insert(Member), params=[{"email": "r@x", "name": "R"}])
            upsert = dml.insert(Member).values(email="v@x", name="V2")
            await session.exec(
                upsert.on_conflict_do_update(
                    index_elements=["tenant_id", "email"], set_={"name": "V2"}
                )
            )
        rows = await Members().list(order_by="email")
        assert [(m.email, m.name, m.tenant_id) for m in rows] == [
            ("m1@x", "M", "tenant-a"),
            ("m2@x", "M", "tenant-a"),
            ("r@x", "R", "tenant-a"),
            ("v@x", "V2", "tenant-a"),
        ]
    with tenant_scope("tenant-b"):
        assert await Members().count() == 0


async def test_statement_values_and_rows_are_both_checked(db: Database) -> None:
    """A tenant in `values()` is checked even when rows are given beside it."""
    with tenant_scope("tenant-a"), pytest.raises(TenantError):
        async with db.session() as session:
            await session.exec(
                insert(Member).values(tenant_id="tenant-b"),
                params=[{"email": "h@x", "name": "H"}],
            )


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_sqlite_insert_or_replace_is_refused(db: Database) -> None:
    """INSERT OR REPLACE (SQLite's) could delete another tenant's row: TenantError."""
    _, theirs = await _seed()
    statement = (
        insert(Member)
        .prefix_with("OR REPLACE")
        .values(id=theirs.id, email="r@x", name="R")
    )
    with tenant_scope("tenant-a"), pytest.raises(TenantError, match="REPLACE"):
        async with db.session() as session:
            await session.exec(statement)
    await _b_rows_untouched(theirs)


class Users(AsyncRepository[User]):
    """Users (email unique across tenants)."""


@pytest.mark.parametrize("bad", ["a\nb", "a\x00b", " padded", "x" * 65])
async def test_rows_under_a_bypass_name_a_valid_tenant(db: Database, bad: str) -> None:
    """Under a bypass, a row's tenant_id must be a valid tenant id."""
    row = {"email": "b@x", "name": "B", "tenant_id": bad}
    with tenant_scope(None, bypass=True):
        with pytest.raises(ValidationError) as caught:
            await Members().create(row)
        assert caught.value.field == "tenant_id"
        with pytest.raises(ValidationError):
            async with db.session() as session:
                await session.exec(insert(Member), params=[row])
        with pytest.raises(ValidationError):
            async with db.session() as session:
                session.add(Member(**row))
                await session.flush()
        assert await Members().count() == 0
