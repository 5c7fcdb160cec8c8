"""`Database`: engines, SQLite settings, savepoints, the default registry."""

from __future__ import annotations

import re
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import select

from dotmac_core import (
    ConfigurationError,
    Database,
    DatabaseConfig,
    DatabaseConnectionError,
    configure_database,
    get_database,
    tenant_scope,
)
from dotmac_core.db.database import _pg_url_options

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


async def _round_trip(db: Database) -> list[str]:
    """Create the tables, write an invoice in one session, read it in another."""
    await db.create_all()
    with tenant_scope("acme"):
        async with db.session() as session:
            session.add(Invoice(number="URL-1"))
            await session.commit()
        async with db.session() as session:
            rows = (await session.exec(select(Invoice))).all()
    return [row.number for row in rows]


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite://",
        "sqlite+aiosqlite:///:memory:",
        "sqlite://",
        "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true",
    ],
)
async def test_sqlite_memory_url_forms(url: str) -> None:
    """Every in-memory URL form gives one shared connection that keeps its data."""
    async with Database(url) as db:
        assert type(db.engine.pool).__name__ == "StaticPool"
        assert await _round_trip(db) == ["URL-1"]


async def test_sqlite_shared_cache_memory_database() -> None:
    """A named shared-cache memory database is one database for every `Database`.

    `file:name?mode=memory&cache=shared&uri=true` (a SQLite URI filename):
    each `Database` holds one connection to it, and the data lives while one
    of them is open.
    """
    url = f"sqlite+aiosqlite:///file:dotmac_{uuid4().hex}?mode=memory&cache=shared&uri=true"
    async with Database(url) as first, Database(url) as second:
        assert type(first.engine.pool).__name__ == "StaticPool"
        assert await _round_trip(first) == ["URL-1"]
        with tenant_scope("acme"):
            async with second.session() as session:
                rows = (await session.exec(select(Invoice))).all()
        assert [row.number for row in rows] == ["URL-1"]
    async with Database(url) as fresh:
        assert await _round_trip(fresh) == ["URL-1"]  # the last one closed: gone


async def test_sqlite_file_url_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative and absolute paths, spaces included, and `file:` URIs name files."""
    monkeypatch.chdir(tmp_path)
    spaced = tmp_path / "with space" / "app data.db"
    spaced.parent.mkdir()
    urls = {
        "sqlite+aiosqlite:///relative.db": tmp_path / "relative.db",
        f"sqlite+aiosqlite:///{spaced}": spaced,
        f"sqlite:///{tmp_path / 'absolute.db'}": tmp_path / "absolute.db",
        f"sqlite+aiosqlite:///file:{tmp_path / 'uri.db'}?uri=true": tmp_path / "uri.db",
    }
    for url, path in urls.items():
        async with Database(url) as db:
            assert type(db.engine.pool).__name__ == "AsyncAdaptedQueuePool"
            assert await _round_trip(db) == ["URL-1"], url
        assert path.is_file(), url


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("sqlite+aiosqlite:///file:x?mode=memory&cache=shared", "uri=true"),
        ("sqlite+aiosqlite:///file::memory:", "uri=true"),
        ("sqlite+aiosqlite:///app.db?mode=ro", "file:app.db?mode=ro&uri=true"),
    ],
)
def test_sqlite_urls_that_would_misread_are_refused(url: str, fix: str) -> None:
    """SQLite options SQLAlchemy would drop: a ConfigurationError with what to write."""
    with pytest.raises(ConfigurationError, match=re.escape(fix)) as caught:
        Database(url)
    assert caught.value.field == "url"


def _pg_url(scheme: str, **query: str) -> str:
    return (
        make_url(PG_URL)
        .set(drivername=scheme, query=query)
        .render_as_string(hide_password=False)
    )


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
async def test_postgresql_url_forms(scheme: str) -> None:
    """Each PostgreSQL scheme runs on asyncpg; libpq's query options reach it.

    `sslmode`, `application_name`, `options=-c name=value` and
    `connect_timeout` are libpq's names, which asyncpg does not take as
    arguments: each must still have its effect.
    """
    url = _pg_url(
        scheme,
        sslmode="disable",
        application_name="url_forms",
        options="-c search_path=public -c work_mem=8MB",
        connect_timeout="5",
        command_timeout="60",
    )
    async with Database(url) as db:
        assert db.url.drivername == "postgresql+asyncpg"
        try:
            await db.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means no server
            from ..conftest import service_unavailable

            service_unavailable("PostgreSQL", PG_URL, exc)
        async with db.engine.connect() as conn:
            row = (
                await conn.exec_driver_sql(
                    "SELECT current_setting('application_name'), "
                    "current_setting('search_path'), current_setting('work_mem'), "
                    "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
                )
            ).one()
        assert tuple(row) == ("url_forms", "public", "8MB", False)
        assert "search_path" not in str(db.engine.url)  # given to asyncpg instead


@pytest.mark.postgres
async def test_postgresql_url_sslmode_is_applied() -> None:
    """`sslmode=require` reaches asyncpg: without TLS on the server, no connection."""
    async with Database(PG_URL) as db, db.engine.connect() as conn:
        tls = (await conn.exec_driver_sql("SHOW ssl")).scalar()
    if tls == "on":
        pytest.skip("the server offers TLS: sslmode=require would succeed")
    async with Database(_pg_url("postgresql", sslmode="require")) as db:
        with pytest.raises(DatabaseConnectionError):
            await db.ping()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"sslmode": "sometimes"}, "sslmode must be one of"),
        ({"connect_timeout": "soon"}, "connect_timeout='soon'"),
        ({"connect_timeout": "0"}, "give a positive number"),
        ({"options": "search_path=x"}, "-c name=value"),
        ({"keepalives": "1"}, "'keepalives' is not one asyncpg takes"),
        ({"client_encoding": "utf8"}, "options=-c"),
    ],
)
def test_postgresql_url_options_asyncpg_cannot_use_are_refused(
    query: dict[str, str], named: str
) -> None:
    """An option asyncpg cannot use: a ConfigurationError naming what to write."""
    with pytest.raises(ConfigurationError, match=re.escape(named)) as caught:
        Database(_pg_url("postgresql", **query))
    assert caught.value.field == "url"


def test_postgresql_tls_files_go_to_asyncpg_as_a_connection_string() -> None:
    """Libpq's TLS options reach asyncpg as `dsn=`, which it reads them from."""
    query = {"sslmode": "verify-full", "sslrootcert": "/etc/ca dir/root.pem"}
    engine_url, args = _pg_url_options(make_url(_pg_url("postgresql", **query)))
    assert dict(engine_url.query) == {}
    assert dict(make_url(args["dsn"]).query) == query
    assert engine_url.database == make_url(PG_URL).database
