"""Tenancy in depth: tenant A never reads, changes, moves or counts B's rows.

Every public method of `AsyncRepository` is found by introspection and run
under tenant A against tenant B's rows, on each route (driver, session,
transaction) and each database; a method that is neither exercised here nor
listed as tenant-irrelevant with a reason fails the suite, so a new method
is covered the day it appears. ORM statements on the toolkit's sessions
(select, count, update, delete, `get`, relationship loads of every kind) are
held to the same rule.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import delete, func, update
from sqlalchemy.orm import joinedload, selectinload, subqueryload
from sqlmodel import select

from dotmac_core import (
    AlreadyExistsError,
    AsyncRepository,
    Database,
    NotFoundError,
    PaginationParams,
    TenantError,
    TransactionManager,
    tenant_scope,
)
from dotmac_core.db.session import AsyncSession

from ..conftest import Route
from ..models import Member, Squad

A, B = "tenant-a", "tenant-b"


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


class Squads(AsyncRepository[Squad]):
    """Squads of the current tenant."""


@dataclass
class World:
    """Rows of both tenants; B's include a soft-deleted one and cross links."""

    mine: Member
    theirs: Member
    theirs_deleted: Member
    my_squad: Squad
    their_squad: Squad


async def _seed() -> World:
    with tenant_scope(A, user_id="a-user"):
        my_squad = await Squads().create({"name": "A-squad"})
    with tenant_scope(B, user_id="b-user"):
        their_squad = await Squads().create({"name": "B-squad"})
        theirs = await Members().create(
            {"email": "same@x", "name": "B", "rank": 5, "team_id": my_squad.id}
        )
        theirs_deleted = await Members().create(
            {"email": "gone@x", "name": "B-gone", "rank": 5}
        )
        await Members().delete(theirs_deleted.id)
    with tenant_scope(A, user_id="a-user"):
        mine = await Members().create(
            {"email": "same@x", "name": "A", "rank": 1, "team_id": their_squad.id}
        )
    return World(mine, theirs, theirs_deleted, my_squad, their_squad)


async def _snapshot() -> list[tuple[Any, ...]]:
    """Tenant B's rows as stored (every column that a write could change)."""
    with tenant_scope(None, bypass=True):
        rows = await Members().list(
            {"tenant_id": B}, include_deleted=True, order_by="email"
        )
        squads = await Squads().list({"tenant_id": B})
    return [
        *((m.id, m.tenant_id, m.email, m.name, m.rank, m.team_id) for m in rows),
        *((m.id, m.deleted_at, m.updated_at, m.updated_by) for m in rows),
        *((s.id, s.tenant_id, s.name, s.updated_at) for s in squads),
    ]


def _ids(rows: Any) -> set[Any]:
    return {row.id for row in rows}


Exercise = Callable[[World], Awaitable[None]]


async def _get_by_id(w: World) -> None:
    assert await Members().get_by_id(w.theirs.id) is None
    assert await Members().get_by_id(w.theirs_deleted.id, include_deleted=True) is None
    loaded = await Members().get_by_id(w.mine.id, load=["team"])
    assert loaded is not None
    assert loaded.team is None  # A's row points at B's squad: loads nothing


async def _get_by_field(w: World) -> None:
    assert await Members().get_by_field("name", "B") is None
    found = await Members().get_by_field("email", "same@x", load=["team"])
    assert found is not None
    assert found.id == w.mine.id


async def _get_one(w: World) -> None:
    with pytest.raises(NotFoundError):
        await Members().get_one(id=w.theirs.id)
    assert (await Members().get_one(email="same@x")).id == w.mine.id


async def _list(w: World) -> None:
    repo = Members()
    assert _ids(await repo.list()) == {w.mine.id}
    assert _ids(await repo.list(include_deleted=True)) == {w.mine.id}
    assert _ids(await repo.list(only_deleted=True)) == set()
    assert _ids(await repo.list({"tenant_id": B})) == set()
    assert _ids(await repo.list({"team_id": w.my_squad.id})) == set()
    squads = await Squads().list(load=["members"])
    assert [(s.id, s.members) for s in squads] == [(w.my_squad.id, [])]


async def _count(w: World) -> None:
    assert await Members().count() == 1
    assert await Members().count(include_deleted=True) == 1
    assert await Members().count(only_deleted=True) == 0
    assert await Members().count({"rank": 5}) == 0


