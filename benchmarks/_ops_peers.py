"""Peers on the same engine: a plain SQLModel session, advanced-alchemy, fastcrud.

Each peer is written the way its documentation shows, with the tenant and
soft-delete conditions in every statement (the peers have no scoping of their
own) and a session per call (`expire_on_commit=False`), except the held-session
get, which holds one. Only the plain SQLModel session is always available
(SQLModel is a dotmac_core dependency); advanced-alchemy and fastcrud are
found with `importlib` and skipped when absent: they are never dependencies.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import func, tuple_
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelSession

from ._harness import Operation, loop, spread_over_tasks
from ._ops_db import bulk_items, new_values, scoped
from ._setup import (
    MEMBER_PAGE_ROWS,
    PAGE_ROWS,
    PAGE_SIZE,
    TASKS,
    TENANT_BULK,
    TENANT_DEEP,
    TENANT_MEMBER,
    TENANT_PAGE,
    TENANT_WRITE,
    Bench,
    BenchBulkItem,
    BenchItem,
    BenchMember,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["PEERS", "add_peers", "peer_versions"]

PAGES = PAGE_ROWS // PAGE_SIZE
MEMBER_PAGES = MEMBER_PAGE_ROWS // PAGE_SIZE

#: Peer key to the distribution it needs (`None`: always there).
PEERS: dict[str, str] = {
    "sqlmodel": "sqlmodel",
    "advanced_alchemy": "advanced-alchemy",
    "fastcrud": "fastcrud",
}


def peer_versions() -> dict[str, str | None]:
    """Return each peer's installed version, `None` when it is not importable."""
    found: dict[str, str | None] = {}
    for key, dist in PEERS.items():
        module = dist.replace("-", "_")
        found[key] = (
            importlib.metadata.version(dist)
            if importlib.util.find_spec(module) is not None
            else None
        )
    return found


def _live(tenant: str) -> tuple[Any, ...]:
    return (col(BenchItem.tenant_id) == tenant, col(BenchItem.deleted_at).is_(None))


def _order() -> tuple[Any, ...]:
    return (col(BenchItem.created_at), col(BenchItem.id))


def _active() -> tuple[Any, ...]:
    return (
        col(BenchMember.tenant_id) == TENANT_MEMBER,
        col(BenchMember.active).is_(True),
        col(BenchMember.deleted_at).is_(None),
    )


def _member_order() -> tuple[Any, ...]:
    return (col(BenchMember.created_at), col(BenchMember.id))


def _shared(calls: dict[str, Any]) -> dict[str, Any]:
    """Add the operations every peer runs with calls it already has.

    A peer's call runs in a session of its own: that session is the peer's
    unit of work, so the calls inside a `TransactionManager` compare with the
    same calls; after an idle gap they are the same calls too.
    """
    get, insert, update = calls["get_pool"], calls["insert"], calls["update"]

    async def write(i: int) -> None:
        await (update if i % 2 else insert)(i)

    return calls | {
        "tx_get": get,
        "tx_insert": insert,
        "tx_update": update,
        "idle_get": get,
        "idle_write": write,
    }


def _new_item(i: int) -> BenchBulkItem:
    return BenchBulkItem(**new_values(i), tenant_id=TENANT_WRITE)


class _Peer:
    """One peer: per operation key, the `call(i)` that performs one call."""

    what: ClassVar[dict[str, str]]

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.engine = bench.db.engine
        self.held: Any = None

    def session(self) -> Any:
        """Return a new session of the kind this peer works with."""
        return SAAsyncSession(self.engine, expire_on_commit=False)

    def calls(self) -> dict[str, Callable[[int], Awaitable[Any]]]:
        """Return the supported operations' calls by operation key."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the held session, if one was opened."""
        if self.held is not None:
            await self.held.close()


