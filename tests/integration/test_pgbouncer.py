"""Through a real PgBouncer in transaction mode: `pgbouncer=True` makes every call work.

PgBouncer (see `tests/pgbouncer_server.py`) hands each transaction, and each
statement run outside one, to whichever of its two server connections is
free, so a prepared statement one round trip made is often gone in the next
or, left behind by another client, already taken. Many concurrent tasks run
every kind of call on both executors (the driver, and SQLAlchemy's session
for calls someone observes), on columns of many types, each of their
statement shapes run for the first time while others run; with
`pgbouncer=True` none may fail and every value must read back as written.
The same work with `pgbouncer=False` must fail with prepared-statement
errors, which shows the pooler really switches connections under it.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from sqlalchemy import JSON, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel, delete, select

from dotmac_core import (
    AsyncRepository,
    Database,
    DatabaseConfig,
    DotMacError,
    TransactionManager,
)
from dotmac_core.db._driver import driver_for

from ..conftest import PG_URL, service_unavailable
from ..pgbouncer_server import pgbouncer  # noqa: F401 - the fixture

pytestmark = pytest.mark.postgres

T = TypeVar("T")

#: Concurrent tasks per workload, and rows each one writes in bulk.
TASKS = 30
BULK = 5


class Mood(enum.Enum):
    """A native PostgreSQL enum: asyncpg looks its type up on first use."""

    CALM = "calm"
    BUSY = "busy"
    LOST = "lost"


class Bounced(SQLModel, table=True):
    """Columns of varied types (on `SQLModel.metadata`: this module owns the table)."""

    __tablename__ = "pgbouncer_bounced"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    batch: int = Field(index=True)
    rank: int = 0
    label: str = Field(max_length=40)
    mood: Mood
    amount: Decimal = Field(max_digits=12, decimal_places=2)
    doc: dict[str, Any] = Field(sa_type=JSON().with_variant(JSONB(), "postgresql"))
    day: date
    stamp: datetime
    blob: bytes
    ref: uuid.UUID


class Items(AsyncRepository[Bounced]):
    """Rows of `Bounced`."""


@pytest.fixture(scope="module")
async def direct() -> AsyncIterator[Database]:
    """This run's database, directly (not through PgBouncer), with `Bounced`'s table."""
    async with Database(PG_URL) as database:
        try:
            await database.ping()
        except DotMacError as exc:
            service_unavailable("PostgreSQL", PG_URL, exc)
        tables = [SQLModel.metadata.tables[Bounced.__tablename__]]
        async with database.engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.drop_all, tables=tables)
            await conn.run_sync(SQLModel.metadata.create_all, tables=tables)
        yield database
        async with database.engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.drop_all, tables=tables)


@pytest.fixture
async def table(direct: Database) -> AsyncIterator[None]:
    """`Bounced`'s table, emptied after the test."""
    yield
    async with direct.engine.begin() as conn:
        await conn.execute(delete(Bounced))


def _row(batch: int, n: int) -> dict[str, Any]:
    """Values of row `n` of task `batch`: every column, none left to defaults."""
    return {
        "batch": batch,
        "rank": n,
        "label": f"t{batch}-r{n}",
        "mood": list(Mood)[(batch + n) % len(Mood)],
        "amount": Decimal(f"{batch}.{n:02d}"),
        "doc": {"batch": batch, "n": n, "tags": ["a", str(n)], "nested": {"ok": True}},
        "day": date(2024, 1, 1) + timedelta(days=batch * 10 + n),
        "stamp": datetime(2024, 5, 1, 12, tzinfo=UTC) + timedelta(minutes=n),
        "blob": bytes([batch, n, 0, 255]),
        "ref": uuid.UUID(int=batch * 1000 + n),
    }


def _check(item: Bounced, expected: dict[str, Any]) -> None:
    """`item` holds `expected`'s values, with their types."""
    got = {key: getattr(item, key) for key in expected}
    assert got == expected
    assert isinstance(item.mood, Mood)
    assert isinstance(item.amount, Decimal)


#: Filter and ordering shapes: each task's first run of one is a new statement.
_SHAPES: list[tuple[dict[str, Any], str]] = [
    ({}, "rank"),
    ({"rank__gte": 0}, "rank"),
    ({"rank__lt": 100}, "-rank"),
    ({"label__like": "t%"}, "label"),
    ({"amount__gte": Decimal(0)}, "amount"),
    ({"day__gte": date(2000, 1, 1)}, "day"),
    ({"stamp__lte": datetime(2100, 1, 1, tzinfo=UTC)}, "-stamp"),
    ({"rank__ne": -1, "label__ilike": "%-R%"}, "-label"),
]


@dataclass
class Tally:
    """What a workload did: operations that succeeded, errors by operation."""

    done: int = 0
    errors: list[str] = field(default_factory=list)
    #: Statements the driver executor ran and learned the result types of.
    learned: int = 0

    async def run(self, name: str, work: Awaitable[T]) -> T:
        """Await `work`; count it, or record its error and re-raise to end the task."""
        try:
            result = await work
        except AssertionError:
            raise
        except Exception as exc:
            cause = exc.__cause__
            self.errors.append(f"{name}: {type(exc).__name__}: {exc} ({cause!r})")
            raise
        self.done += 1
        return result


