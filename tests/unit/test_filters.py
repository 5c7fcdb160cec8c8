"""Filters and ordering: parsed against the model, values always bound."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import select

from dotmac_core import FILTER_OPERATORS, ValidationError
from dotmac_core.db.filters import build_filters, parse_filters, parse_order_by

from ..models import Member


def _sql(filters: dict[str, Any], dialect: Any) -> str:
    statement = select(Member).where(*build_filters(Member, filters))
    return str(statement.compile(dialect=dialect))


@pytest.mark.parametrize(
    "dialect", [postgresql.dialect(), sqlite.dialect()], ids=["pg", "sqlite"]
)
def test_every_operator_compiles_with_bound_values(dialect: Any) -> None:
    """Each operator becomes SQL on the column with the value as a parameter."""
    filters = {
        "name": "ann",
        "name__ne": "bob",
        "rank__lt": 5,
        "rank__lte": 5,
        "rank__gt": 1,
        "rank__gte": 1,
        "rank__in": [1, 2],
        "rank__not_in": [3],
        "email__like": "a%",
        "email__ilike": "A%",
        "team_id__is_null": True,
        "deleted_at__is_null": False,
    }
    sql = _sql(filters, dialect)
    assert "ann" not in sql
    assert "bob" not in sql
    assert "a%" not in sql
    for fragment in (
        "member.name =",
        "member.name !=",
        "member.rank <",
        "member.rank >=",
        "IN (",
        "NOT IN (",
        "LIKE",
        "member.team_id IS NULL",
        "member.deleted_at IS NOT NULL",
    ):
        assert fragment in sql, fragment
    assert set(FILTER_OPERATORS) == {
        "eq",
        "ne",
        "lt",
        "lte",
        "gt",
        "gte",
        "in",
        "not_in",
        "like",
        "ilike",
        "is_null",
    }


def test_values_are_coerced_to_the_column_type() -> None:
    """Query-string values are converted; None means IS NULL for eq / ne."""
    criteria = build_filters(Member, {"rank": "3", "team_id": None, "name__ne": None})
    assert criteria[0].right.value == 3  # type: ignore[attr-defined]
    text = [str(c) for c in criteria]
    assert text[1] == "member.team_id IS NULL"
    assert text[2] == "member.name IS NOT NULL"
    uid = uuid.uuid4()
    (by_id,) = build_filters(Member, {"id": str(uid)})
    assert by_id.right.value == uid  # type: ignore[attr-defined]


HOSTILE_FILTERS: list[Any] = [
    {"name; DROP TABLE member": 1},
    {"name--": 1},
    {"1=1 OR name": 1},
    {"name__eq; --": 1},
    {"name__or": 1},
    {"__class__": 1},
    {"_sa_instance_state": 1},
    {"team": 1},  # a relationship, not a column
    {"members": 1},
    {"name__in": "a,b"},  # a string is not a list
    {"name__in": {"a": 1}},
    {"name__like": 5},
    {"rank": "1 OR 1=1"},
    {"rank": "1; DELETE FROM member"},
    {"rank__gt": None},
    {"created_at__gte": "2026-01-01T00:00:00"},  # naive
    {"id": "not-a-uuid' OR '1'='1"},
    {"team_id__is_null": "yes"},
    {"rank__in": list(range(1001))},
    {"": 1},
    {"NAME": 1},
    {"name__": 1},
    {"name__": "ann"},  # a separator without an operator is not eq
    {"rank__like": "1%"},  # like / ilike only on text columns
    {"created_at__ilike": "2026%"},
    {"team_id__like": "0%"},
    {"name": "a\x00b"},  # NUL: no database stores it in text
    {"name__like": "a\x00%"},
    {"name__in": ["ok", "b\x00"]},
    {"name": "\ud800"},  # a lone surrogate is not valid Unicode
    {"rank": 2**31},  # outside a 32-bit Integer column, on every database
    {"rank__in": [1, -(2**31) - 1]},
    {"x" * 200: 1},
    {1: 1},
]


@pytest.mark.parametrize("filters", HOSTILE_FILTERS, ids=range(len(HOSTILE_FILTERS)))
def test_hostile_filters_are_rejected(filters: Any) -> None:
    """Inputs built to inject SQL or confuse the parser are ValidationErrors."""
    with pytest.raises(ValidationError) as info:
        build_filters(Member, filters)
    assert info.value.field


def test_filters_must_be_a_mapping() -> None:
    """A list of pairs is refused."""
    with pytest.raises(ValidationError, match="mapping"):
        build_filters(Member, [("name", "x")])


HOSTILE_ORDERS: list[Any] = [
    "name; DROP TABLE member",
    "name DESC",
    "--name",
    "-",
    "",
    "name,email",
    "lower(name)",
    "team",
    "1",
    ["name", "email desc"],
    [None],
    5,
    "x" * 100,
]


@pytest.mark.parametrize("order", HOSTILE_ORDERS, ids=range(len(HOSTILE_ORDERS)))
def test_hostile_order_by_is_rejected(order: Any) -> None:
    """Malformed or unknown order terms are ValidationErrors."""
    with pytest.raises(ValidationError):
        parse_order_by(Member, order)


def test_order_by_forms() -> None:
    """A name, a descending name, a list, or None."""
    assert [str(s) for s in parse_order_by(Member, "name")] == ["name"]
    assert [str(s) for s in parse_order_by(Member, "-created_at")] == ["-created_at"]
    specs = parse_order_by(Member, ["rank", "-email"])
    assert [(s.name, s.descending) for s in specs] == [("rank", False), ("email", True)]
    assert parse_order_by(Member, None) == []


def test_aware_datetimes_are_accepted() -> None:
    """A timezone-aware datetime or ISO string with offset filters fine."""
    build_filters(Member, {"created_at__gte": datetime(2026, 1, 1, tzinfo=UTC)})
    build_filters(Member, {"created_at__lt": "2026-01-01T00:00:00+00:00"})


def test_integer_bounds_are_the_column_types() -> None:
    """The ends of a 32-bit Integer column's range are accepted."""
    for value in (2**31 - 1, -(2**31)):
        assert build_filters(Member, {"rank": value})


NOT_INTS: list[object] = [True, 2.5, float("nan"), float("-inf"), 2.0**54]
NOT_INTS += [Decimal("1.5"), Decimal("sNaN"), "1.0", "1 ", "", "0x10", "1_0"]
NOT_INTS += ["\u0661", b"1", None.__class__, object()]


@pytest.mark.parametrize("value", NOT_INTS)
def test_int_filters_refuse_values_that_would_be_coerced(value: object) -> None:
    """A value an int column would truncate, coerce or guess: ValidationError."""
    with pytest.raises(ValidationError) as caught:
        build_filters(Member, {"rank": value})
    assert caught.value.field == "rank"


def test_int_filters_take_exact_values_as_ints() -> None:
    """Integral floats, Decimals and digit strings become plain ints."""
    terms = parse_filters(
        Member, {"rank": 2.0, "rank__gte": Decimal("-3"), "rank__in": ["4", "+5"]}
    )
    assert [(t.value, type(t.value)) for t in terms[:2]] == [(2, int), (-3, int)]
    assert terms[2].value == [4, 5]


def test_non_int_columns_keep_their_own_rules() -> None:
    """The int rules apply to int fields only: text for a str column stays text."""
    (term,) = parse_filters(Member, {"email": "3.0"})
    assert term.value == "3.0"
