"""The benchmark's tables, data and connections: one `Bench` per run.

Two tables with the columns of a real tenant-owned, audited model
(`TenantBaseModel` + `AuditMixin`: id, timestamps, tenant, soft delete, audit
users) plus three of their own. The data is written with the raw driver
(COPY on PostgreSQL), then read back through dotmac_core once to check that
every implementation sees the same rows:

- tenant `bench-page`: 900 live rows and 45 soft-deleted ones (pages, gets);
- tenant `bench-deep`: 58,000 rows (the offset page at 50,000 and keyset);
- tenant `bench-write`: 1,000 rows that the update operation changes;
- table `dotmac_bench_bulk`: single-row inserts land here (so the measured
  table does not grow while the reads run), and it is emptied before every
  bulk-insert sample.

`created_at` grows by one millisecond per row, so `ORDER BY created_at, id`
is the order the rows were written in, and every implementation reads the
same 50 rows for the same page.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Index
from sqlmodel import Field

from dotmac_core import (
    AsyncRepository,
    AuditMixin,
    Database,
    DatabaseConfig,
    SecurityConfig,
    TenantBaseModel,
    tenant_scope,
)

from ._raw import AiosqliteDriver, AsyncpgDriver

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Table

    from ._raw import RawDriver

__all__ = [
    "DEEP_OFFSET",
    "DEEP_ROWS",
    "PAGE_ROWS",
    "PAGE_SIZE",
    "POOL_SIZE",
    "TASKS",
    "TENANT_BULK",
    "TENANT_DEEP",
    "TENANT_PAGE",
    "TENANT_WRITE",
    "Bench",
    "BenchBulkItem",
    "BenchItem",
    "BulkItems",
    "Items",
    "close_bench",
    "default_db",
    "open_bench",
]

TENANT_PAGE = "bench-page"
TENANT_DEEP = "bench-deep"
TENANT_WRITE = "bench-write"
TENANT_BULK = "bench-bulk"
PAGE_ROWS = 900
PAGE_DELETED_EVERY = 21  # every 21st row of the page tenant is soft-deleted: 45
DEEP_ROWS = 58_000
DEEP_OFFSET = 50_000
WRITE_ROWS = 1_000
PAGE_SIZE = 50
POOL_SIZE = 20
TASKS = 200


class BenchItem(TenantBaseModel, AuditMixin, table=True):
    """The measured table: tenant-owned, audited and soft-deletable."""

    __tablename__ = "dotmac_bench_item"
    # The index a real application would add for its pages: tenant, then the
    # sort order, then the key (both offset and keyset pages walk it).
    __table_args__ = (
        Index("ix_dotmac_bench_item_page", "tenant_id", "created_at", "id"),
    )

    email: str = Field(max_length=120)
    name: str = Field(max_length=50)
    rank: int = 0


class BenchBulkItem(TenantBaseModel, AuditMixin, table=True):
    """The insert target: the same columns; emptied before each bulk sample."""

    __tablename__ = "dotmac_bench_bulk"

    email: str = Field(max_length=120)
    name: str = Field(max_length=50)
    rank: int = 0


class Items(AsyncRepository[BenchItem]):
    """dotmac_core's repository for the measured table."""


class BulkItems(AsyncRepository[BenchBulkItem]):
    """dotmac_core's repository for the bulk-insert table."""


def item_table() -> Table:
    """Return the measured table."""
    table: Table = BenchItem.__table__  # type: ignore[attr-defined]
    return table


def bulk_table() -> Table:
    """Return the bulk-insert table."""
    table: Table = BenchBulkItem.__table__  # type: ignore[attr-defined]
    return table


@dataclass
class Bench:
    """Everything the operations share: database, raw driver, seeded keys."""

    db: Database
    raw: RawDriver
    dialect: str
    security: SecurityConfig
    bulk_rows: int
    columns: list[str]
    """Column names of both tables, in table order."""
    page_ids: list[uuid.UUID]
    """Keys of the live rows of the page tenant."""
    write_ids: list[uuid.UUID]
    """Keys of the rows the update operation changes."""
    deep_after: tuple[datetime, uuid.UUID]
    """Sort position of row 49,999 of the deep tenant: keyset pages start after it."""
    deep_cursor: str
    """dotmac_core's signed cursor for the same position."""
    server_version: str
    server_settings: dict[str, str]
    sequence: Iterator[int] = field(default_factory=lambda: itertools.count(1_000_000))
    """Values no row holds yet: every update writes a new one, so no
    implementation can skip the write because the value did not change."""


def record(
    raw: RawDriver, columns: list[str], values: dict[str, Any]
) -> tuple[Any, ...]:
    """Return `values` as the raw driver's row tuple, in column order."""
    converted = []
    for name in columns:
        value = values[name]
        if value is not None and name == "id":
            value = raw.key(value)
        elif value is not None and name in ("created_at", "updated_at", "deleted_at"):
            value = raw.stamp(value)
        converted.append(value)
    return tuple(converted)


