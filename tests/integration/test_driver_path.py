"""The driver path: one-statement calls run on the driver connection.

Outside a transaction a get, list, count, page, create or update is one
statement on asyncpg / aiosqlite, built from the same filters and scoping
as the ORM way. These tests pin down what it must keep: scoping, shapes
that compile differently, session identity, errors, and connection health.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Field

from dotmac_core import (
    AlreadyExistsError,
    AsyncRepository,
    Database,
    DBBaseModel,
    NotFoundError,
    TransactionManager,
    tenant_scope,
)
from dotmac_core.db._driver import driver_for
from dotmac_core.db.scoping import live

from ..models import Member, Tag

pytestmark = pytest.mark.usefixtures("repo_db", "executor")


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


class Tags(AsyncRepository[Tag]):
    """Tags (no tenant, no soft delete)."""


class Stamped(DBBaseModel, table=True):
    """A model with a server-side default: its inserts need the ORM's RETURNING."""

    __tablename__ = "driver_stamped"

    label: str = Field(max_length=20)
    origin: str | None = Field(
        default=None, sa_column_kwargs={"server_default": text("'server'")}
    )


class StampedRepository(AsyncRepository[Stamped]):
    """Rows of `Stamped`."""


async def _members(count: int, **extra: Any) -> list[Member]:
    return await Members().create_many(
        [
            {"email": f"m{i}@acme.example", "name": f"M {i}", "rank": i, **extra}
            for i in range(count)
        ]
    )


def test_driver_is_used_where_it_can_be(db: Database) -> None:
    """PostgreSQL and SQLite files get a driver executor."""
    assert driver_for(db.engine.sync_engine) is not None


def test_memory_sqlite_keeps_the_orm_way() -> None:
    """A memory database is one shared connection: no driver path beside it."""
    memory = Database("sqlite+aiosqlite:///:memory:")
    assert driver_for(memory.engine.sync_engine) is None


@pytest.mark.usefixtures("acme")
async def test_filter_shapes_compile_apart() -> None:
    """`x = value`, `x IS NULL` and `is_null` compile to different statements."""
    squadless = await _members(3)
    other = await Members().create({"email": "b@acme.example", "name": "B", "rank": 9})
    assert {m.id for m in await Members().list({"team_id": None})} == {
        m.id for m in [*squadless, other]
    }
    assert await Members().list({"rank": 9}) == [other]
    assert await Members().count({"team_id__is_null": True}) == 4
    assert await Members().count({"team_id__is_null": False}) == 0
    assert await Members().count({"rank__ne": None}) == 4
    # `in` lists render per call: those calls take the ORM way, same answer.
    assert {m.rank for m in await Members().list({"rank__in": [0, 9]})} == {0, 9}


async def test_scoping_is_in_the_statement() -> None:
    """Another tenant's rows and soft-deleted rows stay out of every read."""
    with tenant_scope("acme"):
        (mine, gone) = await _members(2)
        await Members().delete(gone.id)
    with tenant_scope("globex"):
        theirs = await Members().create({"email": "t@globex.example", "name": "T"})
        assert await Members().get_by_id(mine.id) is None
        assert await Members().count() == 1
        page = await Members().list_paginated(1, 10)
        assert [m.id for m in page.items] == [theirs.id]
        assert page.total == 1
    with tenant_scope("acme"):
        assert await Members().get_by_id(gone.id) is None
        assert (await Members().get_by_id(gone.id, include_deleted=True)) is not None
        assert [m.id for m in await Members().list(only_deleted=True)] == [gone.id]
        assert await Members().count(include_deleted=True) == 2
    with tenant_scope(None, bypass=True, reason="test: all tenants"):
        assert await Members().count() == 2


@pytest.mark.usefixtures("acme")
async def test_page_totals_on_every_edge() -> None:
    """The total rides with the page; an empty page still gets the right total."""
    assert (await Members().list_paginated(1, 10)).total == 0
    await _members(12)
    first = await Members().list_paginated(1, 5, order_by="rank")
    assert (first.total, first.pages, first.has_next) == (12, 3, True)
    assert [m.rank for m in first.items] == [0, 1, 2, 3, 4]
    last = await Members().list_paginated(3, 5, order_by="rank")
    assert ([m.rank for m in last.items], last.has_next) == ([10, 11], False)
    beyond = await Members().list_paginated(9, 5, order_by="rank")
    assert (beyond.items, beyond.total) == ([], 12)
    bare = await Members().list_paginated(2, 5, order_by="-rank", with_total=False)
    assert ([m.rank for m in bare.items], bare.total) == ([6, 5, 4, 3, 2], None)