async def _exists(w: World) -> None:
    assert not await Members().exists({"id": w.theirs.id})
    assert not await Members().exists({"id": w.theirs_deleted.id}, include_deleted=True)
    assert await Members().exists({"id": w.mine.id})


async def _create(w: World) -> None:
    made = await Members().create({"email": "new@x", "name": "N"})
    assert made.tenant_id == A
    with pytest.raises(TenantError):
        await Members().create({"email": "n2@x", "name": "N", "tenant_id": B})


async def _create_many(w: World) -> None:
    made = await Members().create_many([{"email": "m1@x", "name": "M"}])
    assert [m.tenant_id for m in made] == [A]
    with pytest.raises(TenantError):
        await Members().create_many(
            [
                {"email": "m2@x", "name": "M"},
                {"email": "m3@x", "name": "M", "tenant_id": B},
            ]
        )


async def _update(w: World) -> None:
    with pytest.raises(NotFoundError):
        await Members().update(w.theirs.id, {"name": "hacked"})
    with pytest.raises(NotFoundError):
        await Members().update(w.theirs.id, {})
    with pytest.raises(TenantError):
        await Members().update(w.mine.id, {"tenant_id": B})


async def _update_many(w: World) -> None:
    assert await Members().update_many(None, {"rank": 9}) == 1
    assert await Members().update_many({"id": w.theirs.id}, {"rank": 9}) == 0
    assert await Members().update_many({"tenant_id": B}, {"rank": 9}) == 0
    with pytest.raises(TenantError):
        await Members().update_many(None, {"tenant_id": B})


async def _delete(w: World) -> None:
    assert not await Members().delete(w.theirs.id)
    assert not await Members().delete(w.theirs.id, hard=True)
    assert not await Squads().delete(w.their_squad.id)


async def _restore(w: World) -> None:
    with pytest.raises(NotFoundError):
        await Members().restore(w.theirs_deleted.id)


async def _upsert(w: World) -> None:
    # The key (tenant_id, email) is shared with B's row: A's own row is meant.
    row = await Members().upsert({"email": "same@x", "name": "A2"}, ["email"])
    assert row.id == w.mine.id
    with pytest.raises(TenantError):
        await Members().upsert(
            {"email": "same@x", "name": "X", "tenant_id": B}, ["email"]
        )
    # B's id with A's data: the key is taken by a row A cannot change.
    with pytest.raises(AlreadyExistsError):
        await Members().upsert({"id": w.theirs.id, "email": "o@x", "name": "O"})


async def _list_paginated(w: World) -> None:
    page = await Members().list_paginated(size=10, include_deleted=True)
    assert (_ids(page.items), page.total) == ({w.mine.id}, 1)
    page = await Members().list_paginated(2, 1)
    assert (page.items, page.total) == ([], 1)


async def _paginate(w: World) -> None:
    page = await Members().paginate(PaginationParams(page=1, size=5))
    assert (_ids(page.items), page.total) == ({w.mine.id}, 1)


async def _list_after(w: World) -> None:
    page = await Members().list_after(size=1)
    assert (_ids(page.items), page.next_cursor) == ({w.mine.id}, None)


#: How each public method is held to the tenant: one exercise per method.
EXERCISES: dict[str, Exercise] = {
    "count": _count,
    "create": _create,
    "create_many": _create_many,
    "delete": _delete,
    "exists": _exists,
    "get_by_field": _get_by_field,
    "get_by_id": _get_by_id,
    "get_one": _get_one,
    "list": _list,
    "list_after": _list_after,
    "list_paginated": _list_paginated,
    "paginate": _paginate,
    "restore": _restore,
    "update": _update,
    "update_many": _update_many,
    "upsert": _upsert,
}

#: Public methods that touch no rows, with the reason (none today).
TENANT_IRRELEVANT: dict[str, str] = {}


def _public_methods() -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(AsyncRepository)
        if not name.startswith("_") and callable(member)
    }


def test_every_public_method_is_exercised_or_excused() -> None:
    """A public repository method is either exercised here or excused with a reason."""
    methods = _public_methods()
    missing = methods - set(EXERCISES) - set(TENANT_IRRELEVANT)
    assert not missing, f"exercise these under two tenants: {sorted(missing)}"
    assert set(EXERCISES) <= methods, "exercises of methods that no longer exist"
    assert all(TENANT_IRRELEVANT.values())


