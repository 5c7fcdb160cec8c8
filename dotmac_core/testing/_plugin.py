"""The pytest plugin: database, cache, tenant and query-count fixtures.

Enabled by `pytest_plugins = ["dotmac_core.testing"]` in a conftest.py; nothing
here runs until then.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import pytest_asyncio
from sqlalchemy import MetaData, text
from sqlalchemy.engine import URL, make_url

from .._ratelimit_store import LOCAL_STORE
from ..cache.service import CacheService, _reset_default_cache, configure_cache
from ..config import CacheConfig
from ..db.database import Database, _reset_default_database, configure_database
from ..db.models import DBBaseModel
from ..decorators import _RETRY_MODE
from ..tenancy import TenantContext, tenant_scope
from ._queries import QueryCounter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine, Iterator
    from pathlib import Path

T = TypeVar("T")

#: Where the test database lives when neither the variable nor the ini option says.
DEFAULT_URL = "sqlite+aiosqlite://"
_URL_VARIABLE = "DOTMAC_TEST_DATABASE_URL"
_URL_INI = "dotmac_database_url"
_RETRIES_INI = "dotmac_retries"
_TENANT_MARK = "dotmac_tenant"
#: Tenant the `dotmac_tenant` fixture makes current when no marker names one.
DEFAULT_TENANT = "test-tenant"

_RETRIES_BEFORE = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the plugin's ini options."""
    parser.addini(
        _URL_INI,
        "Database for the dotmac_db fixture: a sqlite:// URL (a fresh file per "
        "test) or a PostgreSQL server URL (a database per session on it); "
        f"${_URL_VARIABLE} wins over it",
        default="",
    )
    parser.addini(
        _RETRIES_INI,
        "Keep retry_on_failure retrying during the tests (default: off)",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and switch retries off for the run."""
    config.addinivalue_line(
        "markers",
        f"{_TENANT_MARK}(tenant_id, user_id=None, roles=()): run the test with "
        "this tenant current (dotmac_core.testing)",
    )
    config.stash[_RETRIES_BEFORE] = _RETRY_MODE.enabled
    if not config.getini(_RETRIES_INI):
        _RETRY_MODE.enabled = False


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore the retry switch as it was before the run."""
    if _RETRIES_BEFORE in config.stash:
        _RETRY_MODE.enabled = config.stash[_RETRIES_BEFORE]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a loop of its own, in a thread of its own.

    Session setup runs here, outside the loops pytest-asyncio gives fixtures
    and tests, so it works whatever loop scope a project uses.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="dotmac-testing-setup")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _configured_url(config: pytest.Config) -> URL:
    raw = os.environ.get(_URL_VARIABLE) or str(config.getini(_URL_INI)) or DEFAULT_URL
    return make_url(raw)


async def _server_statement(server: URL, statement: str) -> None:
    # Through `Database`, so every URL form it accepts works here too.
    database = Database(server, pool_size=1, max_overflow=0)
    engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(statement)
    finally:
        await database.dispose()


async def _create_tables(url: URL, metadata: MetaData) -> None:
    database = Database(url, pool_size=1, max_overflow=0)
    try:
        await database.create_all(metadata)
    finally:
        await database.dispose()


def _quoted(name: str) -> str:
    """Quote a generated database name (letters, digits and `_` only)."""
    if not name.replace("_", "").isalnum():
        msg = f"unexpected database name {name!r}"
        raise ValueError(msg)
    return f'"{name}"'


@pytest.fixture(scope="session")
def dotmac_metadata() -> MetaData:
    """The tables `dotmac_db` creates: every `DBBaseModel` table by default.

    Override it in your conftest.py to use other metadata.
    """
    return DBBaseModel.metadata