async def _task(db: Database, batch: int, tally: Tally, how: str) -> None:
    """One client's calls, in the order an application might make them."""
    items = Items(db=db)

    def run(name: str, work: Awaitable[T]) -> Awaitable[T]:
        return tally.run(f"{how} {name}", work)

    first = _row(batch, 0)
    created = await run("create", items.create(first))
    _check(created, first)
    fetched = await run("get", items.get_by_id(created.id))
    assert fetched is not None
    _check(fetched, first)

    bulk = [_row(batch, n) for n in range(1, BULK + 1)]
    made = await run("create_many", items.create_many(bulk))
    for item, values in zip(made, bulk, strict=True):
        _check(item, values)

    filters, order = _SHAPES[batch // 2 % len(_SHAPES)]  # every shape on both ways
    listed = await run("list", items.list({"batch": batch, **filters}, order_by=order))
    expected = sorted([first, *bulk], key=lambda row: row[order.lstrip("-")])
    if order.startswith("-"):
        expected.reverse()
    assert [item.label for item in listed] == [row["label"] for row in expected]
    assert await run("count", items.count({"batch": batch})) == BULK + 1

    # An `in` list is rendered per call: SQLAlchemy's session runs it.
    refs = [row["ref"] for row in bulk[:3]]
    some = await run("list_in", items.list({"ref__in": refs, "mood__in": list(Mood)}))
    assert sorted(item.ref for item in some) == sorted(refs)

    changes = {"rank": 50, "mood": Mood.LOST, "doc": {"changed": batch}}
    updated = await run("update", items.update(created.id, changes))
    _check(updated, {**first, **changes})

    replaced = {**_row(batch, 0), "id": made[0].id, "label": f"t{batch}-upserted"}
    upserted = await run("upsert", items.upsert(replaced))
    assert upserted.id == made[0].id
    assert upserted.label == f"t{batch}-upserted"
    fresh = {**_row(batch, 99), "id": uuid.uuid4()}
    _check(await run("upsert_new", items.upsert(fresh)), fresh)

    async with TransactionManager(db):
        inside = await run("tx_get", items.get_by_id(made[1].id))
        assert inside is not None
        _check(inside, bulk[1])
        moved = await run("tx_update", items.update(made[1].id, {"rank": 77}))
        assert moved.rank == 77
        extra = _row(batch, 60)
        await run("tx_create", items.create(extra))
        more = [_row(batch, n) for n in range(70, 73)]
        await run("tx_create_many", items.create_many(more))
        total = await run("tx_count", items.count({"batch": batch}))
        assert total == BULK + 1 + 1 + 1 + len(more)
        await run("tx_delete", items.delete(made[2].id))

    async with db.read_session() as session:
        statement = select(Bounced).where(Bounced.batch == batch, Bounced.rank == 77)
        found = (await run("read_session", session.exec(statement))).all()
    assert [item.id for item in found] == [made[1].id]

    assert await run("delete", items.delete(created.id))
    assert await run("get_gone", items.get_by_id(created.id)) is None
    left = await run("count_end", items.count({"batch": batch}))
    assert left == LEFT


#: Rows one task leaves: its first row and bulk rows, the new one it upserted
#: and the four its transaction made, less the two it deleted.
LEFT = 1 + BULK + 1 + 4 - 2
#: Operations one task runs when none fails.
OPERATIONS = 19


def _observed(db: Database) -> Database:
    """`db` with a statement listener: every call runs through SQLAlchemy's session."""

    def observe(*_args: Any) -> None:
        return None

    event.listen(db.engine.sync_engine, "before_cursor_execute", observe)
    return db


def _learned(db: Database) -> int:
    """How many statements `db`'s driver executor ran and learned the types of."""
    driver = driver_for(db.engine.sync_engine)
    assert driver is not None
    known = driver._compiled.values()
    return sum(1 for made in known if made is not None and made.results is not None)


async def _workload(url: str, *, setting: bool) -> Tally:
    """`TASKS` clients at once with `pgbouncer=setting`, half of them observed."""
    config = DatabaseConfig(url=url, pgbouncer=setting, pool_size=8, max_overflow=4)
    plain, observed = Database(config), _observed(Database(config))
    tally = Tally()

    async def client(batch: int) -> None:
        db, how = (plain, "driver") if batch % 2 else (observed, "session")
        try:
            await _task(db, batch, tally, how)
        except AssertionError:
            raise
        except Exception:  # noqa: BLE001, S110 - recorded in the tally
            pass

    try:
        await asyncio.gather(*(client(batch) for batch in range(1, TASKS + 1)))
        tally.learned = _learned(plain)
    finally:
        await plain.dispose()
        await observed.dispose()
    return tally


@pytest.mark.usefixtures("table")
async def test_pgbouncer_mode_has_no_prepared_statement_errors(
    pgbouncer: str,  # noqa: F811 - the fixture imported above
    direct: Database,
) -> None:
    """Every call of every client succeeds through PgBouncer, values intact."""
    tally = await _workload(pgbouncer, setting=True)
    assert tally.errors == []
    assert tally.done == TASKS * OPERATIONS
    # The driver ran, and learned the types of, each list shape and more.
    assert tally.learned > len(_SHAPES)
    async with direct.session() as session:
        rows = (await session.exec(select(Bounced))).all()
    assert len(rows) == TASKS * LEFT
    assert {row.batch for row in rows} == set(range(1, TASKS + 1))


@pytest.mark.usefixtures("table")
async def test_without_pgbouncer_mode_statements_fail(
    pgbouncer: str,  # noqa: F811 - the fixture imported above
) -> None:
    """The same work with `pgbouncer=False` meets prepared-statement errors.

    The negative control: the pooler does move clients between server
    connections, so the test above would see the errors if they happened.
    """
    tally = await _workload(pgbouncer, setting=False)
    failed = [error for error in tally.errors if "prepared statement" in error]
    assert failed, tally.errors
