"""Pool fairness: tasks waiting for a connection are served in arrival order.

Many tasks over a small pool, on both ways a call checks out a connection
(the driver path's synchronous checkout and SQLAlchemy's own), on SQLite and
PostgreSQL: nobody times out, nobody is overtaken by tasks that arrived after
it, no connection is left checked out or open.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import pytest
from sqlalchemy import event, text
from sqlmodel import Field

from dotmac_core import (
    AsyncRepository,
    Database,
    DatabaseConfig,
    DBBaseModel,
    OperationTimeoutError,
)
from dotmac_core.db import _pool

PgFactory = Callable[..., Awaitable[Database]]

#: Tasks, calls per task, and the pools they share (pool_size, max_overflow).
TASKS = 60
CALLS = 5
POOLS = [pytest.param((3, 0), id="3+0"), pytest.param((2, 2), id="2+2")]


class FairProbe(DBBaseModel, table=True):
    """A table of this module's own."""

    __tablename__ = "fairness_probe"

    label: str = Field(max_length=20)


class FairProbes(AsyncRepository[FairProbe]):
    """Rows of `FairProbe`."""


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    """The database server of the test."""
    return str(request.param)


@pytest.fixture(params=["driver", "session"])
def path(request: pytest.FixtureRequest) -> str:
    """`driver`: calls on the pooled driver; `session`: through SQLAlchemy."""
    return str(request.param)


@pytest.fixture
async def make_db(
    backend: str, pg_factory: PgFactory, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Database]]]:
    """Build a `Database` on the test's backend with these pool settings."""
    made: list[Database] = []

    async def make(**settings: Any) -> Database:
        if backend == "postgres":
            settings.setdefault("application_name", f"fair_{uuid4().hex[:12]}")
            db = await pg_factory(**settings)
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / f'fair{len(made)}.db'}"
            db = Database(DatabaseConfig(url=url, **settings))
            made.append(db)
        async with db.engine.begin() as conn:
            await conn.run_sync(FairProbe.__table__.create, checkfirst=True)  # type: ignore[attr-defined]
            await conn.execute(FairProbe.__table__.delete())  # type: ignore[attr-defined]
        return db

    yield make
    for db in made:
        await db.dispose()


def _observe(db: Database, path: str) -> None:
    """On the `session` path, observe statements: every call runs through SQLAlchemy."""
    if path == "session":
        event.listen(db.engine.sync_engine, "before_cursor_execute", _ignore)


def _ignore(*_args: Any) -> None:
    return None


def _overtaken(calls: list[tuple[int, int]]) -> int:
    """The most calls that asked after one call and were served before it."""
    worst = 0
    for asked, served in calls:
        later_first = sum(1 for a, s in calls if a > asked and s < served)
        worst = max(worst, later_first)
    return worst


async def _settle() -> None:
    """Let deferred closes and callbacks run, then collect garbage."""
    await asyncio.gather(*_pool._CLOSING)
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()


async def _server_connections(db: Database) -> int:
    """Backends the server has for `db`'s application name (not counting this one)."""
    name = db.config.application_name
    async with db.engine.connect() as conn:
        found = await conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        return int(found.scalar_one())


