import asyncio
import os
import tempfile
import uuid
from pathlib import Path

from sqlmodel import Field, Relationship

from dotmac_core import (
    AsyncRepository,
    Database,
    DBBaseModel,
    IntegrityConstraintError,
    PlainModel,
    TransactionManager,
    configure_database,
)


# --8<-- [start:models]
class HeroTeamLink(PlainModel, table=True):
    """One row per (hero, team) pair: the two foreign keys are the primary key."""

    __tablename__ = "hero_team_link"

    hero_id: uuid.UUID = Field(foreign_key="hero.id", primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", primary_key=True)


class Team(DBBaseModel, table=True):
    name: str = Field(max_length=50, unique=True)
    heroes: list["Hero"] = Relationship(back_populates="teams", link_model=HeroTeamLink)


class Hero(DBBaseModel, table=True):
    name: str = Field(max_length=50)
    teams: list[Team] = Relationship(back_populates="heroes", link_model=HeroTeamLink)
    # --8<-- [end:models]


# --8<-- [start:use]
class HeroRepository(AsyncRepository[Hero]):
    pass


class TeamRepository(AsyncRepository[Team]):
    pass


class LinkRepository(AsyncRepository[HeroTeamLink]):
    pass


async def link_heroes() -> None:
    heroes, teams, links = HeroRepository(), TeamRepository(), LinkRepository()
    preventers = await teams.create({"name": "Preventers"})
    z_force = await teams.create({"name": "Z-Force"})
    rusty = await heroes.create({"name": "Rusty-Man"})

    # A link is a row of the link table...
    await links.create({"hero_id": rusty.id, "team_id": preventers.id})
    # ...so the same pair twice breaks its primary key.
    try:
        await links.create({"hero_id": rusty.id, "team_id": preventers.id})
    except IntegrityConstraintError as exc:
        print(f"duplicate pair refused: {type(exc).__name__}")
    else:
        raise AssertionError("a duplicate pair was accepted")

    # Or append to the relationship inside a transaction: the flush writes the link.
    async with TransactionManager() as tx:
        hero = await heroes.get_by_id(rusty.id, load=["teams"])
        hero.teams.append(await teams.get_by_id(z_force.id))
        tx.session.add(hero)

    # Async code loads relationships in the call that reads the row: `load=`.
    loaded = await heroes.get_by_id(rusty.id, load=["teams"])
    assert sorted(team.name for team in loaded.teams) == ["Preventers", "Z-Force"]
    team = await teams.get_by_id(preventers.id, load=["heroes"])
    assert [hero.name for hero in team.heroes] == ["Rusty-Man"]
    # --8<-- [end:use]


async def main() -> None:
    """Run on `DOTMAC_DB_URL`, or on a fresh SQLite file."""
    with tempfile.TemporaryDirectory(prefix="dotmac-m2m-") as workdir:
        url = os.environ.get(
            "DOTMAC_DB_URL", f"sqlite+aiosqlite:///{Path(workdir) / 'm2m.db'}"
        )
        async with Database(url) as db:
            configure_database(db)
            await db.drop_all()
            await db.create_all()
            try:
                await link_heroes()
            finally:
                await db.drop_all()
    print("many-to-many example: all checks passed")


if __name__ == "__main__":
    asyncio.run(main())
