"""Operations the way services run them: units of work, idle gaps, other shapes.

- **Inside a `TransactionManager`**: a get, an insert and an update each in a
  unit of work of their own, and the handbook's transfer (two reads, two
  writes) against the raw driver's `async with conn.transaction()`.
- **After an idle gap**: groups of calls separated by a pause longer than
  every idle threshold of the library (the 2 s liveness check), so the first
  call of every group finds connections that sat unused.
- **Big tenant**: a page of 50 with its total in the deep (58,000-row) tenant.
- **Second shape**: the member table, whose pages filter on an `active` flag
  that its index `(tenant_id, active, created_at, id)` covers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, bindparam, func, select, tuple_

from dotmac_core import TransactionManager
from dotmac_core.db._pool import PING_AFTER

from ._harness import Operation, loop
from ._ops_db import (
    _CORE,
    PAGES,
    _raw_sql,
    core_new_row,
    new_values,
    raw_new_args,
    scoped,
)
from ._setup import (
    MEMBER_PAGE_ROWS,
    PAGE_SIZE,
    TENANT_DEEP,
    TENANT_MEMBER,
    TENANT_WRITE,
    Bench,
    BulkItems,
    Items,
    Members,
    member_table,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["IDLE_PAUSE", "UNIT_OPERATIONS"]

#: Seconds between groups of calls: longer than every idle threshold.
IDLE_PAUSE = PING_AFTER + 0.5
#: Calls per group after an idle gap.
IDLE_GROUP = 10
_MEMBER_PAGES = MEMBER_PAGE_ROWS // PAGE_SIZE

_WHAT_RAW_TX = "`async with conn.transaction()` on a held connection"
_WHAT_CORE_TX = "prebuilt statements in `async with engine.begin()`"


def _unit_op(
    key: str,
    title: str,
    calls: dict[str, Callable[[int], Awaitable[None]]],
    what: dict[str, str],
    tenant: str = TENANT_WRITE,
) -> Operation:
    return Operation(
        key=key,
        title=title,
        runs={impl: scoped(tenant, loop(call)) for impl, call in calls.items()},
        what=what,
    )


async def tx_get(bench: Bench) -> Operation:
    """Get by id in a unit of work of its own (`TransactionManager`)."""
    raw, sql, engine, db = bench.raw, _raw_sql(bench), bench.db.engine, bench.db
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=db)

    async def raw_call(i: int) -> None:
        async with raw.transaction():
            await raw.fetchrow(sql.get, keys[i % k], TENANT_WRITE)

    async def core_call(i: int) -> None:
        async with engine.begin() as conn:
            params = {"key": ids[i % k], "tenant": TENANT_WRITE}
            (await conn.execute(_CORE.get, params)).first()

    async def dotmac_call(i: int) -> None:
        async with TransactionManager(db):
            await repo.get_by_id(ids[i % k])

    return _unit_op(
        "tx_get",
        "get by id in a TransactionManager",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": _WHAT_RAW_TX,
            "core": _WHAT_CORE_TX,
            "dotmac": "`async with TransactionManager(): await items.get_by_id(id)`",
        },
    )


async def tx_insert(bench: Bench) -> Operation:
    """Insert one row in a unit of work of its own."""
    raw, sql, engine, db = bench.raw, _raw_sql(bench), bench.db.engine, bench.db
    repo = BulkItems(db=db)

    async def raw_call(i: int) -> None:
        async with raw.transaction():
            await raw.execute(sql.bulk, *raw_new_args(raw, i, "tx"))

    async def core_call(i: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(_CORE.bulk, core_new_row(i, "tx"))

    async def dotmac_call(i: int) -> None:
        async with TransactionManager(db):
            await repo.create(new_values(i, "tx"))

    return _unit_op(
        "tx_insert",
        "insert one row in a TransactionManager",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": _WHAT_RAW_TX,
            "core": _WHAT_CORE_TX,
            "dotmac": "`async with TransactionManager(): await items.create({...})`",
        },
    )


async def tx_update(bench: Bench) -> Operation:
    """Update one row by id in a unit of work of its own."""
    raw, sql, engine, db = bench.raw, _raw_sql(bench), bench.db.engine, bench.db
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=db)
    fresh = bench.sequence

    async def raw_call(i: int) -> None:
        async with raw.transaction():
            await raw.fetchrow(
                sql.update, next(fresh), raw.now(), keys[i % k], TENANT_WRITE
            )

    async def core_call(i: int) -> None:
        params = {
            "new_rank": next(fresh),
            "now": datetime.now(UTC),
            "key": ids[i % k],
            "tenant": TENANT_WRITE,
        }
        async with engine.begin() as conn:
            (await conn.execute(_CORE.update, params)).first()

    async def dotmac_call(i: int) -> None:
        async with TransactionManager(db):
            await repo.update(ids[i % k], {"rank": next(fresh)})

    return _unit_op(
        "tx_update",
        "update one row in a TransactionManager",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": _WHAT_RAW_TX + " (`UPDATE ... RETURNING`)",
            "core": _WHAT_CORE_TX + " (`UPDATE ... RETURNING`)",
            "dotmac": "`async with TransactionManager():` "
            "`await items.update(id, {...})`",
        },
    )


async def tx_unit(bench: Bench) -> Operation:
    """The handbook's transfer: read two rows, write both, one transaction."""
    raw, sql, engine, db = bench.raw, _raw_sql(bench), bench.db.engine, bench.db
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=db)

    rank = bench.columns.index("rank")

    def pair(i: int) -> tuple[int, int]:
        return (2 * i) % k, (2 * i + 1) % k

    async def raw_call(i: int) -> None:
        a, b = pair(i)
        async with raw.transaction():
            first = await raw.fetchrow(sql.get, keys[a], TENANT_WRITE)
            second = await raw.fetchrow(sql.get, keys[b], TENANT_WRITE)
            now = raw.now()
            await raw.fetchrow(sql.update, first[rank] - 1, now, keys[a], TENANT_WRITE)
            await raw.fetchrow(sql.update, second[rank] + 1, now, keys[b], TENANT_WRITE)

    async def core_call(i: int) -> None:
        a, b = pair(i)
        async with engine.begin() as conn:
            get = {"tenant": TENANT_WRITE}
            first = (await conn.execute(_CORE.get, get | {"key": ids[a]})).one()
            second = (await conn.execute(_CORE.get, get | {"key": ids[b]})).one()
            now = datetime.now(UTC)
            for key, rank in ((ids[a], first.rank - 1), (ids[b], second.rank + 1)):
                params = {
                    "new_rank": rank,
                    "now": now,
                    "key": key,
                    "tenant": TENANT_WRITE,
                }
                (await conn.execute(_CORE.update, params)).first()

    async def dotmac_call(i: int) -> None:
        a, b = pair(i)
        async with TransactionManager(db):
            first = await repo.get_one(id=ids[a])
            second = await repo.get_one(id=ids[b])
            await repo.update(first.id, {"rank": first.rank - 1})
            await repo.update(second.id, {"rank": second.rank + 1})

    return _unit_op(
        "tx_unit",
        "unit of work: 2 reads + 2 writes (transfer)",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": _WHAT_RAW_TX + ": 2 `fetchrow`, 2 `UPDATE ... RETURNING`",
            "core": _WHAT_CORE_TX + ": 2 selects, 2 updates",
            "dotmac": "`async with TransactionManager():` 2 `get_one`, 2 `update`",
        },
    )


