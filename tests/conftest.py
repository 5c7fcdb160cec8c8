"""Service discovery and backend fixtures shared by the whole suite.

Backends are fixture parameters (`db`: sqlite | postgres), so one suite covers
every backend. A service that cannot be reached skips its tests with the URL
in the reason, or fails them when `CI=true` or `DOTMAC_REQUIRE_SERVICES=1`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn
from uuid import uuid4

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlmodel.ext.asyncio.session import AsyncSession

from dotmac_core import (
    Database,
    DatabaseConfig,
    DBBaseModel,
    DotMacError,
    TransactionManager,
    configure_database,
    tenant_scope,
)
from dotmac_core.cache.service import _reset_default_cache
from dotmac_core.db.database import _reset_default_database

from . import models  # noqa: F401 - registers the test tables on the metadata
from .redis_servers import (  # noqa: F401 - fixtures shared by the whole suite
    redis_cluster,
    redis_prefix,
    redis_url,
)

#: The PostgreSQL server the suite may use; its database is only the door in.
PG_SERVER_URL = os.environ.get(
    "DOTMAC_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
#: This run's own database on that server: made at the start, dropped at the end,
#: so two runs on one machine never touch each other's tables.
PG_URL = (
    make_url(PG_SERVER_URL)
    .set(database=f"dotmac_test_{os.getpid()}_{uuid4().hex[:8]}")
    .render_as_string(hide_password=False)
)
REDIS_URL = os.environ.get("DOTMAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _run_database(action: str) -> None:
    """CREATE or DROP this run's database, through the server's own database."""
    import asyncpg

    server = make_url(PG_SERVER_URL)
    name = make_url(PG_URL).database
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port or 5432,
        user=server.username,
        password=server.password,
        database=server.database,
        timeout=5,
    )
    try:
        if action == "create":
            await conn.execute(f'CREATE DATABASE "{name}"')
        else:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Make this run's PostgreSQL database (its tests report a server that is down)."""
    try:
        asyncio.run(_run_database("create"))
    except Exception as exc:  # noqa: BLE001 - unreachable or refused: tests report it
        session.config.stash[_PG_DOWN] = exc


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop this run's PostgreSQL database."""
    if _PG_DOWN not in session.config.stash:
        asyncio.run(_run_database("drop"))


_PG_DOWN = pytest.StashKey[BaseException]()


def services_required() -> bool:
    """Return whether a missing service must fail the run instead of skipping."""
    return (
        os.environ.get("CI", "").lower() in ("1", "true")
        or os.environ.get("DOTMAC_REQUIRE_SERVICES") == "1"
    )


def service_unavailable(what: str, url: str, exc: BaseException) -> NoReturn:
    """Skip (locally) or fail (in CI) because `what` at `url` is unreachable."""
    shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
    reason = f"{what} unreachable at {shown}: {type(exc).__name__}: {exc}"
    if services_required():
        pytest.fail(f"{reason} (required because CI / DOTMAC_REQUIRE_SERVICES is set)")
    pytest.skip(reason)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
async def db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    """A `Database` with every test table created, on each backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "test.db"
        database = Database(f"sqlite+aiosqlite:///{path}")
    else:
        database = Database(PG_URL, pool_size=5, max_overflow=5)
        try:
            await database.ping()
        except DotMacError as exc:
            await database.dispose()
            service_unavailable("PostgreSQL", PG_URL, exc)
    await database.drop_all()
    await database.create_all()
    yield database
    await database.drop_all()
    await database.dispose()


@pytest.fixture
async def session(db: Database) -> AsyncIterator[AsyncSession]:
    """A session inside an outer transaction that is rolled back after the test.

    The session's own commits become savepoints, so tests may commit freely.
    """
    async with db.engine.connect() as conn:
        outer = await conn.begin()
        async with AsyncSession(
            bind=conn,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
        ) as sess:
            yield sess
        await outer.rollback()


def _observe_statements(db: Database) -> Callable[[], None]:
    """Put a statement listener on `db`'s engine; return what removes it.

    A call that someone observes runs through SQLAlchemy's own execution
    (session, ORM loading, engine events), never on the raw driver.
    """
    engine = db.engine.sync_engine

    def observe(*_args: Any) -> None:
        return None

    event.listen(engine, "before_cursor_execute", observe)
    return lambda: event.remove(engine, "before_cursor_execute", observe)


@pytest.fixture(params=["driver", "session"])
def executor(request: pytest.FixtureRequest, db: Database) -> Iterator[str]:
    """Which way repository calls run: `driver` (the default) or `session`.

    `session` observes the engine's statements for the test (see
    `_observe_statements`), so every call of the test runs through SQLAlchemy.
    """
    if request.param == "driver":
        yield "driver"
        return
    stop = _observe_statements(db)
    try:
        yield "session"
    finally:
        stop()


class Route:
    """How a test's repository calls run; `async with route.scope():` around them.

    - `driver`: outside any transaction, unobserved: one statement on a pooled
      driver connection where the call allows it.
    - `session`: outside any transaction, observed: SQLAlchemy's session and
      ORM loading, in a session or short transaction of the call's own.
    - `transaction`: inside a `TransactionManager` (committed on exit),
      unobserved: writes through the session, reads on its connection.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        """The context one step's calls run in: a transaction for `transaction`."""
        if self.name != "transaction":
            yield
            return
        async with TransactionManager():
            yield

    def __repr__(self) -> str:
        return f"Route({self.name!r})"


@pytest.fixture(params=["driver", "session", "transaction"])
def route(request: pytest.FixtureRequest, repo_db: Database) -> Iterator[Route]:
    """Each of the three ways a repository call can run (see `Route`)."""
    if request.param != "session":
        yield Route(request.param)
        return
    stop = _observe_statements(repo_db)
    try:
        yield Route("session")
    finally:
        stop()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """Path of a fresh SQLite file for tests that need their own database."""
    return tmp_path / "own.db"


@pytest.fixture
def acme() -> Iterator[None]:
    """Run the test with tenant `acme` and user `alice` current."""
    with tenant_scope("acme", user_id="alice"):
        yield


@pytest.fixture(autouse=True)
def _no_default_database() -> Iterator[None]:
    """Each test starts and ends without a registered default database or cache."""
    _reset_default_database()
    _reset_default_cache()
    yield
    _reset_default_database()
    _reset_default_cache()


@pytest.fixture
async def pg_factory() -> AsyncIterator[Callable[..., Awaitable[Database]]]:
    """Build extra PostgreSQL `Database`s with custom settings; disposed afterwards."""
    made: list[Database] = []

    async def make(**settings: Any) -> Database:
        database = Database(DatabaseConfig(url=PG_URL, **settings))
        made.append(database)
        try:
            await database.ping()
        except DotMacError as exc:
            service_unavailable("PostgreSQL", PG_URL, exc)
        return database

    yield make
    for database in made:
        await database.dispose()


@pytest.fixture
async def repo_db(db: Database) -> AsyncIterator[Database]:
    """`db` as the default database; every test table is emptied afterwards.

    Repositories and transactions commit for real, so the rows they leave are
    deleted after each test (children first).
    """
    configure_database(db)
    yield db
    async with db.engine.begin() as conn:
        for table in reversed(DBBaseModel.metadata.sorted_tables):
            await conn.execute(table.delete())