@pytest.mark.parametrize("method", sorted(EXERCISES))
async def test_repository_method_never_reaches_another_tenant(
    route: Route, method: str
) -> None:
    """The method, run as A on each route, leaves B's rows unseen and unchanged."""
    world = await _seed()
    before = await _snapshot()
    with tenant_scope(A, user_id="a-user"):
        async with route.scope():
            await EXERCISES[method](world)
    assert await _snapshot() == before


# --- ORM statements on the toolkit's sessions ----------------------------------------


@asynccontextmanager
async def _session(db: Database, kind: str) -> AsyncIterator[AsyncSession]:
    if kind == "transaction":
        async with TransactionManager(db) as tx:
            yield tx.session
        return
    async with db.session() as session:
        yield session
        await session.commit()


async def _orm_reads(session: AsyncSession, w: World) -> None:
    assert _ids((await session.exec(select(Member))).all()) == {w.mine.id}
    statement = select(Member).execution_options(dotmac_include_deleted=True)
    assert _ids((await session.exec(statement)).all()) == {w.mine.id}
    assert (await session.exec(select(func.count()).select_from(Member))).one() == 1
    grouped = select(Member.rank, func.count()).group_by(Member.rank)
    assert (await session.exec(grouped)).all() == [(1, 1)]
    joined = select(Member, Squad).join(Squad, Member.team_id == Squad.id)
    assert (await session.exec(joined)).all() == []
    outer = select(Squad.id, Member.id).outerjoin(Member, Member.team_id == Squad.id)
    assert (await session.exec(outer)).all() == [(w.my_squad.id, None)]
    nested = select(Member.id).where(Member.id.in_(select(Member.id)))
    assert set((await session.exec(nested)).all()) == {w.mine.id}
    assert await session.get(Member, w.theirs.id) is None
    assert await session.get(Squad, w.their_squad.id) is None


async def _orm_relationships(session: AsyncSession, w: World) -> None:
    for option in (selectinload, joinedload, subqueryload):
        squads = (
            (await session.exec(select(Squad).options(option(Squad.members))))
            .unique()
            .all()
        )
        assert [(s.id, s.members) for s in squads] == [(w.my_squad.id, [])]
        members = (
            (await session.exec(select(Member).options(option(Member.team))))
            .unique()
            .all()
        )
        assert [(m.id, m.team) for m in members] == [(w.mine.id, None)]
    session.expire_all()
    squad = await session.get(Squad, w.my_squad.id)
    assert squad is not None
    assert await session.run_sync(lambda _: list(squad.members)) == []  # lazy load
    member = await session.get(Member, w.mine.id)
    assert member is not None
    assert await session.run_sync(lambda _: member.team) is None


async def _orm_writes(session: AsyncSession, w: World) -> None:
    await session.exec(update(Member).values(rank=7))
    await session.exec(update(Member).where(Member.id == w.theirs.id).values(rank=8))
    await session.exec(update(Squad).values(name="renamed"))
    await session.exec(update(Member), params=[{"id": w.theirs.id, "name": "hacked"}])
    await session.exec(delete(Member).where(Member.id == w.theirs.id))
    await session.exec(delete(Squad).where(Squad.id == w.their_squad.id))
    with pytest.raises(TenantError):
        await session.exec(update(Member).values(tenant_id=B))
    with pytest.raises(TenantError):
        await session.exec(update(Member), params=[{"id": w.mine.id, "tenant_id": B}])


ORM = {"reads": _orm_reads, "relationships": _orm_relationships, "writes": _orm_writes}


@pytest.mark.parametrize("kind", ["session", "transaction"])
@pytest.mark.parametrize("what", sorted(ORM))
async def test_orm_statements_never_reach_another_tenant(
    repo_db: Database, kind: str, what: str
) -> None:
    """ORM statements on Database.session() and a transaction's session: A only."""
    world = await _seed()
    before = await _snapshot()
    with tenant_scope(A, user_id="a-user"):
        async with _session(repo_db, kind) as session:
            await ORM[what](session, world)
    assert await _snapshot() == before
    if what == "writes":
        with tenant_scope(A):
            mine = await Members().get_by_id(world.mine.id)
        assert mine is not None
        assert (mine.rank, mine.tenant_id) == (7, A)