class _SQLModelPeer(_Peer):
    what: ClassVar[dict[str, str]] = {
        "get_held": "`session.exec(select(...)).first()` on a held session",
        "*": "SQLModel `AsyncSession` per call: `exec(select(...))`, "
        "`add()` + `commit()`",
    }

    def session(self) -> Any:
        """Return SQLModel's own `AsyncSession`."""
        return SQLModelSession(self.engine, expire_on_commit=False)

    def calls(self) -> dict[str, Callable[[int], Awaitable[Any]]]:
        """Return the calls, one per operation."""
        bench, ids, wids = self.bench, self.bench.page_ids, self.bench.write_ids
        self.held = self.session()
        held = self.held

        def by_id(key: Any, tenant: str) -> Any:
            return select(BenchItem).where(col(BenchItem.id) == key, *_live(tenant))

        async def get_held(i: int) -> Any:
            return (await held.exec(by_id(ids[i % len(ids)], TENANT_PAGE))).first()

        async def get(i: int) -> Any:
            async with self.session() as s:
                return (await s.exec(by_id(ids[i % len(ids)], TENANT_PAGE))).first()

        async def insert(i: int) -> None:
            async with self.session() as s:
                s.add(_new_item(i))
                await s.commit()

        async def update(i: int) -> None:
            async with self.session() as s:
                row = (await s.exec(by_id(wids[i % len(wids)], TENANT_WRITE))).one()
                row.rank = next(bench.sequence)
                await s.commit()

        items = bulk_items(bench.bulk_rows)

        async def bulk(_: int) -> None:
            async with self.session() as s:
                s.add_all(BenchBulkItem(**d, tenant_id=TENANT_BULK) for d in items)
                await s.commit()

        def page(tenant: str, limit: int, offset: int) -> Any:
            return (
                select(BenchItem)
                .where(*_live(tenant))
                .order_by(*_order())
                .offset(offset)
                .limit(limit)
            )

        async def page_total(i: int) -> None:
            async with self.session() as s:
                (
                    await s.exec(page(TENANT_PAGE, PAGE_SIZE, (i % PAGES) * PAGE_SIZE))
                ).all()
                count = select(func.count()).select_from(BenchItem)
                (await s.exec(count.where(*_live(TENANT_PAGE)))).one()

        async def page_no_total(i: int) -> None:
            async with self.session() as s:
                offset = (i % PAGES) * PAGE_SIZE
                (await s.exec(page(TENANT_PAGE, PAGE_SIZE + 1, offset))).all()

        async def offset_deep(_: int) -> None:
            async with self.session() as s:
                deep = bench.sizes.deep_offset
                (await s.exec(page(TENANT_DEEP, PAGE_SIZE + 1, deep))).all()

        at, last = bench.deep_after

        async def keyset_deep(_: int) -> None:
            statement = (
                select(BenchItem)
                .where(*_live(TENANT_DEEP), tuple_(*_order()) > tuple_(at, last))
                .order_by(*_order())
                .limit(PAGE_SIZE + 1)
            )
            async with self.session() as s:
                (await s.exec(statement)).all()

        async def unit(i: int) -> None:
            a, b = wids[(2 * i) % len(wids)], wids[(2 * i + 1) % len(wids)]
            async with self.session() as s:
                first = (await s.exec(by_id(a, TENANT_WRITE))).one()
                second = (await s.exec(by_id(b, TENANT_WRITE))).one()
                first.rank -= 1
                second.rank += 1
                await s.commit()

        def active_page(limit: int, offset: int) -> Any:
            return (
                select(BenchMember)
                .where(*_active())
                .order_by(*_member_order())
                .offset(offset)
                .limit(limit)
            )

        async def member_page_total(i: int) -> None:
            async with self.session() as s:
                offset = (i % MEMBER_PAGES) * PAGE_SIZE
                (await s.exec(active_page(PAGE_SIZE, offset))).all()
                count = select(func.count()).select_from(BenchMember)
                (await s.exec(count.where(*_active()))).one()

        m_at, m_last = bench.member_after

        async def member_keyset(_: int) -> None:
            statement = (
                select(BenchMember)
                .where(*_active(), tuple_(*_member_order()) > tuple_(m_at, m_last))
                .order_by(*_member_order())
                .limit(PAGE_SIZE + 1)
            )
            async with self.session() as s:
                (await s.exec(statement)).all()

        async def page_total_big(i: int) -> None:
            async with self.session() as s:
                (
                    await s.exec(page(TENANT_DEEP, PAGE_SIZE, (i % PAGES) * PAGE_SIZE))
                ).all()
                count = select(func.count()).select_from(BenchItem)
                (await s.exec(count.where(*_live(TENANT_DEEP)))).one()

        return _shared(
            {
                "get_held": get_held,
                "get_pool": get,
                "insert": insert,
                "update": update,
                "bulk": bulk,
                "page_total": page_total,
                "page_no_total": page_no_total,
                "offset_deep": offset_deep,
                "keyset_deep": keyset_deep,
                "tx_unit": unit,
                "page_total_big": page_total_big,
                "member_page_total": member_page_total,
                "member_keyset": member_keyset,
            }
        )


