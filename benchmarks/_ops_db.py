"""The database operations, each for the raw driver, SQLAlchemy Core and dotmac_core.

Who runs what, per call:

- **raw driver** (asyncpg / aiosqlite): the fewest round trips the job needs,
  on one held connection in autocommit (the concurrent get uses the driver's
  pool). Hand-written SQL carries the same tenant and soft-delete conditions.
- **SQLAlchemy Core**: a statement built once, run the plain Core way on
  dotmac_core's own engine (its pool and checkout check): `engine.connect()`
  per read (implicit BEGIN, ROLLBACK on close), `engine.begin()` per write;
  the held-session get holds one connection.
- **dotmac_core**: the public repository API as documented, outside any
  explicit transaction (each call one statement on the driver, or its own
  transaction), with tenant and soft-delete scoping on (`tenant_scope`, a
  `TenantBaseModel` + `AuditMixin` table).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, bindparam, func, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession

from dotmac_core import tenant_scope

from ._harness import Operation, Run, loop, spread_over_tasks
from ._raw import AsyncpgDriver
from ._setup import (
    PAGE_ROWS,
    PAGE_SIZE,
    TASKS,
    TENANT_BULK,
    TENANT_DEEP,
    TENANT_PAGE,
    TENANT_WRITE,
    Bench,
    BenchBulkItem,
    BulkItems,
    Items,
    bulk_table,
    item_table,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.sql import Executable

__all__ = ["DB_OPERATIONS", "INSERT_COLUMNS", "PAGES", "bulk_items", "scoped"]

#: Columns an insert names: the nullable audit and soft-delete ones stay NULL.
INSERT_COLUMNS = (
    "id",
    "created_at",
    "updated_at",
    "tenant_id",
    "email",
    "name",
    "rank",
)
PAGES = PAGE_ROWS // PAGE_SIZE


def scoped(tenant: str, run: Run) -> Run:
    """Return `run` wrapped in `tenant_scope(tenant)` (for every implementation)."""

    async def scoped_run(n: int) -> None:
        with tenant_scope(tenant):
            await run(n)

    return scoped_run


def bulk_items(count: int) -> list[dict[str, Any]]:
    """Return the bulk insert's input: what a caller has before any library runs."""
    return [
        {"email": f"bulk{i}@bench.example", "name": f"Bulk {i}", "rank": i}
        for i in range(count)
    ]


@dataclass(frozen=True)
class _RawSql:
    get: str
    update: str
    page: str
    count: str
    after: str
    bulk: str


def _raw_sql(bench: Bench) -> _RawSql:
    table, bulk = item_table().name, bulk_table().name
    cols = ", ".join(bench.columns)
    live = "tenant_id = $1 AND deleted_at IS NULL"
    order = "ORDER BY created_at, id"
    names = ", ".join(INSERT_COLUMNS)
    marks = ", ".join(f"${i + 1}" for i in range(len(INSERT_COLUMNS)))
    texts = _RawSql(
        get=f"SELECT {cols} FROM {table} "  # noqa: S608 - fixed names
        "WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
        update=f"UPDATE {table} SET rank = $1, updated_at = $2 "  # noqa: S608 - fixed names
        f"WHERE id = $3 AND tenant_id = $4 AND deleted_at IS NULL RETURNING {cols}",
        page=f"SELECT {cols} FROM {table} WHERE {live} {order} LIMIT $2 OFFSET $3",  # noqa: S608 - fixed names
        count=f"SELECT count(*) FROM {table} WHERE {live}",  # noqa: S608 - fixed names
        after=f"SELECT {cols} FROM {table} WHERE {live} "  # noqa: S608 - fixed names
        f"AND (created_at, id) > ($2, $3) {order} LIMIT $4",
        bulk=f"INSERT INTO {bulk} ({names}) VALUES ({marks})",  # noqa: S608 - fixed names
    )
    return _RawSql(**{k: bench.raw.sql(v) for k, v in texts.__dict__.items()})


@dataclass(frozen=True)
class _CoreSql:
    get: Executable
    update: Executable
    page: Executable
    count: Executable
    after: Executable
    bulk: Executable


