"""Checks for the optional parts: `is_*_available()` tells, `require_*()` insists.

The core (models, schemas, tenancy, config, memory cache) needs no extra. A
database needs a driver (`postgres` or `sqlite` extra); the Redis cache needs
the `redis` extra; the FastAPI integration (`dotmac_core.asgi`) the `asgi` extra.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Literal

from .exceptions import MissingDependencyError

__all__ = [
    "is_cache_available",
    "is_database_available",
    "is_fastapi_available",
    "is_schemas_available",
    "require_cache",
    "require_database",
    "require_fastapi",
    "require_schemas",
]

DatabaseKind = Literal["postgresql", "sqlite"]

#: dialect -> (import name, extra that installs it)
_DB_DRIVERS: dict[str, tuple[str, str]] = {
    "postgresql": ("asyncpg", "postgres"),
    "sqlite": ("aiosqlite", "sqlite"),
}


@cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_database_available(kind: DatabaseKind | None = None) -> bool:
    """Return whether a database driver is installed (for `kind`, or any)."""
    kinds = _DB_DRIVERS if kind is None else {kind: _DB_DRIVERS[kind]}
    return any(_installed(module) for module, _ in kinds.values())


def require_database(kind: DatabaseKind | None = None) -> None:
    """Raise `MissingDependencyError` unless a driver (for `kind`) is installed."""
    if is_database_available(kind):
        return
    module, extra = _DB_DRIVERS[kind or "sqlite"]
    raise MissingDependencyError(module, extra)


def is_schemas_available() -> bool:
    """Return whether schema support (pydantic and SQLModel) is installed."""
    return _installed("pydantic") and _installed("sqlmodel")


def require_schemas() -> None:
    """Raise `MissingDependencyError` unless pydantic and SQLModel are installed."""
    for module in ("pydantic", "sqlmodel"):
        if not _installed(module):
            raise MissingDependencyError(module, None)  # a core dependency


def is_cache_available() -> bool:
    """Return whether the Redis cache backend (redis-py) is installed."""
    return _installed("redis")


def require_cache() -> None:
    """Raise `MissingDependencyError` unless the `redis` extra is installed."""
    if not is_cache_available():
        package = "redis"
        raise MissingDependencyError(package, extra=package)


def is_fastapi_available() -> bool:
    """Return whether FastAPI is installed (the `asgi` extra)."""
    return _installed("fastapi")


def require_fastapi() -> None:
    """Raise `MissingDependencyError` unless the `asgi` extra (FastAPI) is installed."""
    if not is_fastapi_available():
        package = "fastapi"
        raise MissingDependencyError(package, extra="asgi")
