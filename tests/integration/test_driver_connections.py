"""Connection health on the driver path: killed backends, pings, cancels, resets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.util import greenlet_spawn
from sqlmodel import Field

from dotmac_core import AsyncRepository, Database, DBBaseModel, TransactionManager
from dotmac_core.db import _pool
from dotmac_core.db._driver import driver_for

PgFactory = Callable[..., Awaitable[Database]]


class Probe(DBBaseModel, table=True):
    """A table of this module's own."""

    __tablename__ = "driver_probe"

    label: str = Field(max_length=20)


class Probes(AsyncRepository[Probe]):
    """Rows of `Probe`."""


async def _with_table(db: Database) -> None:
    """Create the table if this run's schema lacks it (it is in the metadata)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(Probe.__table__.create, checkfirst=True)  # type: ignore[attr-defined]
    await _empty_table(db)


async def _empty_table(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(Probe.__table__.delete())  # type: ignore[attr-defined]


@pytest.mark.postgres
async def test_killed_connections_cost_no_error(pg_factory: PgFactory) -> None:
    """Backends the server killed while pooled are replaced at checkout, silently."""
    db = await pg_factory(application_name="dotmac_probe_kill")
    await _with_table(db)
    try:
        made = await Probes(db=db).create({"label": "a"})

        async def busy() -> None:
            await Probes(db=db).get_by_id(made.id)
            await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:  # several pooled connections
            for _ in range(4):
                tg.start_soon(busy)
        killer_config = db.config.model_copy(update={"application_name": "killer"})
        async with Database(killer_config) as other, other.engine.connect() as killer:
            killed = (
                await killer.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'dotmac_probe_kill'"
                    )
                )
            ).scalar_one()
        assert killed >= 2
        await anyio.sleep(0.1)  # the event loop reads each connection's EOF
        for _ in range(6):
            assert (await Probes(db=db).get_by_id(made.id)) is not None
        async with TransactionManager(db) as tx:
            assert await Probes(tx.session).count() == 1
    finally:
        await _empty_table(db)


@pytest.mark.postgres
async def test_idle_connection_is_pinged(
    pg_factory: PgFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection idle past PING_AFTER gets one empty statement before use."""
    db = await pg_factory()
    await _with_table(db)
    sent: list[str] = []
    real_fetchrow = asyncpg.Connection.fetchrow

    async def spy(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        sent.append(query)
        return await real_fetchrow(self, query, *args, **kw)

    try:
        await Probes(db=db).count()
        monkeypatch.setattr(_pool, "PING_AFTER", 0.0)
        monkeypatch.setattr(asyncpg.Connection, "fetchrow", spy)
        await anyio.sleep(0.01)
        assert await Probes(db=db).count() == 0  # driver checkout pings itself
        assert sent == [";"]
        await anyio.sleep(0.01)
        async with TransactionManager(db) as tx:  # ORM checkout: the listener
            assert await Probes(tx.session).count() == 0
        assert sent[:2] == [";", ";"]
    finally:
        await _empty_table(db)


@pytest.mark.postgres
@pytest.mark.parametrize("way", ["driver", "session"])
async def test_idle_connection_is_reused_not_replaced(
    pg_factory: PgFactory, way: str
) -> None:
    """A healthy connection idle past PING_AFTER passes its ping and is kept.

    The same server backend (`pg_backend_pid()`) answers before and after the
    pause, on both checkouts: the ping never mistakes a live connection for a
    dead one and reconnects.
    """
    db = await pg_factory(pool_size=1, max_overflow=0)

    async def backend_pid() -> int:
        if way == "session":
            async with db.engine.connect() as conn:
                return int(
                    (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                )
        fairy = await _pool.checkout(db.engine, sync=True)
        try:
            driver: Any = fairy.driver_connection
            return int(await driver.fetchval("SELECT pg_backend_pid()"))
        finally:
            await greenlet_spawn(fairy.close)

    before = await backend_pid()
    await anyio.sleep(_pool.PING_AFTER + 0.5)
    assert await backend_pid() == before
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.postgres
async def test_cancelled_call_closes_its_connection(pg_factory: PgFactory) -> None:
    """A driver call cancelled mid-statement closes its connection."""
    db = await pg_factory()
    driver = driver_for(db.engine.sync_engine)
    assert driver is not None

    async def sleeper(connection: Any) -> None:
        await connection.execute("SELECT pg_sleep(5)")

    with anyio.fail_after(3):
        with anyio.move_on_after(0.2):
            await driver.use(sleeper)
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


async def test_sqlite_connection_comes_back_without_a_transaction(
    sqlite_path: Any,
) -> None:
    """A connection given back mid-transaction is rolled back by the reset hook."""
    async with Database(f"sqlite+aiosqlite:///{sqlite_path}") as db:
        await _with_table(db)
        raw = await db.engine.raw_connection()
        driver: Any = raw.driver_connection
        await driver.execute("BEGIN")
        await driver.execute("CREATE TABLE scratch (x INTEGER)")
        assert driver.in_transaction
        await greenlet_spawn(raw.close)
        raw = await db.engine.raw_connection()
        driver = raw.driver_connection
        assert not driver.in_transaction
        rows = await driver.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE name = 'scratch'"
        )
        assert list(rows) == []
        await greenlet_spawn(raw.close)