def _core_sql() -> _CoreSql:
    t = item_table()
    live = (t.c.tenant_id == bindparam("tenant"), t.c.deleted_at.is_(None))
    order = (t.c.created_at, t.c.id)
    limit = bindparam("limit", type_=Integer)
    position = tuple_(
        bindparam("after_at", type_=t.c.created_at.type),
        bindparam("after_id", type_=t.c.id.type),
    )
    return _CoreSql(
        get=select(t).where(t.c.id == bindparam("key"), *live),
        update=update(t)
        .where(t.c.id == bindparam("key"), *live)
        .values(rank=bindparam("new_rank"), updated_at=bindparam("now"))
        .returning(*t.c),
        page=select(t)
        .where(*live)
        .order_by(*order)
        .limit(limit)
        .offset(bindparam("offset", type_=Integer)),
        count=select(func.count()).select_from(t).where(*live),
        after=select(t)
        .where(*live, tuple_(t.c.created_at, t.c.id) > position)
        .order_by(*order)
        .limit(limit),
        bulk=insert(bulk_table()),
    )


_CORE = _core_sql()

_WHAT_CORE_READ = "prebuilt select(); `async with engine.connect()` per call"
_WHAT_CORE_WRITE = "prebuilt statement; `async with engine.begin()` per call"


async def get_held(bench: Bench) -> Operation:
    """Get by primary key on a held session / connection, one call at a time."""
    raw, sql = bench.raw, _raw_sql(bench)
    ids = bench.page_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    conn = await bench.db.engine.connect()
    session = bench.db.session()
    repo = Items(session)

    async def raw_call(i: int) -> None:
        await raw.fetchrow(sql.get, keys[i % k], TENANT_PAGE)

    async def core_call(i: int) -> None:
        params = {"key": ids[i % k], "tenant": TENANT_PAGE}
        (await conn.execute(_CORE.get, params)).first()

    async def dotmac_call(i: int) -> None:
        await repo.get_by_id(ids[i % k])

    return Operation(
        key="get_held",
        title="get by primary key, held session",
        runs={
            "raw": scoped(TENANT_PAGE, loop(raw_call)),
            "core": scoped(TENANT_PAGE, loop(core_call)),
            "dotmac": scoped(TENANT_PAGE, loop(dotmac_call)),
        },
        what={
            "raw": "`fetchrow` on a held connection",
            "core": "prebuilt select() on a held `AsyncConnection`",
            "dotmac": "`Items(session).get_by_id(id)` on a held `db.session()` "
            "(on the session's connection, inside its transaction)",
        },
        close=[conn.close, session.close],
    )


async def get_pool(bench: Bench) -> Operation:
    """Get by primary key from 200 concurrent tasks over a pool of 20."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    ids = bench.page_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.pooled_fetchrow(sql.get, keys[i % k], TENANT_PAGE)

    async def core_call(i: int) -> None:
        async with engine.connect() as conn:
            params = {"key": ids[i % k], "tenant": TENANT_PAGE}
            (await conn.execute(_CORE.get, params)).first()

    async def dotmac_call(i: int) -> None:
        await repo.get_by_id(ids[i % k])

    return Operation(
        key="get_pool",
        title="get by primary key, 200 tasks over a pool of 20",
        runs={
            impl: scoped(TENANT_PAGE, spread_over_tasks(call, TASKS))
            for impl, call in (
                ("raw", raw_call),
                ("core", core_call),
                ("dotmac", dotmac_call),
            )
        },
        what={
            "raw": "`Pool.fetchrow` (asyncpg) / a queue of 20 connections (aiosqlite)",
            "core": _WHAT_CORE_READ,
            "dotmac": "`Items().get_by_id(id)`: one statement in autocommit",
        },
        batch=TASKS,
    )


def new_values(i: int, prefix: str = "new") -> dict[str, Any]:
    """The fields a benchmark's i-th inserted row gets (`repo.create(...)`)."""
    return {"email": f"{prefix}{i}@bench.example", "name": "New", "rank": i}


