"""Checks that a value can be stored as given, per column type (private).

Text without NUL characters or lone surrogates, ints within their column
type's range and without truncation or coercion, and NaN / infinities only
where the database keeps them (see `check_non_finite`). Writes
(`_validation.py`) and filter values (`filters.py`) both go through here.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Union, get_args, get_origin

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    Numeric,
    SmallInteger,
    TypeDecorator,
    inspect,
)

from ..exceptions import ValidationError
from ._types import UTCDateTime

#: The database a value goes to: its dialect name (`"postgresql"`, `"sqlite"`),
#: a function returning it, called only when a value depends on it (a NaN), or
#: `None` for either database.
Dialect = str | Callable[[], str] | None


def columns(model: type[Any]) -> Mapping[str, Any]:
    """The mapped columns of `model`, by attribute name."""
    mapped: Mapping[str, Any] = inspect(model).columns
    return mapped


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
    model: type[Any], values: Mapping[str, Any], dialect: Dialect = None
) -> None:
    """Refuse values of `model`'s fields that its columns cannot store.

    Text is checked by `check_text`; an int must lie in its column type's
    range (`SmallInteger` 16, `Integer` 32, `BigInteger` 64 bits, as
    PostgreSQL stores them; SQLite is held to the same ranges so both
    databases take the same values); NaN and infinities in float and
    numeric columns by `check_non_finite` for `dialect`.
    """
    ranges = int_ranges(model)
    for name, value in values.items():
        check_value(ranges, name, value)
    aware = aware_columns(model)
    if aware:
        for name in aware & values.keys():
            check_aware(name, values[name])
    special = non_finite_columns(model)
    if special:
        for name, value in values.items():
            if name in special:
                check_non_finite(model, name, value, dialect)


def check_value(ranges: Mapping[str, tuple[int, int]], name: str, value: Any) -> None:
    if isinstance(value, str):
        check_text(name, value)
    elif type(value) is int and name in ranges:
        check_int(name, value, ranges[name])


def check_storable_rows(
    model: type[Any], rows: Sequence[Mapping[str, Any]], dialect: Dialect = None
) -> None:
    """`check_storable` for many rows of the same fields, column by column.

    A field whose values are all text is checked as one joined string; one
    whose values are ints by its smallest and largest; a row is looked at on
    its own only to name the culprit.
    """
    if not rows:
        return
    ranges = int_ranges(model)
    special = non_finite_columns(model)
    aware = aware_columns(model)
    for name in rows[0]:
        values = [row[name] for row in rows]
        if name in aware:
            for value in values:
                check_aware(name, value)
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


#: `non_finite_columns`: model -> {float or numeric field: bounded numeric?}.
_SPECIAL: dict[type[Any], dict[str, bool]] = {}


def non_finite_columns(model: type[Any]) -> dict[str, bool]:
    """Fields of `model` in a float or numeric column: is it a `Numeric(p, s)`?"""
    found = _SPECIAL.get(model)
    if found is None:
        found = {}
        for name, column in columns(model).items():
            kind = stored_type(column)
            if isinstance(kind, Float):  # not a Numeric in SQLAlchemy 2.1
                found[name] = False
            elif isinstance(kind, Numeric):
                found[name] = kind.precision is not None
        _SPECIAL[model] = found
    return found


def check_non_finite(
    model: type[Any], name: str, value: object, dialect: Dialect
) -> None:
    """Refuse a NaN or infinity that `dialect` would store wrong, lose or mismatch.

    PostgreSQL stores and compares NaN (`NaN = NaN`) and infinities, except
    an infinity in a `Numeric(p, s)` (overflow); SQLite binds NaN as NULL,
    losing it (a filter then compares with NULL). So NaN is refused unless
    the dialect is PostgreSQL; an infinity for a numeric column with a
    precision is refused on both databases, as ints outside their column's
    range are (PostgreSQL casts a filter's value to the column's type too);
    a signalling NaN always. Decimal fields refuse both unless they allow them
    (pydantic's `allow_inf_nan`); float fields allow them. A callable
    `dialect` is called only for a NaN. See docs/filters.md for the
    measurements.
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
        if callable(dialect):  # looked up only now: NaN is rare, lookups are not
            dialect = dialect()
        if dialect != "postgresql":
            where = "on SQLite" if dialect == "sqlite" else "unless on PostgreSQL"
            problem = f"NaN is refused {where} (SQLite stores it as NULL)"
            _refuse_non_finite(name, problem)
    elif non_finite_columns(model).get(name):
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
    fields = int_fields(model)
    for name, value in data.items():
        if type(value) is not int and value is not None and name in fields:
            check_int_input(name, value)


def check_int_rows(model: type[Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """`check_int_inputs` for many rows, column by column (one type test a value)."""
    fields = int_fields(model)
    if not fields or not rows:
        return
    for name in fields:
        values = [row.get(name) for row in rows]
        if not {type(value) for value in values} <= {int, type(None)}:
            for value in values:
                check_int_input(name, value)


_INT_FIELDS: dict[type[Any], frozenset[str]] = {}


def int_fields(model: type[Any]) -> frozenset[str]:
    """Fields of `model` stored in an integer column and typed `int` in Python."""
    fields = _INT_FIELDS.get(model)
    if fields is None:
        known = getattr(model, "model_fields", {})
        fields = _INT_FIELDS[model] = frozenset(
            name
            for name in int_ranges(model)
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


def stored_type(column: Any) -> Any:
    """The column's type as the database stores it (a `TypeDecorator`'s impl)."""
    kind = column.type
    return kind.impl_instance if isinstance(kind, TypeDecorator) else kind


_AWARE: dict[type[Any], frozenset[str]] = {}


def aware_columns(model: type[Any]) -> frozenset[str]:
    """Fields whose column takes only timezone-aware datetimes (`UTCDateTime`)."""
    found = _AWARE.get(model)
    if found is None:
        found = _AWARE[model] = frozenset(
            name
            for name, column in columns(model).items()
            if isinstance(column.type, UTCDateTime)
        )
    return found


def check_aware(name: str, value: Any) -> None:
    """Refuse a naive datetime for a column that stores UTC instants."""
    if isinstance(value, datetime) and value.tzinfo is None:
        msg = f"bad value for {name!r}: give a timezone-aware datetime"
        raise ValidationError(msg, field=name)


_INT_RANGES: dict[type[Any], dict[str, tuple[int, int]]] = {}


def int_ranges(model: type[Any]) -> dict[str, tuple[int, int]]:
    ranges = _INT_RANGES.get(model)
    if ranges is None:
        ranges = {}
        for name, column in columns(model).items():
            kind = stored_type(column)
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