@pytest.fixture(scope="session")
def dotmac_database_url(
    request: pytest.FixtureRequest, dotmac_metadata: MetaData
) -> Iterator[URL | None]:
    """This run's PostgreSQL database, its tables created; `None` for SQLite.

    The database is made on the configured server (its own database is only
    the way in), named for the pytest-xdist worker and process, and dropped
    with `WITH (FORCE)` at the end of the session.
    """
    server = _configured_url(request.config)
    if server.get_backend_name() == "sqlite":
        yield None
        return
    if server.drivername in ("postgresql", "postgres"):
        server = server.set(drivername="postgresql+asyncpg")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"dotmac_test_{worker}_{os.getpid()}_{uuid.uuid4().hex[:8]}".lower()
    _run(_server_statement(server, f"CREATE DATABASE {_quoted(name)}"))
    url = server.set(database=name)
    try:
        _run(_create_tables(url, dotmac_metadata))
        yield url
    finally:
        _run(
            _server_statement(
                server, f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)"
            )
        )


async def _truncate(database: Database, metadata: MetaData) -> None:
    tables = metadata.sorted_tables
    if not tables:
        return
    preparer = database.engine.dialect.identifier_preparer
    names = ", ".join(preparer.format_table(table) for table in tables)
    async with database.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE TABLE {names} RESTART IDENTITY CASCADE"))


@pytest_asyncio.fixture
async def dotmac_db(
    request: pytest.FixtureRequest,
    dotmac_database_url: URL | None,
    dotmac_metadata: MetaData,
    tmp_path: Path,
) -> AsyncIterator[Database]:
    """A `Database` with the tables created, registered as the default; empty after.

    SQLite: a fresh file under `tmp_path` for each test. PostgreSQL: the
    session's database (see `dotmac_database_url`), every table truncated
    after the test. Truncating, not rolling back an outer transaction,
    because repository calls outside a transaction commit on pooled
    connections of their own, which no outer transaction would undo.
    """
    if dotmac_database_url is None:
        configured = _configured_url(request.config)
        path = tmp_path / "dotmac-test.db"
        url = configured.set(drivername="sqlite+aiosqlite", database=str(path))
        database = Database(url)
        await database.create_all(dotmac_metadata)
    else:
        database = Database(dotmac_database_url, pool_size=5, max_overflow=5)
    configure_database(database)
    try:
        yield database
    finally:
        _reset_default_database()
        try:
            if dotmac_database_url is not None:
                await _truncate(database, dotmac_metadata)
        finally:
            await database.dispose()


@pytest_asyncio.fixture
async def dotmac_cache() -> AsyncIterator[CacheService]:
    """An in-memory `CacheService`, registered as the default; gone after the test."""
    service = configure_cache(CacheConfig(backend="memory"))
    try:
        yield service
    finally:
        _reset_default_cache()
        await service.aclose()


@pytest_asyncio.fixture
async def dotmac_tenant(request: pytest.FixtureRequest) -> AsyncIterator[TenantContext]:
    """Run the test with a tenant current: the marker's, else `test-tenant`.

    `@pytest.mark.dotmac_tenant("acme", user_id="alice")` names it (and
    enables this fixture by itself). The fixture is async so that the tenant
    is set in the context the test's event loop task starts from.
    """
    marker = request.node.get_closest_marker(_TENANT_MARK)
    args: tuple[Any, ...] = (DEFAULT_TENANT,)
    kwargs: dict[str, Any] = {}
    if marker is not None:
        args = marker.args or args
        kwargs = dict(marker.kwargs)
    with tenant_scope(*args, **kwargs) as context:
        assert context is not None  # noqa: S101 - a tenant is always given
        yield context


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test marked `dotmac_tenant` the `dotmac_tenant` fixture."""
    for item in items:
        if item.get_closest_marker(_TENANT_MARK) is None:
            continue
        names: list[str] | None = getattr(item, "fixturenames", None)
        if names is not None and "dotmac_tenant" not in names:
            names.append("dotmac_tenant")


@pytest.fixture
def dotmac_queries(dotmac_db: Database) -> Iterator[QueryCounter]:
    """A started `QueryCounter` on `dotmac_db`: `with dotmac_queries.expect(1): ...`.

    While it counts, the engine is observed, so repository calls run through
    SQLAlchemy rather than the raw driver path (same statements, same count).
    """
    with QueryCounter(dotmac_db) as counter:
        yield counter


@pytest.fixture(autouse=True)
def _dotmac_clean_process_state() -> Iterator[None]:
    """Each test starts without process-local rate-limit counts."""
    LOCAL_STORE.clear()
    yield
    LOCAL_STORE.clear()
