"""Alembic support: rendering hooks, `context.configure` options, an async env.py.

Autogenerate writes a column type as `module.Class(...)` and imports only
SQLAlchemy, so a migration naming `dotmac_core.types.UTCDateTime` or
SQLModel's `AutoString` fails with `NameError` at its first upgrade.
`render_item` writes those types at their public paths and adds their imports
to the migration. In `env.py`::

    from dotmac_core.migrations import context_options, target_metadata

    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        **context_options(),
    )

`template/env.py` is a complete async `env.py` built on these: copy it, or
point `script_location` at `dotmac_core.migrations:template` (see the docs'
Alembic page). This module needs the `alembic` extra; `import dotmac_core`
never imports it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import Enum, MetaData, inspect
from sqlalchemy.types import TypeEngine
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from ..config import DatabaseConfig
from ..db.models import PlainModel
from ..exceptions import ConfigurationError, MissingDependencyError
from ..types import UTCDateTime

try:
    from alembic.operations import ops
except ImportError as exc:  # pragma: no cover - the test extra installs alembic
    package = "alembic"
    raise MissingDependencyError(package, extra=package) from exc

if TYPE_CHECKING:
    from collections.abc import Iterable

    from alembic.autogenerate.api import AutogenContext
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.dialects.postgresql.base import PGIdentifierPreparer, PGInspector

__all__ = [
    "TEMPLATE_DIR",
    "context_options",
    "database_config",
    "import_models",
    "process_revision_directives",
    "render_item",
    "target_metadata",
]

#: The Alembic environment shipped with the package: `env.py` and `script.py.mako`.
TEMPLATE_DIR = Path(__file__).resolve().parent / "template"

#: Types rendered at a public path other than their class's module.
_PUBLIC_PATHS: dict[type[TypeEngine[Any]], str] = {
    AutoString: "sqlmodel.sql.sqltypes",
}


def render_item(
    type_: str, obj: Any, autogen_context: AutogenContext
) -> str | Literal[False]:
    """Render a column type outside SQLAlchemy at an importable path, with its import.

    Pass as `render_item=` to `context.configure` (`context_options()` does).
    `UTCDateTime` becomes `dotmac_core.types.UTCDateTime()`, SQLModel's
    `AutoString` `sqlmodel.sql.sqltypes.AutoString(...)`, any other type
    `its.module.Class(...)`; each adds `import its.module` to the migration.
    SQLAlchemy's own types, and everything but types, render as Alembic
    renders them (`False`).
    """
    if type_ != "type" or not isinstance(obj, TypeEngine):
        return False
    kind = type(obj)
    module = _PUBLIC_PATHS.get(kind, kind.__module__)
    if module.startswith("sqlalchemy.") or getattr(obj, "_variant_mapping", None):
        return False  # Alembic's own rendering (variants call back per type)
    if module == "__main__":
        return False  # not importable from a migration: keep Alembic's text
    autogen_context.imports.add(f"import {module}")
    if isinstance(obj, UTCDateTime):
        return f"{module}.{kind.__name__}()"  # its storage type is fixed
    return f"{module}.{obj!r}"


def process_revision_directives(
    context: MigrationContext, revision: Any, directives: list[Any]
) -> None:
    """Drop, on downgrade, the PostgreSQL enum types the upgrade's tables created.

    `op.create_table` creates a native enum type with its table, but
    `op.drop_table` leaves it behind, so upgrading again after a downgrade
    fails with "type already exists". Types that already existed when the
    migration was generated are left alone.
    """
    if context.dialect.name != "postgresql":
        return
    existing: set[tuple[str | None, str]] = set()
    if context.connection is not None:
        inspector = cast("PGInspector", inspect(context.connection))
        for item in inspector.get_enums(schema="*"):
            # An enum on the search path is the one a schema-less model names.
            existing.add((None if item["visible"] else item["schema"], item["name"]))
    preparer = cast("PGIdentifierPreparer", context.dialect.identifier_preparer)
    for script in directives:
        if not isinstance(script, ops.MigrationScript):
            continue
        for upgrade, downgrade in zip(
            script.upgrade_ops_list, script.downgrade_ops_list, strict=True
        ):
            made: dict[tuple[str | None, str], Enum] = {}
            for key, kind in _created_enums(upgrade.ops):
                if key not in existing and key not in made:
                    made[key] = kind
            for kind in made.values():
                # Names from the models, quoted by the dialect: no user input.
                name = preparer.format_type(kind)  # type: ignore[no-untyped-call]
                drop = f"DROP TYPE IF EXISTS {name}"
                downgrade.ops.append(ops.ExecuteSQLOp(drop))


def _created_enums(
    operations: Iterable[Any],
) -> Iterable[tuple[tuple[str | None, str], Enum]]:
    """`((schema, name), type)` of the native enums of the tables `operations` make."""
    for operation in operations:
        if isinstance(operation, ops.CreateTableOp):
            for column in operation.columns:
                kind = getattr(column, "type", None)
                if isinstance(kind, Enum) and kind.native_enum and kind.name:
                    yield (kind.schema, kind.name), kind
        elif isinstance(operation, ops.OpContainer):
            yield from _created_enums(operation.ops)


def context_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `context.configure`: the hooks and type comparison.

    `render_item` and `process_revision_directives` from this module, and
    `compare_type` / `compare_server_default` on, so autogenerate sees a
    changed type or server default. `overrides` win.
    """
    return {
        "render_item": render_item,
        "process_revision_directives": process_revision_directives,
        "compare_type": True,
        "compare_server_default": True,
        **overrides,
    }


def target_metadata(config: Config | None = None) -> list[MetaData]:
    """The metadata Alembic compares: the toolkit's, and `SQLModel.metadata`'s.

    `DBBaseModel.metadata` holds every `DBBaseModel` and `PlainModel` table;
    tables of classes based on `SQLModel` itself are on `SQLModel.metadata`,
    included when it has any. The `dotmac_metadata` option of `config`
    (`"myapp.db:metadata"`, a `MetaData` or a list of them) replaces both.

    Raises:
        ConfigurationError: `dotmac_metadata` does not name a `MetaData`.
    """
    spec = None if config is None else config.get_main_option("dotmac_metadata")
    if spec:
        module, _, name = spec.strip().partition(":")
        found = getattr(importlib.import_module(module), name or "metadata", None)
        chosen = found if isinstance(found, list | tuple) else [found]
        if not chosen or not all(isinstance(item, MetaData) for item in chosen):
            msg = f"dotmac_metadata {spec!r} does not name a MetaData or a list of them"
            raise ConfigurationError(msg)
        return list(chosen)
    found = [PlainModel.metadata]
    if SQLModel.metadata.tables:
        found.append(SQLModel.metadata)
    return found


def import_models(config: Config) -> None:
    """Import the modules the `dotmac_models` option names, registering their tables.

    The option holds module names separated by commas or new lines
    (`dotmac_models = myapp.models, myapp.billing.models`).
    """
    names = config.get_main_option("dotmac_models") or ""
    for name in names.replace(",", "\n").split():
        importlib.import_module(name)


def database_config(config: Config) -> DatabaseConfig:
    """Where migrations run: `sqlalchemy.url` of `config`, else `DOTMAC_DB_*`.

    Without `sqlalchemy.url` in alembic.ini, `DatabaseConfig()` reads the
    environment (`DOTMAC_DB_URL`, or the parts), as `Database()` does.
    """
    url = config.get_main_option("sqlalchemy.url")
    return DatabaseConfig(url=url) if url else DatabaseConfig()
