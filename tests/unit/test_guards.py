"""Guards for optional extras."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from dotmac_core import (
    MissingDependencyError,
    guards,
    is_cache_available,
    is_database_available,
    is_schemas_available,
    require_cache,
    require_database,
    require_schemas,
)


def test_installed_extras_are_available() -> None:
    """With the test extras installed, every part is available."""
    assert is_database_available()
    assert is_database_available("postgresql")
    assert is_database_available("sqlite")
    assert is_schemas_available()
    assert is_cache_available()
    require_database()
    require_database("postgresql")
    require_schemas()
    require_cache()


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend no optional package is importable."""
    guards._installed.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    yield
    guards._installed.cache_clear()


@pytest.mark.usefixtures("nothing_installed")
def test_missing_extras_are_named() -> None:
    """Each `require_*` names the extra that installs what is missing."""
    assert not is_database_available()
    assert not is_cache_available()
    assert not is_schemas_available()
    with pytest.raises(MissingDependencyError, match=r"dotmac-core\[postgres\]"):
        require_database("postgresql")
    with pytest.raises(MissingDependencyError, match=r"dotmac-core\[sqlite\]"):
        require_database()
    with pytest.raises(MissingDependencyError, match=r"dotmac-core\[redis\]"):
        require_cache()
    with pytest.raises(ImportError, match=r"pydantic.*'dotmac-core'"):
        require_schemas()
