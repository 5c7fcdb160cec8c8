"""The README and docs examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from .conftest import PG_URL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))


def _run(script: Path, cwd: Path, **env: str) -> str:
    result = subprocess.run(  # noqa: S603 - our own interpreter and files
        [sys.executable, str(script)],
        cwd=cwd,
        env={**_without_dotmac(os.environ), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_quickstart_is_the_example_file() -> None:
    """The README's quickstart block is docs/examples/quickstart.py, verbatim."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    quickstart = (ROOT / "docs" / "examples" / "quickstart.py").read_text()
    assert quickstart in blocks


def test_readme_names_two_commands() -> None:
    """The README gives one command for the demo and one for the tests."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3\.11 .*?)\n```", readme)
    assert len(commands) == 2
    assert commands[0].endswith("docs/examples/demo.py")
    assert "pytest" in commands[1]
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci_script.splitlines()


def _without_dotmac(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith("DOTMAC_")}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """Each docs example runs to completion on the embedded default."""
    _run(script, tmp_path)


@pytest.mark.postgres
def test_demo_runs_on_postgres(tmp_path: Path, db_url_pg: str) -> None:
    """The demo runs unchanged on PostgreSQL through `DOTMAC_DB_URL`."""
    out = _run(
        ROOT / "docs" / "examples" / "demo.py", tmp_path, DOTMAC_DB_URL=db_url_pg
    )
    assert "postgresql+asyncpg" in out
    assert "== done" in out


@pytest.fixture
async def db_url_pg() -> str:
    """PostgreSQL URL for subprocess tests, checked to be reachable first."""
    from dotmac_core import Database, DotMacError

    from .conftest import service_unavailable

    async with Database(PG_URL) as database:
        try:
            await database.ping()
        except DotMacError as exc:
            service_unavailable("PostgreSQL", PG_URL, exc)
    return PG_URL
