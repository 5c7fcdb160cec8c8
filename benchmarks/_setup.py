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
  bulk-insert sample;
- table `dotmac_bench_member`, the second shape: the same columns plus an
  `active` flag that pages filter on, indexed `(tenant_id, active,
  created_at, id)`; tenant `bench-member` holds 20,000 rows, every other one
  active.

The `Database` is made with the library's defaults (`Database(url)`): pool of
10 plus 10 overflow, the idle liveness check on.

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
    "MEMBER_PAGE_ROWS",
    "PAGE_ROWS",
    "PAGE_SIZE",
    "POOL_SIZE",
    "TASKS",
    "TENANT_BULK",
    "TENANT_DEEP",
    "TENANT_MEMBER",
    "TENANT_PAGE",
    "TENANT_WRITE",
    "Bench",
    "BenchBulkItem",
    "BenchItem",
    "BenchMember",
    "BulkItems",
    "Items",
    "Members",
    "Sizes",
    "close_bench",
    "default_db",
    "open_bench",
]

TENANT_PAGE = "bench-page"
TENANT_DEEP = "bench-deep"
TENANT_WRITE = "bench-write"
TENANT_BULK = "bench-bulk"
TENANT_MEMBER = "bench-member"
MEMBER_PAGE_ROWS = 900  # pages with total walk the first 900 active members
PAGE_ROWS = 900
PAGE_DELETED_EVERY = 21  # every 21st row of the page tenant is soft-deleted: 45
WRITE_ROWS = 1_000
PAGE_SIZE = 50
POOL_SIZE = 20  # the raw driver's pool: as many as dotmac_core's default 10 + 10
TASKS = 200


@dataclass(frozen=True)
class Sizes:
    """How big the deep tenants are: full runs as documented, `--quick` smaller."""

    deep_rows: int = 58_000
    """Rows of the deep tenant."""
    deep_offset: int = 50_000
    """Where the deep offset and keyset pages start."""
    member_rows: int = 20_000
    """Rows of the member tenant (every other one active)."""
    member_deep: int = 9_000
    """Keyset pages of active members start after this many."""

    @classmethod
    def quick(cls) -> Sizes:
        """Sizes for `--quick`: the same operations on fewer rows."""
        return cls(
            deep_rows=6_000, deep_offset=5_000, member_rows=2_000, member_deep=950
        )


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


class BenchMember(TenantBaseModel, AuditMixin, table=True):
    """The second shape: the same columns and an `active` flag pages filter on."""

    __tablename__ = "dotmac_bench_member"
    __table_args__ = (
        Index("ix_dotmac_bench_member_page", "tenant_id", "active", "created_at", "id"),
    )

    email: str = Field(max_length=120)
    name: str = Field(max_length=50)
    rank: int = 0
    active: bool = True


class Members(AsyncRepository[BenchMember]):
    """dotmac_core's repository for the second shape."""


class Items(AsyncRepository[BenchItem]):
    """dotmac_core's repository for the measured table."""


class BulkItems(AsyncRepository[BenchBulkItem]):
    """dotmac_core's repository for the bulk-insert table."""


def item_table() -> Table:
    """Return the measured table."""
    table: Table = BenchItem.__table__  # type: ignore[attr-defined]
    return table


def member_table() -> Table:
    """Return the second shape's table."""
    table: Table = BenchMember.__table__  # type: ignore[attr-defined]
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
    sizes: Sizes
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
    member_after: tuple[datetime, uuid.UUID]
    """Sort position of active member `member_deep`: keyset pages start after it."""
    member_cursor: str
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
        for table in (item_table(), bulk_table(), member_table()):
            await conn.run_sync(table.drop, checkfirst=True)
            await conn.run_sync(table.create)


async def _load(
    bench_raw: RawDriver, table: str, columns: list[str], rows: list[dict[str, Any]]
) -> None:
    names = ", ".join(columns)
    marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
    records = [record(bench_raw, columns, row) for row in rows]
    if isinstance(bench_raw, AsyncpgDriver):
        await bench_raw.copy(table, columns, records)
    else:
        sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608 - fixed names
        await bench_raw.executemany(bench_raw.sql(sql), records)