def _seed_rows(
    tenant: str, count: int, start: datetime, *, deleted_every: int = 0
) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        created = start + timedelta(milliseconds=i)
        deleted = deleted_every and i % deleted_every == deleted_every - 1
        rows.append(
            {
                "id": uuid.uuid4(),
                "created_at": created,
                "updated_at": created,
                "tenant_id": tenant,
                "deleted_at": created if deleted else None,
                "created_by": None,
                "updated_by": None,
                "email": f"user{i}@{tenant}.example",
                "name": f"Name {i}",
                "rank": i,
            }
        )
    return rows


async def _raw_driver(db: Database) -> RawDriver:
    if db.dialect == "postgresql":
        dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        pg = AsyncpgDriver(dsn)
        await pg.open(POOL_SIZE)
        return pg
    lite = AiosqliteDriver(str(db.url.database))
    await lite.open(POOL_SIZE)
    return lite


async def _recreate_tables(db: Database) -> None:
    async with db.engine.begin() as conn:
        for table in (item_table(), bulk_table()):
            await conn.run_sync(table.drop, checkfirst=True)
            await conn.run_sync(table.create)


async def _seed(bench_raw: RawDriver, columns: list[str]) -> dict[str, list[Any]]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seeded = {
        TENANT_PAGE: _seed_rows(
            TENANT_PAGE,
            PAGE_ROWS + PAGE_ROWS // (PAGE_DELETED_EVERY - 1),
            start,
            deleted_every=PAGE_DELETED_EVERY,
        ),
        TENANT_DEEP: _seed_rows(TENANT_DEEP, DEEP_ROWS, start),
        TENANT_WRITE: _seed_rows(TENANT_WRITE, WRITE_ROWS, start),
    }
    table = item_table().name
    names = ", ".join(columns)
    marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
    sql = bench_raw.sql(f"INSERT INTO {table} ({names}) VALUES ({marks})")  # noqa: S608 - fixed names
    for rows in seeded.values():
        records = [record(bench_raw, columns, row) for row in rows]
        if isinstance(bench_raw, AsyncpgDriver):
            await bench_raw.copy(table, columns, records)
        else:
            await bench_raw.executemany(sql, records)
    await bench_raw.execute(f"ANALYZE {table}")
    return seeded


async def _check(bench: Bench, seeded: dict[str, list[dict[str, Any]]]) -> None:
    """Read the seeded rows back through dotmac_core: same rows for everyone."""
    with tenant_scope(TENANT_PAGE):
        items = Items(db=bench.db)
        if await items.count() != PAGE_ROWS:
            msg = "the page tenant does not read back as 900 live rows"
            raise RuntimeError(msg)
        if await items.get_by_id(bench.page_ids[0]) is None:
            msg = "a seeded row is not readable through dotmac_core"
            raise RuntimeError(msg)
    with tenant_scope(TENANT_DEEP):
        page = await Items(db=bench.db, security=bench.security).list_after(
            bench.deep_cursor, size=PAGE_SIZE
        )
        if page.items[0].id != seeded[TENANT_DEEP][DEEP_OFFSET]["id"]:
            msg = "the keyset cursor does not start at row 50,000"
            raise RuntimeError(msg)


def default_db(folder: str) -> str:
    """Return the embedded default: a SQLite file in `folder`."""
    return f"sqlite+aiosqlite:///{folder}/bench.db"


async def open_bench(db_url: str, bulk_rows: int) -> Bench:
    """Connect, create and fill the tables, and return the shared context."""
    db = Database(
        DatabaseConfig(url=db_url, pool_size=POOL_SIZE, max_overflow=0),
    )
    await _recreate_tables(db)
    raw = await _raw_driver(db)
    columns = [column.name for column in item_table().columns]
    seeded = await _seed(raw, columns)
    security = SecurityConfig()
    deep_row = seeded[TENANT_DEEP][DEEP_OFFSET - 1]
    with tenant_scope(TENANT_DEEP):
        # A page of one that starts at row 49,999: its cursor points after it.
        first = await Items(db=db, security=security).list_after(
            None, size=1, filters={"created_at__gte": deep_row["created_at"]}
        )
    if first.next_cursor is None:
        msg = "could not make a keyset cursor"
        raise RuntimeError(msg)
    bench = Bench(
        db=db,
        raw=raw,
        dialect=db.dialect,
        security=security,
        bulk_rows=bulk_rows,
        columns=columns,
        page_ids=[
            row["id"] for row in seeded[TENANT_PAGE] if row["deleted_at"] is None
        ],
        write_ids=[row["id"] for row in seeded[TENANT_WRITE]],
        deep_after=(deep_row["created_at"], deep_row["id"]),
        deep_cursor=first.next_cursor,
        server_version=await raw.server_version(),
        server_settings=await raw.settings(),
    )
    await _check(bench, seeded)
    return bench


async def close_bench(bench: Bench) -> None:
    """Drop the tables and close every connection."""
    await bench.raw.close()
    async with bench.db.engine.begin() as conn:
        for table in (item_table(), bulk_table()):
            await conn.run_sync(table.drop, checkfirst=True)
    await bench.db.dispose()
