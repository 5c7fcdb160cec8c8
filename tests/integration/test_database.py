"""`Database`: engines, SQLite settings, savepoints, the default registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select

from dotmac_core import (
    ConfigurationError,
    Database,
    DatabaseConfig,
    configure_database,
    get_database,
    tenant_scope,
)

from ..conftest import PG_URL
from ..models import Invoice


async def test_sqlite_pragmas(sqlite_path: Path) -> None:
    """A SQLite file runs in WAL mode with foreign keys and a busy timeout."""
    async with Database(f"sqlite:///{sqlite_path}") as db:
        assert db.dialect == "sqlite"
        async with db.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
            timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
            assert timeout == 5000


async def test_sqlite_memory_database() -> None:
    """An in-memory SQLite database keeps its tables across sessions."""
    async with Database("sqlite+aiosqlite://") as db:
        await db.create_all()
        with tenant_scope("acme"):
            async with db.session() as session:
                session.add(Invoice(number="MEM-1"))
                await session.commit()
            async with db.session() as session:
                rows = (await session.exec(select(Invoice))).all()
        assert [row.number for row in rows] == ["MEM-1"]


@pytest.mark.usefixtures("acme")
async def test_savepoint_first_is_rolled_back_with_outer(db: Database) -> None:
    """A savepoint taken as the first statement rolls back with its outer transaction.

    Commits for real on its own connection, so it cleans up after itself.
    """
    number = f"SP-{db.dialect}"
    async with db.session() as session:
        with pytest.raises(RuntimeError, match="outer fails"):
            async with session.begin():
                async with session.begin_nested():
                    session.add(Invoice(number=number, tenant_id="acme"))
                raise RuntimeError("outer fails")
    async with db.session() as session:
        found = (
            await session.exec(select(Invoice).where(Invoice.number == number))
        ).all()
    assert found == []


@pytest.mark.usefixtures("acme")
async def test_savepoint_rollback_keeps_outer_work(db: Database) -> None:
    """Rolling back a savepoint undoes only its own work.

    Commits for real on its own connection, so it deletes its rows afterwards.
    """
    keep, drop = f"KEEP-{db.dialect}", f"DROP-{db.dialect}"
    async with db.session() as session:
        async with session.begin():
            session.add(Invoice(number=keep, tenant_id="acme"))
            await session.flush()
            nested = await session.begin_nested()
            session.add(Invoice(number=drop, tenant_id="acme"))
            await session.flush()
            await nested.rollback()
        numbers = set(
            (
                await session.exec(
                    select(Invoice.number).where(
                        Invoice.number.in_([keep, drop])  # type: ignore[attr-defined]
                    )
                )
            ).all()
        )
        assert numbers == {keep}
        await session.exec(  # type: ignore[call-overload]
            text("DELETE FROM invoice WHERE number = :n").bindparams(n=keep)
        )
        await session.commit()


async def test_ping_and_repr(db: Database) -> None:
    """`ping()` succeeds on a live database; the repr never shows a password."""
    await db.ping()
    assert "Database(" in repr(db)
    secret = Database("postgresql://u:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in repr(secret)
    assert secret.dialect == "postgresql"
    await secret.dispose()


async def test_pgbouncer_mode_runs_queries() -> None:
    """PgBouncer mode (no prepared statement reuse) still runs statements.

    Talks to PostgreSQL directly: the settings must work with or without a pooler.
    """
    pytest.importorskip("asyncpg")
    config = DatabaseConfig(
        url=PG_URL, pgbouncer=True, statement_timeout=5, command_timeout=5
    )
    async with Database(config) as db:
        try:
            await db.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means no server
            from ..conftest import service_unavailable

            service_unavailable("PostgreSQL", PG_URL, exc)
        async with db.engine.connect() as conn:
            for _ in range(3):
                value = await conn.execute(
                    text("SELECT CAST(:x AS INTEGER) + 1"), {"x": 41}
                )
                assert value.scalar() == 42
            timeout = await conn.exec_driver_sql("SHOW statement_timeout")
            assert timeout.scalar() == "5s"


async def test_default_registry(sqlite_path: Path) -> None:
    """`configure_database` registers the default; `get_database` returns it."""
    with pytest.raises(ConfigurationError, match="configure_database"):
        get_database()
    db = configure_database(f"sqlite:///{sqlite_path}", echo=False)
    assert get_database() is db
    other = Database("sqlite+aiosqlite://")
    assert configure_database(other) is other
    assert get_database() is other
    with pytest.raises(ConfigurationError, match="engine options"):
        configure_database(other, echo=True)
    await db.dispose()
    await other.dispose()


async def test_configure_from_environment(
    monkeypatch: pytest.MonkeyPatch, sqlite_path: Path
) -> None:
    """With no argument, the default database comes from `DOTMAC_DB_*`."""
    monkeypatch.setenv("DOTMAC_DB_DATABASE", str(sqlite_path))
    db = configure_database()
    assert db.url.database == str(sqlite_path)
    await db.ping()
    await db.dispose()


async def test_database_from_url_object_and_options(sqlite_path: Path) -> None:
    """A `sqlalchemy.URL` is accepted; `pool_recycle=None` disables recycling."""
    from sqlalchemy.engine import make_url

    config = DatabaseConfig(url=f"sqlite:///{sqlite_path}", pool_recycle=None)
    async with Database(config) as db:
        assert db.engine.pool._recycle == -1  # type: ignore[attr-defined]
    async with Database(make_url(f"sqlite+aiosqlite:///{sqlite_path}")) as db:
        await db.ping()
        assert db.url.database == str(sqlite_path)


async def test_reads_outside_transactions(db: Database) -> None:
    """Reads run in autocommit on PostgreSQL; pooled connections stay transactional."""
    async with db.read_session() as session:
        conn = await session.connection()
        level = conn.sync_connection.get_execution_options().get("isolation_level")  # type: ignore[union-attr]
    assert level == ("AUTOCOMMIT" if db.dialect == "postgresql" else None)
    # The same pooled connection afterwards still rolls a transaction back.
    with tenant_scope("acme"), pytest.raises(RuntimeError):
        async with db.session() as session, session.begin():
            session.add(Invoice(number=f"AC-{db.dialect}"))
            await session.flush()
            raise RuntimeError
    with tenant_scope("acme"):
        async with db.read_session() as session:
            rows = (
                await session.exec(
                    select(Invoice).where(Invoice.number == f"AC-{db.dialect}")
                )
            ).all()
    assert rows == []
