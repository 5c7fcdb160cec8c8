"""Text no database stores is refused before any SQL, on every write and route."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event

from dotmac_core import AsyncRepository, Database, ValidationError

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
