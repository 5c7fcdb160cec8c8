"""`python -m dotmac_core doctor` against real services and a dead port."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from dotmac_core import __main__ as cli
from dotmac_core import doctor

from ..conftest import PG_SERVER_URL, service_unavailable
from ..faults import dead_port

DB_PASSWORD = "hunter2-db-secret"
CACHE_PASSWORD = "hunter2-cache-secret"
SECRET_KEY = "hunter2-cursor-key-0123456789"


def _require_postgres() -> None:
    """Skip (or fail in CI) when the suite's PostgreSQL server does not answer."""
    import asyncpg

    async def ping() -> None:
        server = make_url(PG_SERVER_URL)
        conn = await asyncpg.connect(
            host=server.host,
            port=server.port or 5432,
            user=server.username,
            database=server.database,
            timeout=5,
        )
        await conn.close()

    try:
        asyncio.run(ping())
    except Exception as exc:  # noqa: BLE001 - unreachable in any way
        service_unavailable("PostgreSQL", PG_SERVER_URL, exc)


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("DOTMAC_DB_", "DOTMAC_CACHE_", "DOTMAC_SECURITY_")):
            monkeypatch.delenv(name)


def _run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    status = doctor.main(list(args), out=out)
    return status, out.getvalue()


@pytest.mark.postgres
@pytest.mark.redis
def test_doctor_reports_live_services(redis_url: str) -> None:
    """Against live PostgreSQL and Redis: versions, modes, exit 0, no secret shown."""
    # Trust authentication accepts any password: a real one to mask.
    db_url = make_url(PG_SERVER_URL).set(password=DB_PASSWORD)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DOTMAC_DB_", "DOTMAC_CACHE_", "DOTMAC_SECURITY_"))
    }
    env |= {
        "DOTMAC_DB_URL": db_url.render_as_string(hide_password=False),
        "DOTMAC_DB_PGBOUNCER": "true",
        "DOTMAC_CACHE_URL": redis_url,
        "DOTMAC_SECURITY_SECRET_KEY": SECRET_KEY,
    }
    _require_postgres()
    result = subprocess.run(
        [sys.executable, "-m", "dotmac_core", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for expected in (
        "database  ok",
        "server: PostgreSQL ",
        "pool: size 10, overflow 10",
        "pgbouncer mode: on",
        "cache     ok",
        "backend: redis",
        "mode standalone",
        "cursor secret key: set",
        "all checks passed",
    ):
        assert expected in output, (expected, output)
    assert "round trip: " in output
    for secret in (DB_PASSWORD, SECRET_KEY):
        assert secret not in output


def test_doctor_fails_on_dead_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening: both services FAIL, exit 1, passwords stay masked."""
    _clean_env(monkeypatch)
    port = dead_port()
    monkeypatch.setenv(
        "DOTMAC_DB_URL", f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{port}/app"
    )
    monkeypatch.setenv(
        "DOTMAC_CACHE_URL", f"redis://:{CACHE_PASSWORD}@127.0.0.1:{port}/0"
    )
    status, output = _run("--timeout", "20")
    assert status == 1, output
    assert "database  FAIL" in output
    assert "cache     FAIL" in output
    assert output.count("unreachable: ") == 2
    assert f"postgresql+asyncpg://app:***@127.0.0.1:{port}/app" in output
    assert f"redis://:***@127.0.0.1:{port}/0" in output
    assert "cursor secret key: unset" in output
    assert DB_PASSWORD not in output
    assert CACHE_PASSWORD not in output


def test_doctor_reports_bad_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid setting fails its service's row, naming the field, not the value."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("DOTMAC_CACHE_BACKEND", "memcached")
    monkeypatch.setenv("DOTMAC_SECURITY_SECRET_KEY", "short")
    monkeypatch.setenv("DOTMAC_DB_URL", "sqlite+aiosqlite://")
    status, output = _run()
    assert status == 1, output
    assert "cache     FAIL    configuration: invalid CacheConfig: backend" in output
    assert (
        "security  FAIL    configuration: invalid SecurityConfig: secret_key" in output
    )
    assert "SQLite in memory" in output
    assert "short" not in output.replace("shorter", "")


def test_doctor_strict_fails_on_warnings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    """A SQLite file not made yet and no cursor key only warn; --strict exits 2."""
    _clean_env(monkeypatch)
    missing = os.path.join(tmp_path, "app.db")
    monkeypatch.setenv("DOTMAC_DB_URL", f"sqlite:///{missing}")
    status, output = _run()
    assert status == 0, output
    assert "does not exist yet" in output
    assert not os.path.exists(missing), "the doctor must not create the file"
    status, output = _run("--strict")
    assert status == 2, output


def test_doctor_on_an_existing_sqlite_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    """An existing SQLite file: its version and a round trip are shown."""
    import sqlite3

    _clean_env(monkeypatch)
    path = os.path.join(tmp_path, "app.db")
    sqlite3.connect(path).close()
    monkeypatch.setenv("DOTMAC_DB_URL", f"sqlite:///{path}")
    monkeypatch.setenv("DOTMAC_SECURITY_SECRET_KEY", SECRET_KEY)
    status, output = _run("--strict")
    assert status == 0, output
    assert "server: SQLite 3." in output
    assert "backend: memory" in output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("rediss://h:1/0?password=pw&ssl_cert_reqs=none", None),
        ("redis://h:1/0", "redis://h:1/0"),
    ],
)
def test_mask_url(url: str, shown: str | None) -> None:
    """Passwords in the user part and in a password= query value are masked."""
    masked = doctor.mask_url(url)
    assert "pw" not in masked
    if shown is not None:
        assert masked == shown


def test_command_line_dispatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m dotmac_core` shows its usage; an unknown command exits 2."""
    monkeypatch.setattr(sys, "argv", ["dotmac_core", "--help"])
    assert cli.main() == 0
    assert "doctor" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["dotmac_core", "frobnicate"])
    assert cli.main() == 2
    assert "unknown command" in capsys.readouterr().err
