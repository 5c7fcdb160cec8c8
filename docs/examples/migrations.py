import asyncio
import enum
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, Column, Connection, String, inspect, text
from sqlmodel import Field, Relationship

from dotmac_core import (
    AuditMixin,
    Database,
    PlainModel,
    SoftDeleteMixin,
    TenantBaseModel,
)
from dotmac_core.migrations import context_options, target_metadata


# --8<-- [start:models]
class Rank(enum.Enum):
    ROOKIE = "rookie"
    VETERAN = "veteran"


class MigMembership(PlainModel, table=True):
    """A link table: its primary key is the pair of foreign keys."""

    __tablename__ = "mig_membership"

    hero_id: uuid.UUID = Field(foreign_key="mig_hero.id", primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="mig_team.id", primary_key=True)


class MigTeam(TenantBaseModel, AuditMixin, table=True):
    name: str = Field(max_length=50)
    # Stored as JSON; `sa_type` picks the column type.
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    members: list["MigHero"] = Relationship(
        back_populates="teams", link_model=MigMembership
    )


class MigHero(TenantBaseModel, SoftDeleteMixin, table=True):
    # The attribute `alias` is the column `code_name`.
    alias: str = Field(sa_column=Column("code_name", String(40), nullable=False))
    rank: Rank = Rank.ROOKIE
    # A default the database applies, also to rows written without the model.
    level: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})
    teams: list[MigTeam] = Relationship(
        back_populates="members", link_model=MigMembership
    )
    # --8<-- [end:models]


# --8<-- [start:config]
def alembic_config(url: str, versions: Path) -> Config:
    """What alembic.ini says, built in code: the shipped env.py, our versions."""
    config = Config()
    config.set_main_option("script_location", "dotmac_core.migrations:template")
    # Split version_locations on os.pathsep (Alembic 1.16+ asks for it).
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(versions))
    config.set_main_option("sqlalchemy.url", url)
    return config
    # --8<-- [end:config]


# --8<-- [start:check]
async def pending_changes(url: str) -> list[Any]:
    """The differences between the models and the database (none: up to date)."""

    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts=context_options())
        return compare_metadata(context, target_metadata())

    async with Database(url) as db, db.engine.connect() as connection:
        return await connection.run_sync(compare)
    # --8<-- [end:check]


def tables(url: str) -> set[str]:
    """The tables in the database, but Alembic's own."""

    async def read() -> set[str]:
        async with Database(url) as db, db.engine.connect() as connection:
            names = await connection.run_sync(lambda c: inspect(c).get_table_names())
        return set(names) - {"alembic_version"}

    return asyncio.run(read())


def round_trip(url: str, versions: Path) -> str:
    """Autogenerate, upgrade, compare, downgrade: return the migration's text."""
    config = alembic_config(url, versions)
    # --8<-- [start:commands]
    command.revision(config, message="create tables", autogenerate=True)
    command.upgrade(config, "head")
    assert asyncio.run(pending_changes(url)) == []
    command.downgrade(config, "base")
    # --8<-- [end:commands]
    assert tables(url) == set()
    command.upgrade(config, "head")  # again: the downgrade left nothing behind
    assert tables(url) == {"mig_team", "mig_hero", "mig_membership"}
    command.downgrade(config, "base")
    [script] = versions.glob("*.py")
    return script.read_text()


def main() -> None:
    """Run on `DOTMAC_DB_URL`, or on a fresh SQLite file."""
    with tempfile.TemporaryDirectory(prefix="dotmac-migrations-") as workdir:
        root = Path(workdir)
        url = os.environ.get(
            "DOTMAC_DB_URL", f"sqlite+aiosqlite:///{root / 'migrations.db'}"
        )
        (root / "versions").mkdir()
        migration = round_trip(url, root / "versions")
    assert "import dotmac_core.types" in migration
    assert "dotmac_core.db._types" not in migration
    print(migration)
    print("migrations example: all checks passed")


if __name__ == "__main__":
    main()
