"""Filters and ordering from plain data, checked against the model's columns.

`{"age__gte": 18, "name__ilike": "an%", "team_id__in": [...]}` becomes SQL
criteria; `"-created_at"` or `["name", "-id"]` becomes ORDER BY. Names must be
mapped columns of the model, operators come from a fixed list, and values are
validated against the column's type and always sent as bound parameters, so
no part of the input ever becomes SQL text.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

import pydantic
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Enum,
    Float,
    Integer,
    Numeric,
    SmallInteger,
    String,
    TypeDecorator,
    inspect,
)

from ..exceptions import ValidationError
from ._types import UTCDateTime

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


def _columns(model: type[Any]) -> Mapping[str, Any]:
    columns: Mapping[str, Any] = inspect(model).columns
    return columns


def _attribute(model: type[Any], name: str, *, what: str) -> InstrumentedAttribute[Any]:
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid {what} name {name!r}"
        raise ValidationError(msg, field=str(name)[:64] or what)
    if name not in _columns(model):
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
    model: type[Any], name: str, value: Any, dialect: str | None = None
) -> Any:
    """Validate `value` for column `name` of `model` (`ValidationError` if wrong).

    `dialect` (`"postgresql"`, `"sqlite"`) is the database the value goes
    to; `None`: either, so values one of them would lose are refused (see
    `check_non_finite`).
    """
    if value is None:
        return None
    if type(value) is not int and name in _int_fields(model):
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
    _check_value(_int_ranges(model), name, result)
    if name in _non_finite_columns(model):
        check_non_finite(model, name, result, dialect)
    return result


def _refuses_naive(model: type[Any], name: str) -> bool:
    """Whether the column's type refuses naive datetimes (the toolkit's timestamps).

    Other datetime columns take what SQLAlchemy's type takes: naive values for
    `DateTime(timezone=False)`, and both for `DateTime(timezone=True)` (SQLite
    returns those naive, so a keyset cursor may hold one).
    """
    column = _columns(model).get(name)
    return column is not None and isinstance(column.type, UTCDateTime)


def check_text(name: str, value: str) -> str:
    """Refuse text no database here stores: NUL characters, lone surrogates.

    PostgreSQL rejects NUL in text and JSON; a lone surrogate cannot be encoded
    as UTF-8 by any driver. Both are refused before any SQL is built.
    """
    problem = None
    if "\x00" in value:
        problem = "text may not contain NUL characters"
    elif not _encodes(value):
        problem = "text holds a lone surrogate (not valid Unicode)"
    if problem is not None:
        error = {"field": name, "message": problem, "type": "text_not_storable"}
        msg = f"{name!r}: {problem}"
        raise ValidationError(msg, field=name, details={"errors": [error]})
    return value


def check_storable(
    model: type[Any], values: Mapping[str, Any], dialect: str | None = None
) -> None:
    """Refuse values of `model`'s fields that its columns cannot store.

    Text is checked by `check_text`; an int must lie in its column type's
    range (`SmallInteger` 16, `Integer` 32, `BigInteger` 64 bits, as
    PostgreSQL stores them; SQLite is held to the same ranges so both
    databases take the same values); NaN and infinities in float and
    numeric columns by `check_non_finite` for `dialect`.
    """
    ranges = _int_ranges(model)
    for name, value in values.items():
        _check_value(ranges, name, value)
    special = _non_finite_columns(model)
    if special:
        for name, value in values.items():
            if name in special:
                check_non_finite(model, name, value, dialect)


def _check_value(ranges: Mapping[str, tuple[int, int]], name: str, value: Any) -> None:
    if isinstance(value, str):
        check_text(name, value)
    elif type(value) is int and name in ranges:
        check_int(name, value, ranges[name])


def check_storable_rows(
    model: type[Any], rows: Sequence[Mapping[str, Any]], dialect: str | None = None
) -> None:
    """`check_storable` for many rows of the same fields, column by column.

    A field whose values are all text is checked as one joined string; one
    whose values are ints by its smallest and largest; a row is looked at on
    its own only to name the culprit.
    """
    if not rows:
        return
    ranges = _int_ranges(model)
    special = _non_finite_columns(model)
    for name in rows[0]:
        values = [row[name] for row in rows]
        if name in special:
            for value in values:
                check_non_finite(model, name, value, dialect)
        sample = next((value for value in values if value is not None), None)
        if isinstance(sample, str):
            try:
                joined = "".join(values)
            except TypeError:  # None or other values among the text
                joined = "".join(value for value in values if isinstance(value, str))
            if "\x00" in joined or not _encodes(joined):
                for value in values:
                    if isinstance(value, str):
                        check_text(name, value)
        elif type(sample) is int and name in ranges:
            ints = [value for value in values if type(value) is int]
            low, high = ranges[name]
            if min(ints) < low or max(ints) > high:
                for value in ints:
                    check_int(name, value, ranges[name])


#: `_non_finite_columns`: model -> {float or numeric field: bounded numeric?}.
_SPECIAL: dict[type[Any], dict[str, bool]] = {}


def _non_finite_columns(model: type[Any]) -> dict[str, bool]:
    """Fields of `model` in a float or numeric column: is it a `Numeric(p, s)`?"""
    found = _SPECIAL.get(model)
    if found is None:
        found = {}
        for name, column in _columns(model).items():
            kind = _stored_type(column)
            if isinstance(kind, Float):  # not a Numeric in SQLAlchemy 2.1
                found[name] = False
            elif isinstance(kind, Numeric):
                found[name] = kind.precision is not None
        _SPECIAL[model] = found
    return found


def check_non_finite(
    model: type[Any], name: str, value: object, dialect: str | None
) -> None:
    """Refuse a NaN or infinity that `dialect` would store wrong, lose or mismatch.

    PostgreSQL stores and compares NaN (`NaN = NaN`) and infinities, except
    an infinity in a `Numeric(p, s)` (overflow); SQLite binds NaN as NULL,
    losing it (a filter then compares with NULL). So NaN is refused unless
    the dialect is PostgreSQL; an infinity for a numeric column with a
    precision is refused on both databases, as ints outside their column's
    range are (PostgreSQL casts a filter's value to the column's type too);
    a signalling NaN always. Decimal fields refuse both unless they allow them
    (pydantic's `allow_inf_nan`); float fields allow them. See
    docs/filters.md for the measurements.
    """
    if isinstance(value, float):
        if value - value == 0.0:  # finite (NaN and infinities give NaN)
            return
        nan = value != value
    elif isinstance(value, Decimal):
        if value.is_finite():
            return
        if value.is_snan():
            _refuse_non_finite(name, "a signalling NaN cannot be stored as itself")
        nan = value.is_nan()
    else:
        return
    if nan:
        if dialect != "postgresql":
            where = "on SQLite" if dialect == "sqlite" else "unless on PostgreSQL"
            problem = f"NaN is refused {where} (SQLite stores it as NULL)"
            _refuse_non_finite(name, problem)
    elif _non_finite_columns(model).get(name):
        _refuse_non_finite(
            name, "a numeric column with a precision cannot hold an infinity"
        )


def _refuse_non_finite(name: str, problem: str) -> None:
    error = {"field": name, "message": problem, "type": "number_not_storable"}
    msg = f"{name!r}: {problem}"
    raise ValidationError(msg, field=name, details={"errors": [error]})


_INT_TEXT = re.compile(r"[+-]?[0-9]{1,40}")
#: Floats beyond this magnitude cannot tell which integer was meant (2**53).
MAX_EXACT_FLOAT_INT = 2**53


def check_int_input(name: str, value: object) -> object:
    """Refuse a value for an integer column that would be truncated or coerced.

    Accepted: an `int` (not a `bool`); a `float` or `Decimal` without a
    fraction (`3.0`, `Decimal("3")`), a float only up to 2**53 in magnitude,
    where every integer still has its own float; a `str` of ASCII digits with
    an optional sign (`"3"`, `"-12"`), as query strings give them. Refused:
    `True` / `False`, `3.5`, NaN and infinities, `"3.0"`, `" 3"`, `"3_000"`,
    bytes, and anything else. `None` is left to the field's nullability.
    """
    problem = None
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, bool):
        problem = "give an int, not a bool"
    elif isinstance(value, float):
        if not value.is_integer():
            problem = "a float with a fraction (or NaN / infinity) is not an int"
        elif abs(value) > MAX_EXACT_FLOAT_INT:
            problem = "a float this large does not say which int it means"
    elif isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            problem = "a Decimal with a fraction (or NaN / infinity) is not an int"
    elif isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            problem = "text for an int must be digits with an optional sign"
    else:
        problem = f"give an int, not {type(value).__name__}"
    if problem is not None:
        msg = f"bad value for {name!r}: {problem}"
        raise ValidationError(msg, field=name)
    return value


def check_int_inputs(model: type[Any], data: Mapping[str, Any]) -> None:
    """`check_int_input` for every integer field of `model` that `data` names."""
    fields = _int_fields(model)
    for name, value in data.items():
        if type(value) is not int and value is not None and name in fields:
            check_int_input(name, value)


def check_int_rows(model: type[Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """`check_int_inputs` for many rows, column by column (one type test a value)."""
    fields = _int_fields(model)
    if not fields or not rows:
        return
    for name in fields:
        values = [row.get(name) for row in rows]
        if not {type(value) for value in values} <= {int, type(None)}:
            for value in values:
                check_int_input(name, value)


_INT_FIELDS: dict[type[Any], frozenset[str]] = {}


def _int_fields(model: type[Any]) -> frozenset[str]:
    """Fields of `model` stored in an integer column and typed `int` in Python."""
    fields = _INT_FIELDS.get(model)
    if fields is None:
        known = getattr(model, "model_fields", {})
        fields = _INT_FIELDS[model] = frozenset(
            name
            for name in _int_ranges(model)
            if name in known and _is_int_annotation(known[name].annotation)
        )
    return fields


def _is_int_annotation(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return len(args) == 1 and _is_int_annotation(args[0])
    return isinstance(annotation, type) and issubclass(annotation, int)


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_int(name: str, value: int, bounds: tuple[int, int]) -> int:
    """Refuse an int outside `bounds` (inclusive), naming the field."""
    low, high = bounds
    if not low <= value <= high:
        msg = f"{name!r}: {value} is outside the column's range {low} to {high}"
        raise ValidationError(msg, field=name)
    return value


def _stored_type(column: Any) -> Any:
    """The column's type as the database stores it (a `TypeDecorator`'s impl)."""
    kind = column.type
    return kind.impl_instance if isinstance(kind, TypeDecorator) else kind


_INT_RANGES: dict[type[Any], dict[str, tuple[int, int]]] = {}


def _int_ranges(model: type[Any]) -> dict[str, tuple[int, int]]:
    ranges = _INT_RANGES.get(model)
    if ranges is None:
        ranges = {}
        for name, column in _columns(model).items():
            kind = _stored_type(column)
            if isinstance(kind, SmallInteger):
                bits = 16
            elif isinstance(kind, BigInteger):
                bits = 64
            elif isinstance(kind, Integer):
                bits = 32
            else:
                continue
            ranges[name] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        _INT_RANGES[model] = ranges
    return ranges


def _like_value(model: type[Any], name: str, value: Any) -> str:
    if not isinstance(value, str):
        msg = f"{name!r}: like / ilike need a str pattern, got {type(value).__name__}"
        raise ValidationError(msg, field=name)
    column = _columns(model).get(name)
    kind = None if column is None else _stored_type(column)
    if kind is not None and (not isinstance(kind, String) or isinstance(kind, Enum)):
        msg = f"{name!r}: like / ilike apply to text columns only"
        raise ValidationError(msg, field=name)
    return check_text(name, value)


def _many(model: type[Any], name: str, value: Any, dialect: str | None) -> list[Any]:
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


def _term(model: type[Any], key: object, value: Any, dialect: str | None) -> Term:
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
    model: type[Any], filters: Mapping[str, Any] | object, dialect: str | None = None
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
    dialect: str | None = None,
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
