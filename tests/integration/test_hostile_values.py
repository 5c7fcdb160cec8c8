"""Values no database stores as given are refused before any SQL, on every route.

Text with NUL or lone surrogates, ints a column would truncate or coerce,
and NaN or infinities where the database would lose or refuse them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import pydantic
import pytest
from sqlalchemy import Numeric, event
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, select

from dotmac_core import AsyncRepository, Database, DBBaseModel, ValidationError
from dotmac_core.db._validation import validated_rows, validated_values
from dotmac_core.db.filters import parse_filters

from ..models import Member

pytestmark = pytest.mark.usefixtures("repo_db", "executor", "acme")


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


HOSTILE = {"nul": "a\x00b", "surrogate": "caf\udce9"}

WRITES: dict[str, Callable[[str, Any], Awaitable[object]]] = {
    "create": lambda text, _: Members().create({"email": "h@x.io", "name": text}),
    "create_many": lambda text, _: Members().create_many(
        [{"email": "h1@x.io", "name": "café"}, {"email": "h2@x.io", "name": text}]
    ),
    "update": lambda text, made: Members().update(made.id, {"name": text}),
    "upsert": lambda text, made: Members().upsert(
        {"id": made.id, "email": made.email, "name": text}
    ),
    "update_many": lambda text, _: Members().update_many({}, {"name": text}),
    "list": lambda text, _: Members().list({"name": text}),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("call", sorted(WRITES))
async def test_hostile_text_is_refused_before_sql(
    db: Database, call: str, kind: str
) -> None:
    """NUL characters and lone surrogates: a ValidationError naming the field."""
    made = await Members().create({"email": "keep@x.io", "name": "kept"})
    sent: list[str] = []

    def spy(*args: Any) -> None:
        sent.append(str(args[2]))

    event.listen(db.engine.sync_engine, "before_cursor_execute", spy)
    try:
        with pytest.raises(ValidationError) as caught:
            await WRITES[call](HOSTILE[kind], made)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", spy)
    assert caught.value.field == "name"
    assert sent == []
    rows = await Members().list()
    assert [(m.email, m.name) for m in rows] == [("keep@x.io", "kept")]


@pytest.mark.parametrize(
    "call",
    [
        lambda: Members().create({"email": "r@x.io", "name": "r", "rank": 2**31}),
        lambda: Members().create_many(
            [{"email": "r@x.io", "name": "r", "rank": -(2**31) - 1}]
        ),
        lambda: Members().update_many({}, {"rank": 2**40}),
    ],
    ids=["create", "create_many", "update_many"],
)
async def test_ints_outside_the_column_range_are_refused(
    call: Callable[[], Awaitable[object]],
) -> None:
    """An int a 32-bit column cannot hold is a ValidationError on both databases."""
    with pytest.raises(ValidationError) as caught:
        await call()
    assert caught.value.field == "rank"
    assert await Members().count() == 0
    made = await Members().create({"email": "e@x.io", "name": "e", "rank": 2**31 - 1})
    assert made.rank == 2**31 - 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: Members().list(limit=2**63),
        lambda: Members().list(offset=2**64),
        lambda: Members().list_paginated(page=2**62, size=10),
    ],
    ids=["limit", "offset", "page"],
)
async def test_limits_beyond_the_database_range_are_refused(
    call: Callable[[], Awaitable[object]],
) -> None:
    """limit, offset and page numbers past a 64-bit offset: ValidationError."""
    with pytest.raises(ValidationError) as caught:
        await call()
    assert caught.value.field in {"limit", "offset", "page"}


#: Values an int column refuses: each would be truncated, coerced or guessed.
INT_REFUSED: list[object] = [
    True,
    False,
    3.5,
    float("nan"),
    float("inf"),
    2.0**60,
    Decimal("2.5"),
    Decimal("NaN"),
    "3.0",
    " 3",
    "3_000",
    "1e3",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() takes it, a query string should not
    b"3",
    [3],
]

INT_CALLS: dict[str, Callable[[Any, Any], Awaitable[object]]] = {
    "create": lambda v, _: Members().create({"email": "i@x", "name": "i", "rank": v}),
    "create_many": lambda v, _: Members().create_many(
        [{"email": "i1@x", "name": "i"}, {"email": "i2@x", "name": "i", "rank": v}]
    ),
    "update": lambda v, made: Members().update(made.id, {"rank": v}),
    "upsert": lambda v, made: Members().upsert(
        {"id": made.id, "email": made.email, "name": "u", "rank": v}
    ),
    "update_many set": lambda v, _: Members().update_many({}, {"rank": v}),
    "update_many filter": lambda v, _: Members().update_many(
        {"rank": v}, {"name": "x"}
    ),
    "list": lambda v, _: Members().list({"rank__gte": v}),
    "list in": lambda v, _: Members().list({"rank__in": [1, v]}),
    "count": lambda v, _: Members().count({"rank": v}),
    "exists": lambda v, _: Members().exists({"rank__ne": v}),
    "get_one": lambda v, _: Members().get_one(rank=v),
    "get_by_field": lambda v, _: Members().get_by_field("rank", v),
    "list_paginated": lambda v, _: Members().list_paginated(filters={"rank": v}),
    "list_after": lambda v, _: Members().list_after(filters={"rank__lt": v}),
}


@pytest.mark.parametrize("call", sorted(INT_CALLS))
async def test_ints_that_would_be_coerced_are_refused(db: Database, call: str) -> None:
    """Bools, fractions, NaN, vague text for an int column: ValidationError, no SQL."""
    made = await Members().create({"email": "keep@x.io", "name": "kept", "rank": 1})
    sent: list[str] = []

    def spy(*args: Any) -> None:
        sent.append(str(args[2]))

    event.listen(db.engine.sync_engine, "before_cursor_execute", spy)
    try:
        for value in INT_REFUSED:
            with pytest.raises(ValidationError) as caught:
                await INT_CALLS[call](value, made)
            assert caught.value.field == "rank", value
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", spy)
    assert sent == []
    rows = await Members().list()
    assert [(m.email, m.name, m.rank) for m in rows] == [("keep@x.io", "kept", 1)]


class Level(enum.IntEnum):
    """An int enum: its members are ints."""

    HIGH = 7


EXACT_INTS = [(3.0, 3), (Decimal("-4"), -4), (Decimal("5.000"), 5), ("6", 6)]
EXACT_INTS += [("+8", 8), (Level.HIGH, 7), (-(2.0**31), -(2**31))]


@pytest.mark.parametrize(("given", "stored"), EXACT_INTS)
async def test_ints_given_exactly_are_accepted(given: object, stored: int) -> None:
    """Integral floats (to 2**53), Decimals and digit strings mean one int each."""
    made = await Members().create({"email": "a@x", "name": "a", "rank": given})
    assert (made.rank, type(made.rank)) == (stored, int)
    assert await Members().count({"rank": given}) == 1
    assert await Members().count({"rank__in": [given]}) == 1
    updated = await Members().update(made.id, {"rank": given, "balance_cents": given})
    assert (updated.rank, updated.balance_cents) == (stored, stored)


# --- NaN and infinities in float and numeric columns ---------------------------------


class HvNumber(DBBaseModel, table=True):
    """Float and numeric columns; the Decimal fields allow NaN and infinities."""

    floating: float = 0.0
    opt_floating: float | None = None
    ratio: Annotated[Decimal, pydantic.Field(allow_inf_nan=True)] = Field(
        default=Decimal(0), sa_type=Numeric()
    )
    money: Annotated[Decimal | None, pydantic.Field(allow_inf_nan=True)] = Field(
        default=None, sa_type=Numeric(12, 2)
    )


class Numbers(AsyncRepository[HvNumber]):
    """Rows of float and numeric columns."""


#: SQLite stores NUMERIC as REAL; SQLAlchemy warns when it reads one there.
DECIMAL_ON_SQLITE = pytest.mark.filterwarnings(
    r"ignore:Dialect sqlite\+aiosqlite does \*not\* support Decimal objects"
    r":sqlalchemy.exc.SAWarning"
)

NAN, INF = float("nan"), float("inf")


def _same(a: object, b: object) -> bool:
    """Equal, NaN counting as equal to NaN."""
    return a == b or (a != a and b != b)


@DECIMAL_ON_SQLITE
async def test_what_each_database_stores(db: Database) -> None:
    """The facts the rules below rest on, written with a plain session (no checks).

    PostgreSQL keeps NaN and infinities in double precision and numeric
    (NaN in a Numeric(12, 2) too). SQLite keeps the infinities, even in a
    Numeric(12, 2), and binds NaN as NULL: lost in a nullable column, a
    NOT NULL violation in another.
    """
    postgres = db.dialect == "postgresql"
    async with db.session() as session:
        row = HvNumber(
            floating=-INF,
            opt_floating=NAN,
            ratio=Decimal("NaN") if postgres else Decimal("Infinity"),
            money=Decimal("NaN") if postgres else Decimal("-Infinity"),
        )
        session.add(row)
        await session.commit()
        stored = (await session.exec(select(HvNumber))).one()
        await session.refresh(stored)
        assert stored.floating == -INF
        if postgres:
            assert stored.opt_floating is not None
            assert math.isnan(stored.opt_floating)
            assert stored.ratio.is_nan()
            assert stored.money is not None
            assert stored.money.is_nan()
        else:
            assert stored.opt_floating is None  # NaN lost
            assert (stored.ratio, stored.money) == (
                Decimal("Infinity"),
                Decimal("-Infinity"),
            )
            session.add(HvNumber(floating=NAN))
            with pytest.raises(IntegrityError, match="NOT NULL"):
                await session.commit()


NUMBER_WRITES: dict[str, Callable[[dict[str, Any], Any], Awaitable[object]]] = {
    "create": lambda data, _: Numbers().create(data),
    "create_many": lambda data, _: Numbers().create_many([{}, data]),
    "update": lambda data, made: Numbers().update(made.id, data),
    "upsert": lambda data, made: Numbers().upsert({"id": made.id, **data}),
    "update_many": lambda data, _: Numbers().update_many({}, data),
    "list": lambda data, _: Numbers().list(data),
    "count in": lambda data, _: Numbers().count(
        {f"{name}__in": [value] for name, value in data.items()}
    ),
}
FILTERS = {"list", "count in"}


@DECIMAL_ON_SQLITE
@pytest.mark.parametrize("call", sorted(NUMBER_WRITES))
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("floating", INF),
        ("floating", -INF),
        ("opt_floating", INF),
        ("ratio", Decimal("Infinity")),
        ("ratio", Decimal("-Infinity")),
    ],
)
async def test_infinities_are_stored_and_compared_as_given(
    call: str, field: str, value: object
) -> None:
    """+/- infinity in a float or unbounded numeric column: kept, on both databases."""
    made = await Numbers().create({})
    await NUMBER_WRITES[call]({field: value}, made)
    written = [
        row for row in await Numbers().list() if _same(getattr(row, field), value)
    ]
    assert len(written) == (0 if call in FILTERS else 1)
    assert await Numbers().count({field: value}) == len(written)


@DECIMAL_ON_SQLITE
@pytest.mark.parametrize("call", sorted(NUMBER_WRITES))
async def test_infinity_in_a_numeric_with_precision_is_refused(
    db: Database, call: str
) -> None:
    """A Numeric(12, 2) cannot hold an infinity on PostgreSQL: refused on both.

    Filters too: PostgreSQL casts the value to the column's type (overflow).
    """
    made = await Numbers().create({"money": Decimal("1.50")})
    for value in (Decimal("Infinity"), Decimal("-Infinity"), INF):
        with pytest.raises(ValidationError) as caught:
            await NUMBER_WRITES[call]({"money": value}, made)
        assert caught.value.field == "money"
    assert [row.money for row in await Numbers().list()] == [Decimal("1.50")]


NAN_VALUES = [
    ("floating", NAN),
    ("opt_floating", NAN),
    ("floating", Decimal("NaN")),
    ("ratio", Decimal("NaN")),
    ("ratio", NAN),
    ("money", Decimal("NaN")),
]


@DECIMAL_ON_SQLITE
@pytest.mark.parametrize("call", sorted(NUMBER_WRITES))
async def test_nan_is_refused_where_it_would_be_lost(db: Database, call: str) -> None:
    """NaN on SQLite (stored as NULL, compared as NULL): a ValidationError, no SQL.

    A signalling NaN, which no database keeps as itself, is refused everywhere.
    """
    made = await Numbers().create({})
    sent: list[str] = []

    def spy(*args: Any) -> None:
        sent.append(str(args[2]))

    values = [*NAN_VALUES, ("ratio", Decimal("sNaN"))]
    if db.dialect == "postgresql":
        values = values[-1:]
    event.listen(db.engine.sync_engine, "before_cursor_execute", spy)
    try:
        for field, value in values:
            with pytest.raises(ValidationError) as caught:
                await NUMBER_WRITES[call]({field: value}, made)
            assert caught.value.field == field, value
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", spy)
    assert sent == []
    assert len(await Numbers().list()) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgres"], indirect=True)
@pytest.mark.parametrize("call", sorted(NUMBER_WRITES))
async def test_nan_is_stored_and_compared_on_postgresql(call: str) -> None:
    """PostgreSQL keeps NaN in double precision and numeric, and NaN = NaN there."""
    made = await Numbers().create({})
    for field, value in NAN_VALUES:
        await NUMBER_WRITES[call]({field: value}, made)
    assert await Numbers().count({"floating": NAN}) >= (
        call not in {"list", "count in"}
    )


@pytest.mark.parametrize(("field", "value"), NAN_VALUES)
@pytest.mark.parametrize("dialect", ["postgresql", "sqlite", None])
def test_nan_rules_per_dialect(field: str, value: object, dialect: str | None) -> None:
    """The checks take NaN for PostgreSQL only; an unknown database is either."""
    checks = [
        lambda: validated_values(HvNumber, {field: value}, dialect),
        lambda: validated_rows(HvNumber, [{field: value}], dialect),
        lambda: parse_filters(HvNumber, {field: value}, dialect),
    ]
    for check in checks:
        if dialect == "postgresql":
            check()
        else:
            with pytest.raises(ValidationError) as caught:
                check()
            assert caught.value.field == field


def test_database_is_looked_up_only_for_a_nan() -> None:
    """A callable dialect is called for a NaN only, so other values cost no lookup."""
    calls: list[str] = []

    def dialect() -> str:
        calls.append("looked up")
        return "postgresql"

    values = {"floating": 1.5, "opt_floating": INF, "ratio": Decimal("2.5")}
    validated_values(HvNumber, values, dialect)
    validated_rows(HvNumber, [values, values], dialect)
    parse_filters(HvNumber, {**values, "floating__in": [1.0, -INF]}, dialect)
    assert calls == []
    validated_values(HvNumber, {"floating": NAN}, dialect)
    parse_filters(HvNumber, {"ratio": Decimal("NaN")}, dialect)
    assert calls == ["looked up", "looked up"]


async def test_naive_datetimes_for_utc_columns_are_refused() -> None:
    """A naive datetime for a toolkit timestamp is a ValidationError, before SQL."""
    made = await Members().create({"email": "t@x.io", "name": "t", "rank": 1})
    naive = datetime(2000, 1, 1)
    for write in (
        lambda: Members().update(made.id, {"deleted_at": naive}),
        lambda: Members().create_many(
            [{"email": "u@x.io", "name": "u", "rank": 2, "deleted_at": naive}]
        ),
    ):
        with pytest.raises(ValidationError) as caught:
            await write()
        assert caught.value.field == "deleted_at"
    assert (await Members().get_by_id(made.id)).deleted_at is None  # type: ignore[union-attr]
    assert await Members().count() == 1