def raw_new_args(raw: Any, i: int, prefix: str = "new") -> tuple[Any, ...]:
    """The raw INSERT's arguments for that row (`sql.bulk`), stamped now."""
    now = raw.now()
    values = new_values(i, prefix)
    return (raw.key(uuid.uuid4()), now, now, TENANT_WRITE, *values.values())


def core_new_row(i: int, prefix: str = "new") -> dict[str, Any]:
    """Core's INSERT parameters for that row (`_CORE.bulk`), stamped now."""
    now = datetime.now(UTC)
    return {
        "id": uuid.uuid4(),
        "created_at": now,
        "updated_at": now,
        "tenant_id": TENANT_WRITE,
        **new_values(i, prefix),
    }


async def insert_one(bench: Bench) -> Operation:
    """Insert one row and commit it (into the bulk table, so reads see no growth)."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = BulkItems(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.execute(sql.bulk, *raw_new_args(raw, i))

    async def core_call(i: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(_CORE.bulk, core_new_row(i))

    async def dotmac_call(i: int) -> None:
        await repo.create(new_values(i))

    return Operation(
        key="insert",
        title="insert one row and commit",
        runs={
            "raw": scoped(TENANT_WRITE, loop(raw_call)),
            "core": scoped(TENANT_WRITE, loop(core_call)),
            "dotmac": scoped(TENANT_WRITE, loop(dotmac_call)),
        },
        what={
            "raw": "autocommit `INSERT` on a held connection",
            "core": _WHAT_CORE_WRITE,
            "dotmac": "`BulkItems().create({...})`: one INSERT in autocommit",
        },
    )


async def update_one(bench: Bench) -> Operation:
    """Update one row by primary key to a new value, commit, get the row back."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    ids = bench.write_ids
    keys, k = [raw.key(i) for i in ids], len(ids)
    repo = Items(db=bench.db)
    fresh = bench.sequence

    async def raw_call(i: int) -> None:
        rank = next(fresh)
        await raw.fetchrow(sql.update, rank, raw.now(), keys[i % k], TENANT_WRITE)

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
        await repo.update(ids[i % k], {"rank": next(fresh)})

    return Operation(
        key="update",
        title="update one row by id and commit",
        runs={
            "raw": scoped(TENANT_WRITE, loop(raw_call)),
            "core": scoped(TENANT_WRITE, loop(core_call)),
            "dotmac": scoped(TENANT_WRITE, loop(dotmac_call)),
        },
        what={
            "raw": "autocommit `UPDATE ... RETURNING` on a held connection",
            "core": _WHAT_CORE_WRITE + " (`UPDATE ... RETURNING`)",
            "dotmac": "`Items().update(id, {...})`: one UPDATE ... RETURNING",
        },
    )


