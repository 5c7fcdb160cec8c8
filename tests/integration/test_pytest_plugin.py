"""The `dotmac_core.testing` pytest plugin, as a user's project enables it.

Each test writes a small project (models, a conftest.py enabling the plugin,
tests using every fixture) into a temporary folder and runs pytest on it in a
subprocess with this interpreter: on SQLite, and on the PostgreSQL server the
suite uses (a database of the plugin's own is made and dropped on it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ..conftest import PG_SERVER_URL, service_unavailable

MODELS = '''
from uuid import UUID

from sqlmodel import Field, Relationship

from dotmac_core import AsyncRepository, DBBaseModel, TenantBaseModel


class Shelf(TenantBaseModel, table=True):
    name: str = Field(max_length=50)
    books: list["Book"] = Relationship(back_populates="shelf")


class Book(TenantBaseModel, table=True):
    title: str = Field(max_length=100, unique=True)
    shelf_id: UUID | None = Field(default=None, foreign_key="shelf.id")
    shelf: Shelf | None = Relationship(back_populates="books")


class Setting(DBBaseModel, table=True):
    key: str = Field(max_length=50)


class Books(AsyncRepository[Book]):
    """Books of the current tenant."""


class Shelves(AsyncRepository[Shelf]):
    """Shelves of the current tenant."""


class Settings(AsyncRepository[Setting]):
    """Settings, shared by every tenant."""
'''

CONFTEST = """
import models  # noqa: F401 - the tables dotmac_db creates

pytest_plugins = ["dotmac_core.testing"]
"""

TESTS = '''
import pytest

from dotmac_core import (
    TenantError,
    TransactionManager,
    get_cache,
    get_current_tenant,
    get_database,
    is_transient,
    retry_on_failure,
    tenant_scope,
)
from dotmac_core.testing import assert_tenant_isolated

from models import Book, Books, Settings, Shelves


async def test_a_writes_rows(dotmac_db, dotmac_tenant):
    """Rows written here, outside a transaction, are committed."""
    assert get_database() is dotmac_db
    assert dotmac_tenant.tenant_id == "test-tenant"
    await Books().create({"title": "one"})
    async with TransactionManager():
        await Books().create({"title": "two"})
    await Settings().create({"key": "k"})
    assert await Books().count() == 2


async def test_b_starts_empty(dotmac_db, dotmac_tenant):
    """The rows of the test before are gone, on every path."""
    assert await Books().count() == 0
    assert await Settings().count() == 0


@pytest.mark.dotmac_tenant("acme", user_id="alice")
async def test_marker_reaches_async_test(dotmac_db):
    """The marker's tenant is current in the async test's task."""
    assert get_current_tenant() == "acme"
    book = await Books().create({"title": "mine"})
    assert book.tenant_id == "acme"


@pytest.mark.dotmac_tenant("globex")
def test_marker_reaches_sync_test():
    """The marker's tenant is current in a sync test too."""
    assert get_current_tenant() == "globex"


async def test_no_tenant_without_fixture(dotmac_db):
    """Without the fixture or marker, no tenant is current."""
    assert get_current_tenant() is None
    with pytest.raises(TenantError):
        await Books().count()


async def test_memory_cache(dotmac_cache):
    """dotmac_cache is an in-memory default cache."""
    assert get_cache() is dotmac_cache
    assert dotmac_cache.backend_name == "memory"
    await dotmac_cache.set("k", {"v": 1})
    assert await dotmac_cache.get("k") == {"v": 1}


async def test_retries_are_off():
    """A retried call runs once: the plugin switched retries off."""
    calls = []

    @retry_on_failure(max_retries=5, backoff_factor=10.0)
    async def flaky():
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(Exception) as caught:
        await flaky()
    assert len(calls) == 1
    assert is_transient(caught.value)


async def test_query_counter(dotmac_db, dotmac_tenant, dotmac_queries):
    """Statements are counted outside and inside transactions; N+1 is caught."""
    shelf = await Shelves().create({"name": "s"})
    for n in range(3):
        await Books().create({"title": f"b{n}", "shelf_id": shelf.id})
    with dotmac_queries.expect(1):
        await Books().list()
    with dotmac_queries.expect(1):
        async with TransactionManager():
            await Books().count()
    with dotmac_queries.expect(at_most=2):
        shelves = await Shelves().list(load=["books"])
    assert len(shelves[0].books) == 3
    books = await Books().list()
    with pytest.raises(AssertionError, match="at most 1 SQL statements, .* ran 3"):
        with dotmac_queries.expect(at_most=1):
            for book in books:
                await Shelves().get_by_id(book.shelf_id)