async def page_total_big(bench: Bench) -> Operation:
    """A page of 50 and the total in the deep tenant (pages 1 to 18)."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = Items(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.fetch(sql.page, TENANT_DEEP, PAGE_SIZE, (i % PAGES) * PAGE_SIZE)
        await raw.fetchval(sql.count, TENANT_DEEP)

    async def core_call(i: int) -> None:
        params = {
            "tenant": TENANT_DEEP,
            "limit": PAGE_SIZE,
            "offset": (i % PAGES) * PAGE_SIZE,
        }
        async with engine.connect() as conn:
            (await conn.execute(_CORE.page, params)).all()
            (await conn.execute(_CORE.count, {"tenant": TENANT_DEEP})).scalar_one()

    async def dotmac_call(i: int) -> None:
        await repo.list_paginated(page=1 + i % PAGES, size=PAGE_SIZE)

    return _unit_op(
        "page_total_big",
        f"page of 50 + total, {bench.sizes.deep_rows:,}-row tenant",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": "two queries (page, `count(*)`) on a held connection",
            "core": "prebuilt selects; `async with engine.connect()`, two statements",
            "dotmac": "`Items().list_paginated(page, size=50)`",
        },
        tenant=TENANT_DEEP,
    )


def _member_sql(bench: Bench) -> tuple[str, str, str]:
    table = member_table()
    cols = ", ".join(c.name for c in table.columns)
    live = "tenant_id = $1 AND active = $2 AND deleted_at IS NULL"
    order = "ORDER BY created_at, id"
    texts = (
        f"SELECT {cols} FROM {table.name} WHERE {live} {order} LIMIT $3 OFFSET $4",  # noqa: S608 - fixed names
        f"SELECT count(*) FROM {table.name} WHERE {live}",  # noqa: S608 - fixed names
        f"SELECT {cols} FROM {table.name} WHERE {live} "  # noqa: S608 - fixed names
        f"AND (created_at, id) > ($3, $4) {order} LIMIT $5",
    )
    page, count, after = (bench.raw.sql(text) for text in texts)
    return page, count, after


def _member_core() -> tuple[Any, Any, Any]:
    t = member_table()
    live = (
        t.c.tenant_id == bindparam("tenant"),
        t.c.active == bindparam("active"),
        t.c.deleted_at.is_(None),
    )
    order = (t.c.created_at, t.c.id)
    limit = bindparam("limit", type_=Integer)
    position = tuple_(
        bindparam("after_at", type_=t.c.created_at.type),
        bindparam("after_id", type_=t.c.id.type),
    )
    page = (
        select(t)
        .where(*live)
        .order_by(*order)
        .limit(limit)
        .offset(bindparam("offset", type_=Integer))
    )
    count = select(func.count()).select_from(t).where(*live)
    after = (
        select(t).where(*live, tuple_(*order) > position).order_by(*order).limit(limit)
    )
    return page, count, after


async def member_page_total(bench: Bench) -> Operation:
    """Second shape: a page of 50 active members and their total."""
    raw, engine = bench.raw, bench.db.engine
    page_sql, count_sql, _ = _member_sql(bench)
    page, count, _ = _member_core()
    repo = Members(db=bench.db)

    async def raw_call(i: int) -> None:
        offset = (i % _MEMBER_PAGES) * PAGE_SIZE
        await raw.fetch(page_sql, TENANT_MEMBER, True, PAGE_SIZE, offset)
        await raw.fetchval(count_sql, TENANT_MEMBER, True)

    async def core_call(i: int) -> None:
        live = {"tenant": TENANT_MEMBER, "active": True}
        params = live | {"limit": PAGE_SIZE, "offset": (i % _MEMBER_PAGES) * PAGE_SIZE}
        async with engine.connect() as conn:
            (await conn.execute(page, params)).all()
            (await conn.execute(count, live)).scalar_one()

    async def dotmac_call(i: int) -> None:
        await repo.list_paginated(
            page=1 + i % _MEMBER_PAGES, size=PAGE_SIZE, filters={"active": True}
        )

    return _unit_op(
        "member_page_total",
        "second shape: page of 50 + total, active=true",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": "two queries (page, `count(*)`) on a held connection",
            "core": "prebuilt selects; `async with engine.connect()`, two statements",
            "dotmac": "`Members().list_paginated(page, size=50, "
            'filters={"active": True})`',
        },
        tenant=TENANT_MEMBER,
    )


async def member_keyset(bench: Bench) -> Operation:
    """Second shape: the keyset page deep among the active members."""
    raw, engine = bench.raw, bench.db.engine
    _, _, after_sql = _member_sql(bench)
    _, _, after = _member_core()
    repo = Members(db=bench.db, security=bench.security)
    at, last = bench.member_after
    raw_at, raw_last = raw.stamp(at), raw.key(last)
    cursor = bench.member_cursor

    async def raw_call(_: int) -> None:
        await raw.fetch(after_sql, TENANT_MEMBER, True, raw_at, raw_last, PAGE_SIZE + 1)

    async def core_call(_: int) -> None:
        params = {
            "tenant": TENANT_MEMBER,
            "active": True,
            "after_at": at,
            "after_id": last,
            "limit": PAGE_SIZE + 1,
        }
        async with engine.connect() as conn:
            (await conn.execute(after, params)).all()

    async def dotmac_call(_: int) -> None:
        await repo.list_after(cursor, size=PAGE_SIZE, filters={"active": True})

    return _unit_op(
        "member_keyset",
        "second shape: keyset page, active=true",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": "`active = $2 AND (created_at, id) > ($3, $4) ... LIMIT 51`",
            "core": "prebuilt select; `async with engine.connect()`",
            "dotmac": "`Members().list_after(cursor, size=50, "
            'filters={"active": True})`',
        },
        tenant=TENANT_MEMBER,
    )


def _idle(op: Operation, pause: float) -> Operation:
    """Make every sample one group of calls after `pause` seconds of idleness."""

    async def wait() -> None:
        await asyncio.sleep(pause)

    op.fixed_calls = IDLE_GROUP
    op.reset = wait
    return op


async def idle_get(bench: Bench, pause: float = IDLE_PAUSE) -> Operation:
    """Get by id from the pool, in groups of 10 after an idle gap."""
    raw, sql = bench.raw, _raw_sql(bench)
    engine = bench.db.engine
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.pooled_fetchrow(sql.get, keys[i % k], TENANT_WRITE)

    async def core_call(i: int) -> None:
        async with engine.connect() as conn:
            params = {"key": ids[i % k], "tenant": TENANT_WRITE}
            (await conn.execute(_CORE.get, params)).first()

    async def dotmac_call(i: int) -> None:
        await repo.get_by_id(ids[i % k])

    op = _unit_op(
        "idle_get",
        f"get by id, groups of {IDLE_GROUP} after {pause:g} s idle",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": "`Pool.fetchrow` (asyncpg) / a queue of connections (aiosqlite)",
            "core": "prebuilt select(); `async with engine.connect()` per call",
            "dotmac": "`Items().get_by_id(id)`",
        },
    )
    return _idle(op, pause)


async def idle_write(bench: Bench, pause: float = IDLE_PAUSE) -> Operation:
    """Update and insert in turn, committed, in groups of 10 after an idle gap."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    items, bulk = Items(db=bench.db), BulkItems(db=bench.db)
    fresh = bench.sequence

    async def raw_call(i: int) -> None:
        if i % 2:
            now = raw.now()
            await raw.fetchrow(sql.update, next(fresh), now, keys[i % k], TENANT_WRITE)
            return
        await raw.execute(sql.bulk, *raw_new_args(raw, i, "idle"))

    async def core_call(i: int) -> None:
        async with engine.begin() as conn:
            if i % 2:
                params = {
                    "new_rank": next(fresh),
                    "now": datetime.now(UTC),
                    "key": ids[i % k],
                    "tenant": TENANT_WRITE,
                }
                (await conn.execute(_CORE.update, params)).first()
                return
            await conn.execute(_CORE.bulk, core_new_row(i, "idle"))

    async def dotmac_call(i: int) -> None:
        if i % 2:
            await items.update(ids[i % k], {"rank": next(fresh)})
            return
        await bulk.create(new_values(i, "idle"))

    op = _unit_op(
        "idle_write",
        f"insert / update + commit, groups of {IDLE_GROUP} after {pause:g} s idle",
        {"raw": raw_call, "core": core_call, "dotmac": dotmac_call},
        {
            "raw": "autocommit `INSERT` / `UPDATE ... RETURNING`, held connection",
            "core": "prebuilt statements; `async with engine.begin()` per call",
            "dotmac": "`BulkItems().create({...})` / `Items().update(id, {...})`",
        },
    )
    return _idle(op, pause)


#: Operation key to its builder, in the order the report lists them.
UNIT_OPERATIONS: dict[str, Callable[[Bench], Awaitable[Operation]]] = {
    "tx_get": tx_get,
    "tx_insert": tx_insert,
    "tx_update": tx_update,
    "tx_unit": tx_unit,
    "page_total_big": page_total_big,
    "member_page_total": member_page_total,
    "member_keyset": member_keyset,
    "idle_get": idle_get,
    "idle_write": idle_write,
}