async def bulk_insert(bench: Bench) -> Operation:
    """Insert `bench.bulk_rows` rows in one call (one transaction)."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    items = bulk_items(bench.bulk_rows)
    repo = BulkItems(db=bench.db)

    def rows(now: Any, key: Callable[[uuid.UUID], Any]) -> list[tuple[Any, ...]]:
        return [
            (key(uuid.uuid4()), now, now, TENANT_BULK, d["email"], d["name"], d["rank"])
            for d in items
        ]

    async def raw_run(n: int) -> None:
        for _ in range(n):
            await raw.executemany(sql.bulk, rows(raw.now(), raw.key))

    async def core_run(n: int) -> None:
        for _ in range(n):
            now = datetime.now(UTC)
            params = [
                {
                    "id": uuid.uuid4(),
                    "created_at": now,
                    "updated_at": now,
                    "tenant_id": TENANT_BULK,
                    **item,
                }
                for item in items
            ]
            async with engine.begin() as conn:
                await conn.execute(_CORE.bulk, params)

    async def orm_run(n: int) -> None:
        for _ in range(n):
            now = datetime.now(UTC)
            params = [
                {
                    "id": uuid.uuid4(),
                    "created_at": now,
                    "updated_at": now,
                    "tenant_id": TENANT_BULK,
                    **item,
                }
                for item in items
            ]
            async with SAAsyncSession(engine) as session:
                await session.execute(insert(BenchBulkItem), params)
                await session.commit()

    async def dotmac_run(n: int) -> None:
        for _ in range(n):
            await repo.create_many(items)

    runs: dict[str, Run] = {"raw": raw_run}
    what = {
        "raw": "`executemany` in one transaction (aiosqlite: BEGIN ... COMMIT)",
        "core": "`conn.execute(insert(table), rows)` in `engine.begin()`",
        "orm": "`session.execute(insert(Model), rows)` + `commit()` (ORM bulk "
        "INSERT, SQLAlchemy's own way for a list of dicts)",
        "dotmac": "`BulkItems().create_many(items)`: COPY in autocommit "
        "(PostgreSQL), executemany in a transaction (SQLite)",
    }
    if isinstance(raw, AsyncpgDriver):
        pg = raw

        async def copy_run(n: int) -> None:
            for _ in range(n):
                await pg.copy(bulk_table().name, INSERT_COLUMNS, rows(pg.now(), pg.key))

        runs["raw_copy"] = copy_run
        what["raw_copy"] = "`copy_records_to_table` in one transaction"
    runs |= {"core": core_run, "orm": orm_run, "dotmac": dotmac_run}

    async def empty() -> None:
        await raw.empty(bulk_table().name)

    return Operation(
        key="bulk",
        title=f"bulk insert {bench.bulk_rows:,} rows",
        runs={impl: scoped(TENANT_BULK, run) for impl, run in runs.items()},
        what=what,
        per=f"{bench.bulk_rows:,} rows",
        fixed_calls=1,
        reset=empty,
    )


def _page_op(
    *,
    key: str,
    title: str,
    tenant: str,
    raw_call: Callable[[int], Awaitable[None]],
    core_call: Callable[[int], Awaitable[None]],
    dotmac_call: Callable[[int], Awaitable[None]],
    what: dict[str, str],
) -> Operation:
    return Operation(
        key=key,
        title=title,
        runs={
            "raw": scoped(tenant, loop(raw_call)),
            "core": scoped(tenant, loop(core_call)),
            "dotmac": scoped(tenant, loop(dotmac_call)),
        },
        what=what,
    )


async def page_total(bench: Bench) -> Operation:
    """A page of 50 and the total, in the 900-row tenant (pages 1 to 18 in turn)."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = Items(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.fetch(sql.page, TENANT_PAGE, PAGE_SIZE, (i % PAGES) * PAGE_SIZE)
        await raw.fetchval(sql.count, TENANT_PAGE)

    async def core_call(i: int) -> None:
        params = {
            "tenant": TENANT_PAGE,
            "limit": PAGE_SIZE,
            "offset": (i % PAGES) * PAGE_SIZE,
        }
        async with engine.connect() as conn:
            (await conn.execute(_CORE.page, params)).all()
            (await conn.execute(_CORE.count, {"tenant": TENANT_PAGE})).scalar_one()

    async def dotmac_call(i: int) -> None:
        await repo.list_paginated(page=1 + i % PAGES, size=PAGE_SIZE)

    return _page_op(
        key="page_total",
        title="page of 50 + total, 900-row tenant",
        tenant=TENANT_PAGE,
        raw_call=raw_call,
        core_call=core_call,
        dotmac_call=dotmac_call,
        what={
            "raw": "two queries (page, `count(*)`) on a held connection",
            "core": _WHAT_CORE_READ + ", two statements",
            "dotmac": "`Items().list_paginated(page, size=50)`: page and total "
            "in one query",
        },
    )


