"""One metadata: `PlainModel` and `DBBaseModel` tables reference each other.

The tables here are on `DBBaseModel.metadata`, so the `db` fixture creates
them with the rest of the suite's and `repo_db` empties them.
"""

import subprocess
import sys
import textwrap
import uuid

import pytest
from sqlalchemy import Column, ForeignKey, Integer, Table, Uuid, inspect
from sqlmodel import Field, Relationship, SQLModel

from dotmac_core import (
    AlreadyExistsError,
    AsyncRepository,
    ConfigurationError,
    Database,
    DBBaseModel,
    IntegrityConstraintError,
    PlainModel,
    TransactionManager,
)
from dotmac_core.db.models import check_metadata_links


class MdHeroTeam(PlainModel, table=True):
    """A link table whose primary key is its two foreign keys."""

    __tablename__ = "md_hero_team"

    hero_id: uuid.UUID = Field(foreign_key="md_hero.id", primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="md_team.id", primary_key=True)


class MdTeam(DBBaseModel, table=True):
    """One side of the many-to-many."""

    name: str = Field(max_length=30)
    heroes: list["MdHero"] = Relationship(back_populates="teams", link_model=MdHeroTeam)


class MdGuild(PlainModel, table=True):
    """A plain table with an integer key, referenced by a `DBBaseModel` table."""

    __tablename__ = "md_guild"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=30)


class MdHero(DBBaseModel, table=True):
    """The other side; it also references the plain `MdGuild` table."""

    name: str = Field(max_length=30)
    guild_id: int | None = Field(default=None, foreign_key="md_guild.id")
    teams: list[MdTeam] = Relationship(back_populates="heroes", link_model=MdHeroTeam)


class Heroes(AsyncRepository[MdHero]):
    """Rows of `MdHero`."""


class Teams(AsyncRepository[MdTeam]):
    """Rows of `MdTeam`."""


class Links(AsyncRepository[MdHeroTeam]):
    """Rows of the link table, by their (hero_id, team_id) key."""


class Guilds(AsyncRepository[MdGuild]):
    """Rows of the plain integer-keyed table."""


def test_plain_and_base_tables_share_one_metadata() -> None:
    """`PlainModel` tables land on `DBBaseModel.metadata`, naming convention and all."""
    assert PlainModel.metadata is DBBaseModel.metadata
    assert issubclass(DBBaseModel, PlainModel)
    link = MdHeroTeam.__table__
    assert DBBaseModel.metadata.tables["md_hero_team"] is link
    assert [c.name for c in link.primary_key.columns] == ["hero_id", "team_id"]
    assert link.primary_key.name == "pk_md_hero_team"
    assert "id" not in link.c  # no columns of its own: the pair is the key
    assert "md_hero_team" not in SQLModel.metadata.tables


async def test_create_all_creates_plain_tables(db: Database) -> None:
    """`create_all()` made the plain tables, with foreign keys both ways."""
    async with db.engine.connect() as conn:
        names, link_fks, hero_fks = await conn.run_sync(
            lambda sync: (
                set(inspect(sync).get_table_names()),
                inspect(sync).get_foreign_keys("md_hero_team"),
                inspect(sync).get_foreign_keys("md_hero"),
            )
        )
    assert {"md_hero_team", "md_guild", "md_hero", "md_team"} <= names
    assert {fk["referred_table"] for fk in link_fks} == {"md_hero", "md_team"}
    assert [fk["referred_table"] for fk in hero_fks] == ["md_guild"]


async def test_many_to_many_through_the_link_table(repo_db: Database) -> None:
    """Links are written as rows or through the relationship, and load with `load=`."""
    guild = await Guilds().create({"name": "Guild"})
    assert isinstance(guild.id, int)
    hero = await Heroes().create({"name": "Rusty", "guild_id": guild.id})
    red, blue = (
        await Teams().create({"name": "red"}),
        await Teams().create({"name": "blue"}),
    )
    await Links().create({"hero_id": hero.id, "team_id": red.id})
    async with TransactionManager() as tx:
        joined = await Heroes().get_by_id(hero.id, load=["teams"])
        joined.teams.append(await Teams().get_by_id(blue.id))
        tx.session.add(joined)

    loaded = await Heroes().get_by_id(hero.id, load=["teams"])
    assert sorted(team.name for team in loaded.teams) == ["blue", "red"]
    team = await Teams().get_by_id(red.id, load=["heroes"])
    assert [member.name for member in team.heroes] == ["Rusty"]
    link = await Links().get_by_id((hero.id, red.id))
    assert (link.hero_id, link.team_id) == (hero.id, red.id)
    assert await Links().count({"hero_id": hero.id}) == 2
    assert await Links().delete({"hero_id": hero.id, "team_id": blue.id})
    assert await Links().count() == 1