@pytest.mark.usefixtures("acme")
async def test_rows_come_back_typed_and_detached() -> None:
    """Values are converted as the ORM converts them; the objects are usable."""
    (made,) = await _members(1)
    row = await Members().get_by_id(str(made.id))
    assert row is not None
    assert isinstance(row.id, uuid.UUID)
    assert row.created_at.tzinfo is UTC
    assert row.created_at == made.created_at
    assert row.model_dump()["email"] == "m0@acme.example"
    async with TransactionManager() as tx:
        tx.session.add(row)  # detached with its key: adding means UPDATE
        row.name = "Renamed"
    assert (await Members().get_one(email="m0@acme.example")).name == "Renamed"


async def test_update_returns_the_row_in_one_statement() -> None:
    """Update sets the changes, updated_at and updated_by, and returns the row."""
    with tenant_scope("acme", user_id="alice"):
        (made,) = await _members(1)
    with tenant_scope("acme", user_id="bob"):
        changed = await Members().update(made.id, {"name": "New", "rank": 7})
        assert (changed.name, changed.rank, changed.updated_by) == ("New", 7, "bob")
        assert changed.updated_at > made.updated_at
        assert changed.created_by == "alice"
        assert (await Members().get_by_id(made.id)) == changed
        await Members().delete(made.id)
        with pytest.raises(NotFoundError):
            await Members().update(made.id, {"name": "Ghost"})
    with tenant_scope("globex"), pytest.raises(NotFoundError):
        await Members().update(made.id, {"name": "Intruder"})


@pytest.mark.usefixtures("acme")
async def test_driver_errors_are_translated() -> None:
    """A unique violation on the driver connection is AlreadyExistsError."""
    await Members().create({"email": "dup@acme.example", "name": "A"})
    with pytest.raises(AlreadyExistsError):
        await Members().create({"email": "dup@acme.example", "name": "B"})
    await Tags().create({"label": "one"})
    with pytest.raises(AlreadyExistsError):
        await Tags().create({"label": "one"})
    assert await Tags().count() == 1


async def test_server_defaults_take_the_orm_way(db: Database) -> None:
    """A column filled by the database needs RETURNING: create goes the ORM way."""
    row = await StampedRepository().create({"label": "x"})
    assert row.origin == "server"
    assert (await StampedRepository().get_by_id(row.id)).origin == "server"  # type: ignore[union-attr]


@pytest.mark.usefixtures("acme")
async def test_session_reads_keep_identity() -> None:
    """On a session, reads return the session's own objects, as the ORM does."""
    (made,) = await _members(1)
    async with TransactionManager() as tx:
        first = await Members().get_by_id(made.id)  # starts the transaction
        again = await Members().get_by_id(made.id)
        listed = await Members().list()
        assert first is again is listed[0]
        assert first in tx.session
        first.name = "Pending"  # unflushed: the next read flushes first
        assert (await Members().get_one(name="Pending")) is first
        tx.session.expire(first, ["rank"])
        assert (await Members().get_by_id(made.id)) is first
        assert "rank" in first.__dict__  # refilled from the row, no lazy load
    assert (await Members().get_by_id(made.id)).name == "Pending"  # type: ignore[union-attr]


@pytest.mark.usefixtures("acme")
async def test_create_many_shares_call_defaults() -> None:
    """A batch's rows share one timestamp and user; ids are unique and ordered."""
    rows = await _members(50)
    assert len({row.created_at for row in rows}) == 1
    ids = [row.id for row in rows]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50
    stored = await Members().list(order_by="rank")
    assert [row.id for row in stored] == ids


async def test_create_many_under_bypass_needs_tenant_per_row() -> None:
    """No tenant set: rows that name theirs are written, the default is not used."""
    with tenant_scope(None, bypass=True, reason="test: import"):
        rows = await Members().create_many(
            [
                {"email": "a@x.example", "name": "A", "tenant_id": "acme"},
                {"email": "b@x.example", "name": "B", "tenant_id": "globex"},
            ]
        )
    assert {row.tenant_id for row in rows} == {"acme", "globex"}


def test_live_rows_criterion_per_dialect(db: Database) -> None:
    """SQLite gets `+deleted_at IS NULL` (no index may serve it); others the column."""
    sql = str(live(Member.deleted_at).compile(dialect=db.engine.dialect))
    expected = "+member.deleted_at" if db.dialect == "sqlite" else "member.deleted_at"
    assert sql.startswith(expected)
    assert sql.endswith("IS NULL")
