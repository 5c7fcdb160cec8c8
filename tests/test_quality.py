"""Lint, format and strict typing are part of the suite, so CI enforces them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from benchmarks._ops_peers import PEERS
from benchmarks.suite import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed arguments, our own interpreter
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_check() -> None:
    """`ruff check` reports nothing."""
    result = _tool("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    """`ruff format --check` finds every file formatted."""
    result = _tool("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_build_strictly(tmp_path: Path) -> None:
    """The MkDocs site builds with `--strict` (no broken link or include)."""
    result = _tool("mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert result.returncode == 0, result.stdout + result.stderr


def _check_benchmark_record(out: Path, expected: list[str]) -> None:
    """Every operation ran, and every implementation of it gave samples."""
    record = json.loads((out / "benchmarks.json").read_text())
    assert record["skipped"].keys() <= set(PEERS), record["skipped"]
    ran = {op["key"]: op for op in record["operations"]}
    assert list(ran) == expected
    for key, op in ran.items():
        for impl, entry in op["implementations"].items():
            assert entry["error"] is None, (key, impl, entry["error"])
            assert entry["samples_us"], (key, impl)
        assert {"raw", "dotmac"} <= op["implementations"].keys(), key
    assert any(goal["operation"] == "tx_unit" for goal in record["goals"])
    assert (out / "benchmarks.md").read_text().count("\n|") > len(expected)


@pytest.mark.timeout(600)
def test_benchmarks_quick_run(tmp_path: Path) -> None:
    """`python -m benchmarks --quick` runs every operation on the embedded default."""
    result = _tool("benchmarks", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "get by primary key" in result.stdout
    expected = [key for key in OPERATIONS if key != "cache_redis"]
    _check_benchmark_record(tmp_path, expected)


@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_benchmarks_quick_run_postgres_and_redis(
    tmp_path: Path, redis_url: str
) -> None:
    """The same on PostgreSQL and Redis: COPY, asyncpg's pool, the Redis hit."""
    from .conftest import PG_URL, service_unavailable

    try:
        asyncio.run(_ping(PG_URL))
    except OSError as exc:
        service_unavailable("PostgreSQL", PG_URL, exc)
    url = make_url(PG_URL).set(drivername="postgresql")
    result = _tool(
        "benchmarks",
        "--quick",
        "--db",
        url.render_as_string(hide_password=False),
        "--redis",
        redis_url,
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _check_benchmark_record(tmp_path, list(OPERATIONS))
    record = json.loads((tmp_path / "benchmarks.json").read_text())
    bulk = next(op for op in record["operations"] if op["key"] == "bulk")
    assert "raw_copy" in bulk["implementations"]


async def _ping(url: str) -> None:
    import asyncpg

    server = make_url(url)
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.username,
        database=server.database,
    )
    await conn.close()


def test_mypy_strict() -> None:
    """`mypy --strict` passes on the package and the typing checks."""
    result = _tool("mypy", "--strict", "dotmac_core", "tests/typing")
    assert result.returncode == 0, result.stdout + result.stderr