async def test_isolation_helper(dotmac_db):
    """assert_tenant_isolated passes for a plain repository."""
    await assert_tenant_isolated(Books, lambda n: {"title": f"title-{n}"})


class LeakyBooks(Books):
    """Counts every tenant's books: the helper must notice."""

    async def count(self, filters=None, **options):
        with tenant_scope(None, bypass=True, reason="a bug"):
            return await super().count(filters, **options)


async def test_isolation_helper_finds_a_leak(dotmac_db):
    """A repository method that bypasses the tenant fails the helper, named."""
    leak = r"count: counted .*\\(outside a transaction\\)"
    with pytest.raises(AssertionError, match=leak):
        await assert_tenant_isolated(LeakyBooks, lambda n: {"title": f"t-{n}"})
'''

PYTEST_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def _project(root: Path) -> Path:
    for name, body in {
        "models.py": MODELS,
        "conftest.py": CONFTEST,
        "test_app.py": TESTS,
        "pytest.ini": PYTEST_INI,
    }.items():
        (root / name).write_text(textwrap.dedent(body).lstrip())
    return root


def _coverage_prefix() -> list[str]:
    """Measure the subprocess too when this run measures coverage.

    It writes a parallel data file beside this run's, which the run combines
    at its end, so the plugin's lines count although they run elsewhere.
    """
    try:
        import coverage
    except ImportError:  # pragma: no cover - coverage is a test dependency
        return []
    current = coverage.Coverage.current()
    if current is None:
        return []
    data_file = os.path.abspath(current.config.data_file)
    rcfile = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return [
        *("-m", "coverage", "run", "--parallel-mode"),
        f"--rcfile={rcfile}",
        f"--data-file={data_file}",
    ]


def _run_pytest(root: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    # Only the plugins the project needs: a user's run, and a faster start.
    env = {
        **os.environ,
        "DOTMAC_TEST_DATABASE_URL": database_url,
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "COV_CORE_SOURCE"):
        env.pop(name, None)
    return subprocess.run(  # noqa: S603 - this interpreter, our own arguments
        [
            *(sys.executable, *_coverage_prefix(), "-m", "pytest", "-q", "-rfEs"),
            *("-p", "no:cacheprovider", "-p", "pytest_asyncio.plugin"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _assert_passed(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "10 passed" in output, output


def test_plugin_on_sqlite(tmp_path: Path) -> None:
    """A user project's tests pass on SQLite, a fresh file per test."""
    _assert_passed(_run_pytest(_project(tmp_path), "sqlite+aiosqlite://"))


async def _databases_named(prefix: str) -> list[str]:
    import asyncpg

    server = make_url(PG_SERVER_URL)
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port or 5432,
        user=server.username,
        password=server.password,
        database=server.database,
        timeout=5,
    )
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{prefix}%"
        )
    finally:
        await conn.close()
    return [row["datname"] for row in rows]


@pytest.mark.postgres
def test_plugin_on_postgres(tmp_path: Path) -> None:
    """The same tests pass on PostgreSQL; the run's database is dropped after."""
    try:
        before = set(asyncio.run(_databases_named("dotmac_test_main_")))
    except Exception as exc:  # noqa: BLE001 - unreachable in any way: skip or fail
        service_unavailable("PostgreSQL", PG_SERVER_URL, exc)
    result = _run_pytest(_project(tmp_path), PG_SERVER_URL)
    _assert_passed(result)
    after = set(asyncio.run(_databases_named("dotmac_test_main_")))
    assert after <= before, f"left behind: {sorted(after - before)}"


def test_plugin_is_opt_in() -> None:
    """Importing dotmac_core loads neither pytest, the plugin nor OpenTelemetry."""
    code = (
        "import sys, dotmac_core; "
        "print(*(name in sys.modules for name in "
        "('pytest', 'dotmac_core.testing', 'opentelemetry')))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, our own arguments
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["False", "False", "False"]