async def _seed(
    bench_raw: RawDriver, columns: list[str], sizes: Sizes
) -> dict[str, list[Any]]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seeded = {
        TENANT_PAGE: _seed_rows(
            TENANT_PAGE,
            PAGE_ROWS + PAGE_ROWS // (PAGE_DELETED_EVERY - 1),
            start,
            deleted_every=PAGE_DELETED_EVERY,
        ),
        TENANT_DEEP: _seed_rows(TENANT_DEEP, sizes.deep_rows, start),
        TENANT_WRITE: _seed_rows(TENANT_WRITE, WRITE_ROWS, start),
    }
    for rows in seeded.values():
        await _load(bench_raw, item_table().name, columns, rows)
    members = _seed_rows(TENANT_MEMBER, sizes.member_rows, start)
    for i, row in enumerate(members):
        row["active"] = i % 2 == 0
    await _load(
        bench_raw,
        member_table().name,
        [c.name for c in member_table().columns],
        members,
    )
    seeded[TENANT_MEMBER] = members
    for table in (item_table(), member_table()):
        await bench_raw.execute(f"ANALYZE {table.name}")
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
        if page.items[0].id != seeded[TENANT_DEEP][bench.sizes.deep_offset]["id"]:
            msg = "the keyset cursor does not start at the deep offset"
            raise RuntimeError(msg)


def default_db(folder: str) -> str:
    """Return the embedded default: a SQLite file in `folder`."""
    return f"sqlite+aiosqlite:///{folder}/bench.db"


async def open_bench(db_url: str, bulk_rows: int, sizes: Sizes | None = None) -> Bench:
    """Connect, create and fill the tables, and return the shared context."""
    db = Database(db_url)  # the library's defaults, as a service starts with
    await _recreate_tables(db)
    raw = await _raw_driver(db)
    columns = [column.name for column in item_table().columns]
    sizes = sizes or Sizes()
    seeded = await _seed(raw, columns, sizes)
    security = SecurityConfig()
    deep_row = seeded[TENANT_DEEP][sizes.deep_offset - 1]
    with tenant_scope(TENANT_DEEP):
        # A page of one that starts at row 49,999: its cursor points after it.
        first = await Items(db=db, security=security).list_after(
            None, size=1, filters={"created_at__gte": deep_row["created_at"]}
        )
    member_row = [row for row in seeded[TENANT_MEMBER] if row["active"]][
        sizes.member_deep - 1
    ]
    with tenant_scope(TENANT_MEMBER):
        member_first = await Members(db=db, security=security).list_after(
            None,
            size=1,
            filters={"active": True, "created_at__gte": member_row["created_at"]},
        )
    if first.next_cursor is None or member_first.next_cursor is None:
        msg = "could not make a keyset cursor"
        raise RuntimeError(msg)
    bench = Bench(
        db=db,
        raw=raw,
        dialect=db.dialect,
        security=security,
        bulk_rows=bulk_rows,
        sizes=sizes,
        columns=columns,
        page_ids=[
            row["id"] for row in seeded[TENANT_PAGE] if row["deleted_at"] is None
        ],
        write_ids=[row["id"] for row in seeded[TENANT_WRITE]],
        deep_after=(deep_row["created_at"], deep_row["id"]),
        deep_cursor=first.next_cursor,
        member_after=(member_row["created_at"], member_row["id"]),
        member_cursor=member_first.next_cursor,
        server_version=await raw.server_version(),
        server_settings=await raw.settings(),
    )
    await _check(bench, seeded)
    return bench


async def close_bench(bench: Bench) -> None:
    """Drop the tables and close every connection."""
    await bench.raw.close()
    async with bench.db.engine.begin() as conn:
        for table in (item_table(), bulk_table(), member_table()):
            await conn.run_sync(table.drop, checkfirst=True)
    await bench.db.dispose()
