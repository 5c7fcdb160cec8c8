"""Filters and ordering from plain data, checked against the model's columns.

`{"age__gte": 18, "name__ilike": "an%", "team_id__in": [...]}` becomes SQL
criteria; `"-created_at"` or `["name", "-id"]` becomes ORDER BY. Names must be
mapped columns of the model, operators come from a fixed list, and values are
validated against the column's type and always sent as bound parameters, so
no part of the input ever becomes SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
from sqlalchemy import ColumnElement, Enum, String

from ..exceptions import ValidationError
from ._types import UTCDateTime
from ._values import (
    Dialect,
    check_int_input,
    check_non_finite,
    check_text,
    check_value,
    columns,
    int_fields,
    int_ranges,
    non_finite_columns,
    stored_type,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import InstrumentedAttribute

__all__ = ["FILTER_OPERATORS", "OrderSpec", "build_filters", "parse_order_by"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ORDER = re.compile(r"^-?[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: Most values an `in` / `not_in` filter takes: a bigger list belongs in a join.
MAX_IN_VALUES = 1000

#: The filter operators, as the suffix after `__` (`eq` is the default).
FILTER_OPERATORS: tuple[str, ...] = (
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
)


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """One ORDER BY term: a column name and its direction."""

    name: str
    descending: bool = False

    def __str__(self) -> str:
        return f"-{self.name}" if self.descending else self.name


def _attribute(model: type[Any], name: str, *, what: str) -> InstrumentedAttribute[Any]:
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid {what} name {name!r}"
        raise ValidationError(msg, field=str(name)[:64] or what)
    if name not in columns(model):
        msg = f"{model.__name__} has no column {name!r} to {what} by"
        raise ValidationError(msg, field=name)
    attribute: InstrumentedAttribute[Any] = getattr(model, name)
    return attribute


_ADAPTERS: dict[tuple[type[Any], str], pydantic.TypeAdapter[Any]] = {}


def _adapter(model: type[Any], name: str) -> pydantic.TypeAdapter[Any]:
    """A validator for one column's values: its field type, without length limits."""
    key = (model, name)
    adapter = _ADAPTERS.get(key)
    if adapter is None:
        field = model.model_fields.get(name)
        annotation: Any = Any if field is None else field.annotation
        # A field that allows NaN / infinities (`allow_inf_nan`) may be
        # filtered by them; `check_non_finite` decides per database.
        allows = [
            item
            for item in ([] if field is None else field.metadata)
            if getattr(item, "allow_inf_nan", None) is not None
        ]
        if allows:
            annotation = Annotated[annotation, *allows]
        # Strict on type, lax on form: "5" for an int column is fine (query
        # strings are text), "abc" is not.
        adapter = _ADAPTERS[key] = pydantic.TypeAdapter(annotation)
    return adapter


def coerce_value(
    model: type[Any], name: str, value: Any, dialect: Dialect = None
) -> Any:
    """Validate `value` for column `name` of `model` (`ValidationError` if wrong).

    `dialect` (`"postgresql"`, `"sqlite"`) is the database the value goes
    to; `None`: either, so values one of them would lose are refused (see
    `check_non_finite`).
    """
    if value is None:
        return None
    if type(value) is not int and name in int_fields(model):
        check_int_input(name, value)
    try:
        result = _adapter(model, name).validate_python(value)
    except pydantic.ValidationError as exc:
        problem = exc.errors(include_input=False, include_url=False)[0]["msg"]
        msg = f"bad value for {name!r}: {problem}"
        raise ValidationError(msg, field=name) from exc
    if (
        isinstance(result, datetime)
        and result.tzinfo is None
        and _refuses_naive(model, name)
    ):
        msg = f"bad value for {name!r}: give a timezone-aware datetime"
        raise ValidationError(msg, field=name)
    check_value(int_ranges(model), name, result)
    if name in non_finite_columns(model):
        check_non_finite(model, name, result, dialect)
    return result


def _refuses_naive(model: type[Any], name: str) -> bool:
    """Whether the column's type refuses naive datetimes (the toolkit's timestamps).

    Other datetime columns take what SQLAlchemy's type takes: naive values for
    `DateTime(timezone=False)`, and both for `DateTime(timezone=True)` (SQLite
    returns those naive, so a keyset cursor may hold one).
    """
    column = columns(model).get(name)
    return column is not None and isinstance(column.type, UTCDateTime)


def _like_value(model: type[Any], name: str, value: Any) -> str:
    if not isinstance(value, str):
        msg = f"{name!r}: like / ilike need a str pattern, got {type(value).__name__}"
        raise ValidationError(msg, field=name)
    column = columns(model).get(name)
    kind = None if column is None else stored_type(column)
    if kind is not None and (not isinstance(kind, String) or isinstance(kind, Enum)):
        msg = f"{name!r}: like / ilike apply to text columns only"
        raise ValidationError(msg, field=name)
    return check_text(name, value)


def _many(model: type[Any], name: str, value: Any, dialect: Dialect) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        msg = f"{name!r}: in / not_in need a list of values"
        raise ValidationError(msg, field=name)
    values = list(value)
    if len(values) > MAX_IN_VALUES:
        msg = f"{name!r}: at most {MAX_IN_VALUES} values in one in / not_in filter"
        raise ValidationError(msg, field=name)
    return [coerce_value(model, name, item, dialect) for item in values]


