"""Bulk insert of 10,000 rows on PostgreSQL: create_many against the raw paths.

Run: python -m benchmarks.bulk_insert --db postgresql://postgres@127.0.0.1/test

Prints the median of interleaved repetitions for `AsyncRepository.create_many`
(validation included), asyncpg `executemany`, asyncpg `copy_records_to_table`
and multi-row `INSERT ... VALUES` batches of 1,000 through SQLAlchemy Core.
It creates a table `bench_bulk_row` and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
from sqlalchemy import insert
from sqlmodel import Field

from dotmac_core import AsyncRepository, Database, TenantBaseModel, tenant_scope

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


class BenchBulkRow(TenantBaseModel, table=True):
    """The benchmark's table: a tenant row with a few columns."""

    email: str = Field(max_length=120)
    name: str = Field(max_length=50)
    rank: int = 0


class BulkRows(AsyncRepository[BenchBulkRow]):
    """Repository under test."""


def _records(count: int) -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "id": uuid.uuid4(),
            "created_at": now,
            "updated_at": now,
            "tenant_id": "bench",
            "email": f"e{i}@x",
            "name": "n",
            "rank": i,
        }
        for i in range(count)
    ]


async def run(url: str, count: int, repeats: int) -> dict[str, float]:
    """Return the median seconds of each way to insert `count` rows."""
    db = Database(url)
    table = BenchBulkRow.__table__  # type: ignore[attr-defined]
    async with db.engine.begin() as conn:
        await conn.run_sync(table.drop, checkfirst=True)
        await conn.run_sync(table.create)
    dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    raw = await asyncpg.connect(dsn)
    columns = [column.key for column in table.columns]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608 - fixed names

    async def dotmac() -> None:
        with tenant_scope("bench"):
            await BulkRows(db=db).create_many(
                {"email": f"e{i}@x", "name": "n", "rank": i} for i in range(count)
            )

    async def executemany() -> None:
        rows = [tuple(r[c] for c in columns) for r in _records(count)]
        async with raw.transaction():
            await raw.executemany(sql, rows)

    async def copy() -> None:
        rows = [tuple(r[c] for c in columns) for r in _records(count)]
        async with raw.transaction():
            await raw.copy_records_to_table(table.name, records=rows, columns=columns)

    async def multirow() -> None:
        rows = _records(count)
        async with db.engine.begin() as conn:
            for start in range(0, count, 1000):
                await conn.execute(insert(table).values(rows[start : start + 1000]))

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "create_many": dotmac,
        "asyncpg executemany": executemany,
        "asyncpg COPY": copy,
        "Core multi-row VALUES": multirow,
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(repeats):
            for name, way in ways.items():
                await raw.execute(f"TRUNCATE {table.name}")
                start = time.perf_counter()
                await way()
                timings[name].append(time.perf_counter() - start)
    finally:
        await raw.execute(f"DROP TABLE {table.name}")
        await raw.close()
        await db.dispose()
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    """Parse arguments, run, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    medians = asyncio.run(run(args.db, args.rows, args.repeats))
    base = medians["asyncpg executemany"]
    print(f"| {args.rows:,} rows | median ms | vs executemany |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1000:.1f} | {base / seconds:.2f} |")


if __name__ == "__main__":
    main()