class _AdvancedAlchemyPeer(_Peer):
    what: ClassVar[dict[str, str]] = {
        "get_held": "`repo.get_one_or_none(...)` on a held session",
        "*": "`SQLAlchemyAsyncRepository` on a session per call "
        "(`auto_commit=True` for writes; `list_and_count` for the total)",
    }

    def calls(self) -> dict[str, Callable[[int], Awaitable[Any]]]:
        """Return the calls, one per operation."""
        # Imported as modules: advanced-alchemy is optional and may be absent.
        filters: Any = importlib.import_module("advanced_alchemy.filters")
        repository: Any = importlib.import_module("advanced_alchemy.repository")
        base = repository.SQLAlchemyAsyncRepository
        limit_offset, order_by = filters.LimitOffset, filters.OrderBy
        # A repository class per model, as its docs show (`model_type = ...`).
        repo_class: Any = type("Repo", (base,), {"model_type": BenchItem})
        bulk_class: Any = type("BulkRepo", (base,), {"model_type": BenchBulkItem})

        bench, ids, wids = self.bench, self.bench.page_ids, self.bench.write_ids
        self.held = self.session()
        held_repo = repo_class(session=self.held)
        order = (order_by("created_at", "asc"), order_by("id", "asc"))

        def by_id(key: Any, tenant: str) -> tuple[Any, ...]:
            return (col(BenchItem.id) == key, *_live(tenant))

        async def get_held(i: int) -> Any:
            return await held_repo.get_one_or_none(
                *by_id(ids[i % len(ids)], TENANT_PAGE)
            )

        async def get(i: int) -> Any:
            async with self.session() as s:
                return await repo_class(session=s).get_one_or_none(
                    *by_id(ids[i % len(ids)], TENANT_PAGE)
                )

        async def insert(i: int) -> None:
            async with self.session() as s:
                await bulk_class(session=s).add(_new_item(i), auto_commit=True)

        async def update(i: int) -> None:
            async with self.session() as s:
                repo = repo_class(session=s)
                row = await repo.get_one(*by_id(wids[i % len(wids)], TENANT_WRITE))
                row.rank = next(bench.sequence)
                await repo.update(row, auto_commit=True)

        items = bulk_items(bench.bulk_rows)

        async def bulk(_: int) -> None:
            async with self.session() as s:
                rows = [BenchBulkItem(**d, tenant_id=TENANT_BULK) for d in items]
                await bulk_class(session=s).add_many(rows, auto_commit=True)

        async def page_total(i: int) -> None:
            async with self.session() as s:
                await repo_class(session=s).list_and_count(
                    limit_offset(PAGE_SIZE, (i % PAGES) * PAGE_SIZE),
                    *order,
                    *_live(TENANT_PAGE),
                )

        async def page_no_total(i: int) -> None:
            async with self.session() as s:
                await repo_class(session=s).list(
                    limit_offset(PAGE_SIZE + 1, (i % PAGES) * PAGE_SIZE),
                    *order,
                    *_live(TENANT_PAGE),
                )

        async def offset_deep(_: int) -> None:
            async with self.session() as s:
                await repo_class(session=s).list(
                    limit_offset(PAGE_SIZE + 1, bench.sizes.deep_offset),
                    *order,
                    *_live(TENANT_DEEP),
                )

        at, last = bench.deep_after

        async def keyset_deep(_: int) -> None:
            async with self.session() as s:
                await repo_class(session=s).list(
                    limit_offset(PAGE_SIZE + 1, 0),
                    *order,
                    *_live(TENANT_DEEP),
                    tuple_(*_order()) > tuple_(at, last),
                )

        async def unit(i: int) -> None:
            a, b = wids[(2 * i) % len(wids)], wids[(2 * i + 1) % len(wids)]
            async with self.session() as s:
                repo = repo_class(session=s)
                first = await repo.get_one(*by_id(a, TENANT_WRITE))
                second = await repo.get_one(*by_id(b, TENANT_WRITE))
                first.rank -= 1
                second.rank += 1
                await repo.update(first)
                await repo.update(second)
                await s.commit()

        member_class: Any = type("MemberRepo", (base,), {"model_type": BenchMember})
        member_order = (order_by("created_at", "asc"), order_by("id", "asc"))

        async def member_page_total(i: int) -> None:
            async with self.session() as s:
                await member_class(session=s).list_and_count(
                    limit_offset(PAGE_SIZE, (i % MEMBER_PAGES) * PAGE_SIZE),
                    *member_order,
                    *_active(),
                )

        m_at, m_last = bench.member_after

        async def member_keyset(_: int) -> None:
            async with self.session() as s:
                await member_class(session=s).list(
                    limit_offset(PAGE_SIZE + 1, 0),
                    *member_order,
                    *_active(),
                    tuple_(*_member_order()) > tuple_(m_at, m_last),
                )

        async def page_total_big(i: int) -> None:
            async with self.session() as s:
                await repo_class(session=s).list_and_count(
                    limit_offset(PAGE_SIZE, (i % PAGES) * PAGE_SIZE),
                    *order,
                    *_live(TENANT_DEEP),
                )

        return _shared(
            {
                "get_held": get_held,
                "get_pool": get,
                "insert": insert,
                "update": update,
                "bulk": bulk,
                "page_total": page_total,
                "page_no_total": page_no_total,
                "offset_deep": offset_deep,
                "keyset_deep": keyset_deep,
                "tx_unit": unit,
                "page_total_big": page_total_big,
                "member_page_total": member_page_total,
                "member_keyset": member_keyset,
            }
        )