Builder = Callable[[Any, Any], ColumnElement[bool]]

_COMPARISONS: dict[str, Builder] = {
    "eq": lambda col, v: col == v,
    "ne": lambda col, v: col != v,
    "lt": lambda col, v: col < v,
    "lte": lambda col, v: col <= v,
    "gt": lambda col, v: col > v,
    "gte": lambda col, v: col >= v,
    "like": lambda col, v: col.like(v),
    "ilike": lambda col, v: col.ilike(v),
    "in": lambda col, v: col.in_(v),
    "not_in": lambda col, v: col.not_in(v),
}


@dataclass(frozen=True, slots=True)
class Term:
    """One checked filter: a column name, an operator and its validated value.

    `is_null` and comparisons with `None` carry no value into the SQL; every
    other term compares with a bound parameter.
    """

    name: str
    op: str
    value: Any

    @property
    def bound(self) -> bool:
        """Whether the SQL of this term takes a parameter."""
        return self.op != "is_null" and self.value is not None

    def clause(self, column: Any, value: Any = None) -> ColumnElement[bool]:
        """This term on `column`, comparing with `value` (default: its own value)."""
        if self.op == "is_null":
            null: ColumnElement[bool] = (
                column.is_(None) if self.value else column.is_not(None)
            )
            return null
        if self.value is None:
            null = column.is_(None) if self.op == "eq" else column.is_not(None)
            return null
        return _COMPARISONS[self.op](column, self.value if value is None else value)


def _term(model: type[Any], key: object, value: Any, dialect: Dialect) -> Term:
    if not isinstance(key, str):
        msg = f"filter keys must be str, got {type(key).__name__}"
        raise ValidationError(msg, field=str(key)[:64])
    name, separator, op = key.partition("__")
    if separator and not op:
        msg = f"filter key {key!r} ends in '__' without an operator"
        raise ValidationError(msg, field=key[:64])
    op = op or "eq"
    if op not in FILTER_OPERATORS:
        msg = (
            f"unknown filter operator {op!r} in {key!r}; use one of {FILTER_OPERATORS}"
        )
        raise ValidationError(msg, field=key[:64])
    _attribute(model, name, what="filter")
    if op == "is_null":
        if not isinstance(value, bool):
            msg = f"{key!r} needs true or false"
            raise ValidationError(msg, field=name)
        return Term(name, op, value)
    if op in ("in", "not_in"):
        return Term(name, op, _many(model, name, value, dialect))
    if op in ("like", "ilike"):
        return Term(name, op, _like_value(model, name, value))
    if value is None and op not in ("eq", "ne"):
        msg = f"{key!r} cannot compare with null; use {name}__is_null"
        raise ValidationError(msg, field=name)
    return Term(name, op, coerce_value(model, name, value, dialect))


def parse_filters(
    model: type[Any], filters: Mapping[str, Any] | object, dialect: Dialect = None
) -> list[Term]:
    """Check `{"field__op": value}` against `model` and return its terms.

    `dialect` is the database the filter runs on (`None`: either one).

    Raises:
        ValidationError: an unknown field or operator, or a value of the wrong
            type or one the database would not compare faithfully (NaN on
            SQLite).
    """
    if not filters:
        return []
    if not isinstance(filters, Mapping):
        msg = f"filters must be a mapping, got {type(filters).__name__}"
        raise ValidationError(msg, field="filters")
    return [_term(model, key, value, dialect) for key, value in filters.items()]


def build_filters(
    model: type[Any],
    filters: Mapping[str, Any] | object,
    dialect: Dialect = None,
) -> list[ColumnElement[bool]]:
    """Turn `{"field__op": value}` into criteria on `model`'s columns.

    `dialect` is the database the criteria run on (`"postgresql"`,
    `"sqlite"`; `None`: either one, so a NaN is refused).

    Raises:
        ValidationError: an unknown field or operator, or a value of the wrong
            type or one the database would not compare faithfully.
    """
    return [
        term.clause(getattr(model, term.name))
        for term in parse_filters(model, filters, dialect)
    ]


OrderBy = str | Iterable[str] | None
"""`"name"`, `"-created_at"`, a list of those, or `None`."""


def parse_order_by(model: type[Any], order_by: OrderBy | object) -> list[OrderSpec]:
    """Parse and check an `order_by` value against `model`'s columns.

    Raises:
        ValidationError: a malformed term or an unknown column.
    """
    if order_by is None:
        return []
    terms = [order_by] if isinstance(order_by, str) else order_by
    if not isinstance(terms, Iterable):
        msg = f"order_by must be a str or a list of str, got {type(order_by).__name__}"
        raise ValidationError(msg, field="order_by")
    specs: list[OrderSpec] = []
    for term in terms:
        if not isinstance(term, str) or not _ORDER.match(term):
            msg = f"invalid order_by term {term!r}: use 'name' or '-name'"
            raise ValidationError(msg, field="order_by")
        name = term.lstrip("-")
        _attribute(model, name, what="order")
        specs.append(OrderSpec(name, descending=term.startswith("-")))
    return specs