@pytest.mark.parametrize("pool", POOLS)
async def test_waiters_are_served_in_arrival_order(
    make_db: Callable[..., Awaitable[Database]],
    backend: str,
    path: str,
    pool: tuple[int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tasks over a small pool are served in the order they asked; none times out.

    A pool that lets a task take a connection returned while others wait
    serves some tasks at once, again and again, and sends the waiters to the
    back of the line each time. Checked on the order of service, never on
    speed: no call is overtaken by more than the pool's connections of calls
    that asked after it, and no call waits far longer than the median.
    """
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    size, overflow = pool
    db = await make_db(pool_size=size, max_overflow=overflow, pool_timeout=60)
    probes = FairProbes(db=db)
    row = await probes.create({"label": "fair"})
    _observe(db, path)
    engine_pool: Any = db.engine.sync_engine.pool
    asked_at: dict[asyncio.Task[Any], tuple[int, float]] = {}
    opening: set[asyncio.Task[Any]] = set()
    calls: list[tuple[int, int]] = []
    waits: list[float] = []
    asked = served_count = 0

    def opened(*_args: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            opening.add(task)

    def served(*_args: Any) -> None:
        nonlocal served_count
        task = asyncio.current_task()
        found = asked_at.pop(task, None) if task is not None else None
        if found is None:
            return
        served_count += 1
        if task in opening:
            # It opened a connection of its own: it never waited in line,
            # and opening one takes a while (more calls are served meanwhile).
            opening.discard(task)
            return
        calls.append((found[0], served_count))
        waits.append(time.monotonic() - found[1])

    event.listen(engine_pool, "connect", opened)
    event.listen(engine_pool, "checkout", served)
    try:

        async def worker() -> None:
            nonlocal asked
            me = asyncio.current_task()
            assert me is not None
            for _ in range(CALLS):
                asked_at[me] = (asked, time.monotonic())
                asked += 1
                assert (await probes.get_by_id(row.id)) is not None

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for _ in range(TASKS):
                    tg.start_soon(worker)
    finally:
        event.remove(engine_pool, "checkout", served)
        event.remove(engine_pool, "connect", opened)
    assert served_count == TASKS * CALLS
    assert len(calls) >= TASKS * CALLS // 2  # most calls waited in line
    assert _overtaken(calls) <= size + overflow
    median = statistics.median(waits)
    assert max(waits) <= 4 * median + 2.0, (max(waits), median)
    await _settle()
    assert engine_pool.checkedout() == 0
    assert engine_pool.checkedin() <= size
    # Connections beyond the pool's size, returned synchronously by the driver
    # path, are closed properly (not dropped with "Exception closing").
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    if backend == "postgres":
        assert await _server_connections(db) <= size


async def test_a_full_pool_times_out_in_its_own_time(
    make_db: Callable[..., Awaitable[Database]], path: str
) -> None:
    """A call waiting in line for a connection fails after `pool_timeout`, then works.

    The driver path waits for its turn itself; it must keep the pool's
    timeout and error, and leave the line when it gives up.
    """
    db = await make_db(pool_size=1, max_overflow=0, pool_timeout=0.3)
    probes = FairProbes(db=db)
    row = await probes.create({"label": "held"})
    _observe(db, path)
    async with db.engine.connect() as held:
        await held.execute(text("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError):
            await probes.get_by_id(row.id)
        assert time.monotonic() - started < 0.3 + 10  # its timeout, not forever
    assert (await probes.get_by_id(row.id)) is not None
    await _settle()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_cancelled_waiter_passes_its_connection_on() -> None:
    """A waiter cancelled after a connection was handed to it passes it to the next.

    Only the hand-off queue itself: the connection must go to the next in
    line, not back to the end, and not be lost.
    """
    queue = _pool._Handoff(2)
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)  # both wait, in that order
    connection = object()
    queue.put_nowait(connection)  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is connection
    assert queue.empty()


async def test_cancelled_waiter_keeps_its_connection_in_a_full_queue() -> None:
    """A waiter cancelled after it was handed one, with the queue full meanwhile.

    Other connections came back while nobody else waited: the handed one is
    kept too (the pool closes a surplus at its next return), never lost to
    a `QueueFull` raised out of the checkout.
    """
    queue = _pool._Handoff(1)
    waiter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    handed, returned = object(), object()
    queue.put_nowait(handed)  # handed to `waiter`, which has not run yet
    queue.put_nowait(returned)  # nobody waits: it fills the queue
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert {queue.get_nowait(), queue.get_nowait()} == {handed, returned}


async def test_items_wait_only_while_nobody_waits() -> None:
    """A returned item goes to the first waiter, never into the queue past it."""
    queue = _pool._Handoff(1)
    waiter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    item = object()
    queue.put_nowait(item)
    assert queue.qsize() == 0  # a checkout finds nothing to take from the waiter
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    assert await waiter is item
    queue.put_nowait(item)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(object())
    assert queue.get_nowait() is item


def test_sqlalchemy_queue_runs_over_the_hand_off() -> None:
    """SQLAlchemy's asyncio pool queue still goes through the `_queue` it is given."""
    assert _pool.fair_queue_works()