class _ItemCreate(SQLModel):
    """fastcrud's create schema for the measured table."""

    email: str
    name: str
    rank: int
    tenant_id: str


class _FastCRUDPeer(_Peer):
    what: ClassVar[dict[str, str]] = {
        "get_held": "`crud.get(session, id=...)` on a held session",
        "*": "`FastCRUD(model)` on a session per call (`get`, `create`, "
        "`update`, `get_multi`, `get_multi_by_cursor`); it has no bulk insert",
    }

    def calls(self) -> dict[str, Callable[[int], Awaitable[Any]]]:
        """Return the calls, one per operation (no bulk insert in fastcrud)."""
        fastcrud: Any = importlib.import_module("fastcrud")  # optional: may be absent
        crud = fastcrud.FastCRUD(BenchItem)
        bulk_crud = fastcrud.FastCRUD(BenchBulkItem)
        bench, ids, wids = self.bench, self.bench.page_ids, self.bench.write_ids
        self.held = self.session()
        held = self.held
        live = col(BenchItem.deleted_at).is_(None)

        async def get_held(i: int) -> Any:
            return await crud.get(
                held, id=ids[i % len(ids)], tenant_id=TENANT_PAGE, where=live
            )

        async def get(i: int) -> Any:
            async with self.session() as s:
                return await crud.get(
                    s, id=ids[i % len(ids)], tenant_id=TENANT_PAGE, where=live
                )

        async def insert(i: int) -> None:
            row = _ItemCreate(**new_values(i), tenant_id=TENANT_WRITE)
            async with self.session() as s:
                await bulk_crud.create(s, row)

        async def update(i: int) -> None:
            async with self.session() as s:
                await crud.update(
                    s,
                    {"rank": next(bench.sequence)},
                    id=wids[i % len(wids)],
                    tenant_id=TENANT_WRITE,
                    where=live,
                )

        def multi(s: Any, tenant: str, limit: int, offset: int, total: bool) -> Any:
            return crud.get_multi(
                s,
                offset=offset,
                limit=limit,
                sort_columns=["created_at", "id"],
                return_total_count=total,
                tenant_id=tenant,
                where=live,
            )

        async def page_total(i: int) -> None:
            async with self.session() as s:
                offset = (i % PAGES) * PAGE_SIZE
                await multi(s, TENANT_PAGE, PAGE_SIZE, offset, total=True)

        async def page_no_total(i: int) -> None:
            async with self.session() as s:
                offset = (i % PAGES) * PAGE_SIZE
                await multi(s, TENANT_PAGE, PAGE_SIZE + 1, offset, total=False)

        async def offset_deep(_: int) -> None:
            async with self.session() as s:
                deep = bench.sizes.deep_offset
                await multi(s, TENANT_DEEP, PAGE_SIZE + 1, deep, total=False)

        at: datetime = bench.deep_after[0].astimezone(UTC)

        async def keyset_deep(_: int) -> None:
            # created_at is unique here, so one sort column is a valid keyset.
            async with self.session() as s:
                await crud.get_multi_by_cursor(
                    s,
                    cursor=at,
                    limit=PAGE_SIZE,
                    sort_column="created_at",
                    tenant_id=TENANT_DEEP,
                    where=live,
                )

        async def unit(i: int) -> None:
            a, b = wids[(2 * i) % len(wids)], wids[(2 * i + 1) % len(wids)]
            async with self.session() as s:
                first = await crud.get(s, id=a, tenant_id=TENANT_WRITE, where=live)
                second = await crud.get(s, id=b, tenant_id=TENANT_WRITE, where=live)
                for key, rank in ((a, first["rank"] - 1), (b, second["rank"] + 1)):
                    await crud.update(
                        s,
                        {"rank": rank},
                        commit=False,
                        id=key,
                        tenant_id=TENANT_WRITE,
                        where=live,
                    )
                await s.commit()

        members = fastcrud.FastCRUD(BenchMember)
        member_live = col(BenchMember.deleted_at).is_(None)

        async def member_page_total(i: int) -> None:
            async with self.session() as s:
                await members.get_multi(
                    s,
                    offset=(i % MEMBER_PAGES) * PAGE_SIZE,
                    limit=PAGE_SIZE,
                    sort_columns=["created_at", "id"],
                    return_total_count=True,
                    tenant_id=TENANT_MEMBER,
                    active=True,
                    where=member_live,
                )

        m_at: datetime = bench.member_after[0].astimezone(UTC)

        async def member_keyset(_: int) -> None:
            async with self.session() as s:
                await members.get_multi_by_cursor(
                    s,
                    cursor=m_at,
                    limit=PAGE_SIZE,
                    sort_column="created_at",
                    tenant_id=TENANT_MEMBER,
                    active=True,
                    where=member_live,
                )

        async def page_total_big(i: int) -> None:
            async with self.session() as s:
                offset = (i % PAGES) * PAGE_SIZE
                await multi(s, TENANT_DEEP, PAGE_SIZE, offset, total=True)

        return _shared(
            {
                "get_held": get_held,
                "get_pool": get,
                "insert": insert,
                "update": update,
                "page_total": page_total,
                "page_no_total": page_no_total,
                "offset_deep": offset_deep,
                "keyset_deep": keyset_deep,
                "tx_unit": unit,
                "page_total_big": page_total_big,
                "member_page_total": member_page_total,
                "member_keyset": member_keyset,
            }
        )


