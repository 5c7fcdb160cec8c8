"""Alembic environment for dotmac_core models, on an async engine.

Copy this file into your migrations directory, or use it where it is with
`script_location = dotmac_core.migrations:template` and `version_locations`
pointing at your versions directory. It reads, from alembic.ini's section:

- `dotmac_models`: modules that define your tables, imported first so the
  tables are on the metadata (`myapp.models, myapp.billing.models`);
- `sqlalchemy.url`: the database; unset, `DatabaseConfig()` reads
  `DOTMAC_DB_URL` (or the other `DOTMAC_DB_*` settings) from the environment;
- `dotmac_metadata` (optional): `module:attribute` of the `MetaData` to
  compare, instead of `dotmac_core.migrations.target_metadata()`.

A program that already holds a connection passes it as
`config.attributes["connection"]`; the migrations then run on it.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import TYPE_CHECKING

from alembic import context

from dotmac_core import Database
from dotmac_core.migrations import (
    context_options,
    database_config,
    import_models,
    target_metadata,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection

config = context.config
if config.config_file_name is not None and config.attributes.get(
    "configure_logger", True
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

import_models(config)
TARGET_METADATA = target_metadata(config)


def run_migrations_offline() -> None:
    """Write the migrations' SQL instead of running it (`alembic upgrade --sql`)."""
    url = database_config(config).sqlalchemy_url()
    context.configure(
        url=url.render_as_string(hide_password=False),
        target_metadata=TARGET_METADATA,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on `connection`, in one transaction."""
    context.configure(
        connection=connection,
        target_metadata=TARGET_METADATA,
        # SQLite alters a table by copying it: batch mode does that for you.
        render_as_batch=connection.dialect.name == "sqlite",
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    """Open the database as the application does and run the migrations on it."""
    database = Database(database_config(config))
    async with database, database.engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new async engine."""
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
