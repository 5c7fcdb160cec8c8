"""Lint, format and strict typing are part of the suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_benchmarks_quick_run(tmp_path: Path) -> None:
    """`python -m benchmarks --quick` runs on the embedded default and reports."""
    result = _tool("benchmarks", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "get by primary key" in result.stdout
    assert (tmp_path / "benchmarks.json").exists()


def test_mypy_strict() -> None:
    """`mypy --strict` passes on the package and the typing checks."""
    result = _tool("mypy", "--strict", "dotmac_core", "tests/typing")
    assert result.returncode == 0, result.stdout + result.stderr