_CLASSES: dict[str, type[_Peer]] = {
    "sqlmodel": _SQLModelPeer,
    "advanced_alchemy": _AdvancedAlchemyPeer,
    "fastcrud": _FastCRUDPeer,
}

_TENANTS = {
    "get_held": TENANT_PAGE,
    "get_pool": TENANT_PAGE,
    "insert": TENANT_WRITE,
    "update": TENANT_WRITE,
    "bulk": TENANT_BULK,
    "page_total": TENANT_PAGE,
    "page_no_total": TENANT_PAGE,
    "offset_deep": TENANT_DEEP,
    "keyset_deep": TENANT_DEEP,
    "tx_get": TENANT_PAGE,
    "tx_insert": TENANT_WRITE,
    "tx_update": TENANT_WRITE,
    "tx_unit": TENANT_WRITE,
    "page_total_big": TENANT_DEEP,
    "member_page_total": TENANT_MEMBER,
    "member_keyset": TENANT_MEMBER,
    "idle_get": TENANT_PAGE,
    "idle_write": TENANT_WRITE,
}


def add_peers(op: Operation, bench: Bench, peers: list[str]) -> None:
    """Add the given peers' implementations of `op` (when they support it)."""
    for key in peers:
        peer = _CLASSES[key](bench)
        call = peer.calls().get(op.key)
        op.close.append(peer.close)
        if call is None:
            continue
        run = spread_over_tasks(call, TASKS) if op.key == "get_pool" else loop(call)
        op.runs[key] = scoped(_TENANTS[op.key], run)
        op.what[key] = peer.what.get(op.key, peer.what["*"])