async def page_no_total(bench: Bench) -> Operation:
    """A page of 50 without the total (one row more tells whether a next exists)."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = Items(db=bench.db)

    async def raw_call(i: int) -> None:
        await raw.fetch(sql.page, TENANT_PAGE, PAGE_SIZE + 1, (i % PAGES) * PAGE_SIZE)

    async def core_call(i: int) -> None:
        params = {
            "tenant": TENANT_PAGE,
            "limit": PAGE_SIZE + 1,
            "offset": (i % PAGES) * PAGE_SIZE,
        }
        async with engine.connect() as conn:
            (await conn.execute(_CORE.page, params)).all()

    async def dotmac_call(i: int) -> None:
        await repo.list_paginated(page=1 + i % PAGES, size=PAGE_SIZE, with_total=False)

    return _page_op(
        key="page_no_total",
        title="page of 50 without total (with_total=False)",
        tenant=TENANT_PAGE,
        raw_call=raw_call,
        core_call=core_call,
        dotmac_call=dotmac_call,
        what={
            "raw": "one query (51 rows) on a held connection",
            "core": _WHAT_CORE_READ,
            "dotmac": "`Items().list_paginated(page, size=50, with_total=False)`",
        },
    )


async def offset_deep(bench: Bench) -> Operation:
    """The offset page deep in the deep tenant (row 50,000 of 58,000), no total."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = Items(db=bench.db)
    deep, rows = bench.sizes.deep_offset, bench.sizes.deep_rows
    page = deep // PAGE_SIZE + 1

    async def raw_call(_: int) -> None:
        await raw.fetch(sql.page, TENANT_DEEP, PAGE_SIZE + 1, deep)

    async def core_call(_: int) -> None:
        params = {"tenant": TENANT_DEEP, "limit": PAGE_SIZE + 1, "offset": deep}
        async with engine.connect() as conn:
            (await conn.execute(_CORE.page, params)).all()

    async def dotmac_call(_: int) -> None:
        await repo.list_paginated(page=page, size=PAGE_SIZE, with_total=False)

    return _page_op(
        key="offset_deep",
        title=f"offset page at {deep:,}, {rows:,}-row tenant",
        tenant=TENANT_DEEP,
        raw_call=raw_call,
        core_call=core_call,
        dotmac_call=dotmac_call,
        what={
            "raw": f"`OFFSET {deep} LIMIT 51` on a held connection",
            "core": _WHAT_CORE_READ,
            "dotmac": f"`Items().list_paginated(page={page}, size=50, "
            "with_total=False)`",
        },
    )


async def keyset_deep(bench: Bench) -> Operation:
    """The keyset page at the deep offset of the deep tenant: the same 50 rows."""
    raw, sql, engine = bench.raw, _raw_sql(bench), bench.db.engine
    repo = Items(db=bench.db, security=bench.security)
    at, last = bench.deep_after
    raw_at, raw_last = raw.stamp(at), raw.key(last)
    cursor = bench.deep_cursor

    async def raw_call(_: int) -> None:
        await raw.fetch(sql.after, TENANT_DEEP, raw_at, raw_last, PAGE_SIZE + 1)

    async def core_call(_: int) -> None:
        params = {
            "tenant": TENANT_DEEP,
            "after_at": at,
            "after_id": last,
            "limit": PAGE_SIZE + 1,
        }
        async with engine.connect() as conn:
            (await conn.execute(_CORE.after, params)).all()

    async def dotmac_call(_: int) -> None:
        await repo.list_after(cursor, size=PAGE_SIZE)

    return _page_op(
        key="keyset_deep",
        title=f"keyset page deep in a {bench.sizes.deep_rows:,}-row tenant",
        tenant=TENANT_DEEP,
        raw_call=raw_call,
        core_call=core_call,
        dotmac_call=dotmac_call,
        what={
            "raw": "`(created_at, id) > ($2, $3) ... LIMIT 51` on a held connection",
            "core": _WHAT_CORE_READ,
            "dotmac": "`Items().list_after(cursor, size=50)` (signed cursor)",
        },
    )


#: Operation key to its builder, in the order the report lists them.
DB_OPERATIONS: dict[str, Callable[[Bench], Awaitable[Operation]]] = {
    "get_held": get_held,
    "get_pool": get_pool,
    "insert": insert_one,
    "update": update_one,
    "bulk": bulk_insert,
    "page_total": page_total,
    "page_no_total": page_no_total,
    "offset_deep": offset_deep,
    "keyset_deep": keyset_deep,
}
