"""Tables of the type matrix (`tests/integration/test_type_matrix.py`).

Every column type a SQLModel user writes, in a few tables: one wide
`DBBaseModel` table with soft delete, small tables for shapes that need their
own (server defaults, SQL keywords as column names, an attribute named
differently from its column), and plain `SQLModel` tables (integer
autoincrement key, composite key, PostgreSQL-only types) that live in
`SQLModel.metadata`, which the test module creates and drops itself.
"""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Integer,
    Numeric,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

from dotmac_core import AuditMixin, DBBaseModel, SoftDeleteMixin

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

__all__ = [
    "BlankNull",
    "Cents",
    "Colour",
    "Level",
    "MatrixDefaults",
    "MatrixHero",
    "MatrixKeywords",
    "MatrixNumber",
    "MatrixPair",
    "MatrixPg",
    "MatrixRenamed",
    "MatrixRow",
    "Shade",
]


class Colour(enum.StrEnum):
    """A str Enum whose values differ from its names (SQLAlchemy stores names)."""

    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Level(enum.IntEnum):
    """An int Enum."""

    LOW = 1
    MID = 5
    HIGH = 10


class Shade(enum.Enum):
    """A plain Enum, stored as a non-native (VARCHAR) enum."""

    LIGHT = "l"
    DARK = "d"


class Cents(TypeDecorator[Decimal]):
    """Money: a Decimal in Python, whole cents (an integer) in the database."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> int | None:
        """Decimal('1.25') -> 125."""
        if value is None:
            return None
        return int((Decimal(value) * 100).to_integral_value())

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        """125 -> Decimal('1.25')."""
        if value is None:
            return None
        return (Decimal(value) / 100).quantize(Decimal("0.01"))


class BlankNull(TypeDecorator[str]):
    """Text whose NULL reads back as '' (a type with a value for None)."""

    impl = String(20)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> str:
        """NULL -> ''."""
        return "" if value is None else value


def _enum_values(enum_class: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in enum_class]


class MatrixRow(DBBaseModel, AuditMixin, table=True):
    """One column per type, NOT NULL and nullable variants, with soft delete.

    Decimal and float columns are in `MatrixNumber`: on some versions one of
    them stops every read of its table on PostgreSQL, which would hide the
    other columns' results.
    """

    number: int
    big: int = Field(sa_type=BigInteger)
    flag: bool
    name: str = Field(max_length=40)
    body: str = Field(sa_type=Text)
    naive: datetime = Field(sa_type=DateTime(timezone=False))
    aware: datetime = Field(sa_type=DateTime(timezone=True))
    stamp: datetime  # SQLModel's default mapping of datetime
    day: date
    clock: time
    span: timedelta
    ref: uuid.UUID
    blob: bytes
    colour: Colour
    level: Level
    shade: Shade = Field(sa_type=sa.Enum(Shade, native_enum=False, length=10))
    tone: Colour = Field(
        sa_type=sa.Enum(
            Colour,
            name="tone",
            native_enum=False,
            length=10,
            values_callable=_enum_values,
        )
    )
    doc: dict[str, Any] = Field(sa_type=JSON)
    cents: Decimal = Field(sa_type=Cents)
    blank: str | None = Field(default=None, sa_type=BlankNull)
    opt_number: int | None = None
    opt_big: int | None = Field(default=None, sa_type=BigInteger)
    opt_flag: bool | None = None
    opt_name: str | None = Field(default=None, max_length=40)
    opt_body: str | None = Field(default=None, sa_type=Text)
    opt_naive: datetime | None = Field(default=None, sa_type=DateTime(timezone=False))
    opt_aware: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    opt_day: date | None = None
    opt_clock: time | None = None
    opt_span: timedelta | None = None
    opt_ref: uuid.UUID | None = None
    opt_blob: bytes | None = None
    opt_colour: Colour | None = None
    opt_level: Level | None = None
    opt_doc: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    opt_cents: Decimal | None = Field(default=None, sa_type=Cents)


class MatrixNumber(DBBaseModel, table=True):
    """Decimal with and without scale, and float; NOT NULL and nullable."""

    money: Decimal = Field(max_digits=12, decimal_places=2)
    ratio: Decimal = Field(sa_type=Numeric())
    floating: float
    opt_money: Decimal | None = Field(default=None, max_digits=12, decimal_places=2)
    opt_ratio: Decimal | None = Field(default=None, sa_type=Numeric())
    opt_floating: float | None = None


class MatrixDefaults(DBBaseModel, table=True):
    """Columns with a server default, nullable and not, Python default None."""

    note: str = Field(max_length=20)
    srv_null: str | None = Field(
        default=None,
        max_length=20,
        sa_column_kwargs={"server_default": text("'server'")},
    )
    srv_req: str | None = Field(
        default=None,
        max_length=20,
        nullable=False,
        sa_column_kwargs={"server_default": text("'server'")},
    )


class MatrixKeywords(DBBaseModel, table=True):
    """Columns named after SQL keywords."""

    order: int
    select: str = Field(max_length=20)
    user: str = Field(max_length=20)
    group: str | None = Field(default=None, max_length=20)


class MatrixRenamed(DBBaseModel, table=True):
    """Attributes whose column names differ (`label` is column `db_name`)."""

    label: str = Field(sa_column=Column("db_name", String(20), nullable=False))
    note: str | None = Field(
        default=None, sa_column=Column("db_note", String(20), nullable=True)
    )
    rank: int = 0


class MatrixHero(SQLModel, table=True):
    """A plain SQLModel table with an integer autoincrement primary key."""

    __tablename__ = "matrix_hero"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=40)
    power: int = 0
    born: date | None = None


class MatrixPair(SoftDeleteMixin, table=True):
    """A plain SQLModel table with a composite primary key and soft delete."""

    __tablename__ = "matrix_pair"

    region: str = Field(max_length=10, primary_key=True)
    number: int = Field(primary_key=True)
    amount: int = 0
    note: str | None = Field(default=None, max_length=20)


class MatrixPg(SQLModel, table=True):
    """PostgreSQL-only types: JSONB and ARRAY (created on PostgreSQL only)."""

    __tablename__ = "matrix_pg"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    doc: dict[str, Any] = Field(sa_type=JSONB)
    opt_doc: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    numbers: list[int] = Field(sa_type=ARRAY(Integer))
    words: list[str] = Field(sa_type=ARRAY(String(20)))
    opt_words: list[str] | None = Field(default=None, sa_type=ARRAY(Text))