async def test_duplicate_pair_is_refused(repo_db: Database) -> None:
    """The composite primary key refuses the same (hero, team) pair twice."""
    hero = await Heroes().create({"name": "Twice"})
    team = await Teams().create({"name": "once"})
    pair = {"hero_id": hero.id, "team_id": team.id}
    await Links().create(pair)
    with pytest.raises(IntegrityConstraintError) as caught:
        await Links().create(pair)
    assert isinstance(caught.value, AlreadyExistsError)
    with pytest.raises(IntegrityConstraintError):
        async with TransactionManager() as tx:
            tx.session.add(MdHeroTeam(**pair))
    assert await Links().count() == 1


async def test_link_to_a_missing_row_is_refused(repo_db: Database) -> None:
    """Each half of the key is a foreign key: a pair naming no hero is refused."""
    team = await Teams().create({"name": "alone"})
    with pytest.raises(IntegrityConstraintError):
        await Links().create({"hero_id": uuid.uuid4(), "team_id": team.id})


async def test_deleting_a_side_deletes_its_links(repo_db: Database) -> None:
    """A hero deleted through its repository takes its link rows with it."""
    hero = await Heroes().create({"name": "Gone"})
    team = await Teams().create({"name": "stays"})
    await Links().create({"hero_id": hero.id, "team_id": team.id})
    assert await Heroes().delete(hero.id)
    assert await Links().count() == 0
    assert await Teams().count() == 1


@pytest.mark.parametrize("direction", ["from SQLModel", "to SQLModel"])
def test_foreign_key_across_metadata_is_refused(direction: str) -> None:
    """Either direction is refused with the table to move; a Column object is not."""
    plain = Table(
        "md_loose", SQLModel.metadata, Column("id", Integer, primary_key=True)
    )
    if direction == "from SQLModel":
        crossing = Column("hero_id", Uuid, ForeignKey("md_hero.id"))
        plain.append_column(crossing)
        source, moved = plain, "md_loose"
    else:
        source = Table(
            "md_pointing",
            DBBaseModel.metadata,
            Column("id", Integer, primary_key=True),
            Column("loose_id", Integer, ForeignKey("md_loose.id")),
        )
        moved = "md_loose"
    try:
        with pytest.raises(ConfigurationError) as caught:
            check_metadata_links()
        assert f"base the class of table {moved!r}" in str(caught.value)
        assert source.name in str(caught.value)
    finally:
        for table in (plain, source):
            table.metadata.remove(table)
    check_metadata_links()  # the suite's own tables pass


def test_foreign_key_given_a_column_object_is_left_alone() -> None:
    """A `ForeignKey(column)` resolves through that column: nothing to refuse."""
    plain = Table(
        "md_by_column",
        SQLModel.metadata,
        Column("id", Integer, primary_key=True),
        Column("hero_id", Uuid, ForeignKey(MdHero.__table__.c.id)),
    )
    try:
        check_metadata_links()
    finally:
        SQLModel.metadata.remove(plain)


#: A link table declared on `SQLModel`, as the SQLModel tutorial does, in a
#: process of its own (its broken table must not reach this suite's metadata).
CROSSED = """
import asyncio, uuid
from sqlmodel import Field, Relationship, SQLModel
from dotmac_core import ConfigurationError, Database, DBBaseModel

class Link(SQLModel, table=True):
    hero_id: uuid.UUID = Field(foreign_key="hero.id", primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", primary_key=True)

class Team(DBBaseModel, table=True):
    heroes: list["Hero"] = Relationship(back_populates="teams", link_model=Link)

class Hero(DBBaseModel, table=True):
    teams: list[Team] = Relationship(back_populates="heroes", link_model=Link)

for attempt in (lambda: Hero(), lambda: asyncio.run(Database("sqlite+aiosqlite://").create_all())):
    try:
        attempt()
    except ConfigurationError as exc:
        print(exc)
    else:
        raise SystemExit("accepted")
"""


def test_link_table_on_sqlmodel_metadata_is_refused_clearly() -> None:
    """A foreign key from `SQLModel.metadata` to a toolkit table names the fix."""
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", textwrap.dedent(CROSSED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "'link'" in line
        assert "dotmac_core.PlainModel instead of SQLModel" in line
