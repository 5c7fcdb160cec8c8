"""The one statement builder of the repository (private).

Every repository operation becomes one `Query`: a SQLAlchemy statement on the
model's table columns, with the tenant and soft-delete criteria written into
it and every value a caller gives as a named bound parameter, plus the values
of one call. Whichever way the query then runs (see `_executor.py`), it runs
this statement. Statements depend only on their `shape` (operation, filter
names and operators, order, flags), so each shape is built once per model and
reused by every call; SQLAlchemy's compiled cache and the driver's compile
cache then key on the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    column,
    false,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import selectinload

from .scoping import SCOPED, deleted_criterion

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping, Sequence

    from sqlalchemy import ColumnElement
    from sqlalchemy.sql import Executable

    from ._facts import Facts, Scoping
    from .filters import OrderSpec, Term

__all__ = [
    "Query",
    "after_criterion",
    "count",
    "exists",
    "get",
    "key_criteria",
    "key_params",
    "rows",
    "scope_criteria",
    "scope_params",
    "term_criteria",
    "term_params",
    "term_shape",
]

Returns = Literal["rows", "scalar", "rowcount"]

_INT = Integer()
_TOTAL = "dotmac_total"
_READ_OPTIONS = {SCOPED: True}


@dataclass(slots=True, eq=False)
class Query:
    """One statement of a repository call and the values of this call.

    `statement` is what the driver compiles; `orm` is the same statement in
    the form SQLAlchemy's session runs and loads objects from (the select
    wrapped by `select(Model).from_statement()`, DML returning the entity).
    `returns` says what running it gives: `rows` of the model (columns in
    `Facts.keys` order, plus a page total when `total`), a `scalar`, or a
    `rowcount`. `write` queries change rows; `load` names relationships to
    load with the rows (SQLAlchemy's loading only).
    """

    facts: Facts
    shape: Hashable
    statement: Executable
    orm: Executable
    params: dict[str, Any]
    returns: Returns
    write: bool = False
    total: bool = False
    load: tuple[str, ...] = ()
    #: Statement options for a session (populate_existing for writes, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    #: For INSERT / UPDATE whose values are named by column key: those keys.
    column_keys: tuple[str, ...] | None = None
    #: The session form takes the values as one ORM bulk row, by attribute.
    by_attribute: bool = False
    #: Rows wanted when the statement reads one more to see if rows follow.
    keep: int | None = None

    def for_session(self) -> tuple[Executable, Any]:
        """The statement and parameters to give `AsyncSession.exec`."""
        if not self.by_attribute:
            return self.orm, self.params
        attribute = self.facts.attribute
        return self.orm, [{attribute[key]: v for key, v in self.params.items()}]


# --- criteria -------------------------------------------------------------------


def scope_criteria(facts: Facts, scoping: Scoping) -> list[ColumnElement[bool]]:
    criteria: list[ColumnElement[bool]] = []
    if scoping.tenant is not None:
        tenant = facts.column["tenant_id"]
        criteria.append(tenant == bindparam("dotmac_tenant", type_=tenant.type))
    if scoping.deleted in ("live", "only"):
        criteria.append(
            deleted_criterion(
                facts.column["deleted_at"], only_deleted=scoping.deleted == "only"
            )
        )
    return criteria


def scope_params(scoping: Scoping, params: dict[str, Any]) -> dict[str, Any]:
    if scoping.tenant is not None:
        params["dotmac_tenant"] = scoping.tenant
    return params


def term_shape(terms: Sequence[Term]) -> tuple[tuple[str, str, Any], ...]:
    """What of the filters changes the SQL: names, operators, null comparisons."""
    return tuple((t.name, t.op, t.value if not t.bound else True) for t in terms)


def term_criteria(facts: Facts, terms: Sequence[Term]) -> list[ColumnElement[bool]]:
    criteria = []
    for i, term in enumerate(terms):
        column = facts.column[term.name]
        if not term.bound:
            criteria.append(term.clause(column))
            continue
        many = term.op in ("in", "not_in")
        bound = bindparam(f"dotmac_f{i}", type_=column.type, expanding=many)
        criteria.append(term.clause(column, bound))
    return criteria


def term_params(terms: Sequence[Term], params: dict[str, Any]) -> dict[str, Any]:
    for i, term in enumerate(terms):
        if term.bound:
            params[f"dotmac_f{i}"] = term.value
    return params


def key_criteria(facts: Facts) -> list[ColumnElement[bool]]:
    return [
        facts.column[key] == bindparam(f"dotmac_key{i}", type_=facts.column[key].type)
        for i, key in enumerate(facts.pk)
    ]


def key_params(key: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
    for i, value in enumerate(key):
        params[f"dotmac_key{i}"] = value
    return params


def _order_clauses(facts: Facts, order: Sequence[OrderSpec]) -> list[Any]:
    return [
        facts.column[spec.name].desc()
        if spec.descending
        else facts.column[spec.name].asc()
        for spec in order
    ]


def after_criterion(
    columns: Sequence[Any], values: Sequence[Any], order: Sequence[OrderSpec]
) -> ColumnElement[bool]:
    """Rows strictly after `values` in `order` (the keyset condition)."""
    if len({spec.descending for spec in order}) == 1:
        # One direction: a row-value comparison an index can range-scan.
        left, right = tuple_(*columns), tuple_(*values)
        return left < right if order[0].descending else left > right
    terms: list[ColumnElement[bool]] = []
    for i, spec in enumerate(order):
        equal = [columns[j] == values[j] for j in range(i)]
        step = columns[i] < values[i] if spec.descending else columns[i] > values[i]
        terms.append(and_(*equal, step))
    return or_(*terms) if terms else false()


# --- reads ----------------------------------------------------------------------


def _loaded(facts: Facts, select_: Any, load: Sequence[str]) -> Any:
    return select_.options(*(selectinload(getattr(facts.model, name)) for name in load))


def _row_query(
    facts: Facts,
    shape: Hashable,
    build: Callable[[], Any],
    params: dict[str, Any],
    *,
    total: bool = False,
    load: Sequence[str] = (),
    keep: int | None = None,
) -> Query:
    """A query of model rows: the select, and for a session `from_statement` of it."""

    def both() -> tuple[Executable, Executable]:
        core = build()
        entities: list[Any] = [facts.model]
        if total:
            entities.append(column(_TOTAL, _INT))
        return core, _loaded(facts, select(*entities), load).from_statement(core)

    core, orm = facts.statements((shape, tuple(load)), both)
    return Query(
        facts,
        shape,
        core,
        orm,
        params,
        "rows",
        total=total,
        load=tuple(load),
        options=_READ_OPTIONS,
        keep=keep,
    )


def get(
    facts: Facts, key: Sequence[Any], scoping: Scoping, *, load: Sequence[str] = ()
) -> Query:
    """The row with primary key `key` (values in `Facts.pk` order)."""

    def build() -> Any:
        return select(*facts.columns).where(
            *key_criteria(facts), *scope_criteria(facts, scoping)
        )

    params = scope_params(scoping, key_params(key, {}))
    return _row_query(facts, ("get", scoping.shape), build, params, load=load)


def rows(
    facts: Facts,
    terms: Sequence[Term],
    scoping: Scoping,
    order: Sequence[OrderSpec],
    *,
    limit: int | None = None,
    offset: int | None = None,
    after: Sequence[Any] | None = None,
    total: bool = False,
    look_ahead: bool = False,
    load: Sequence[str] = (),
) -> Query:
    """Rows matching `terms` in `order`; `after` a keyset position; `total` the count.

    With `total`, every row carries the number of matching rows as a last
    column (a scalar subquery: page and count in one round trip). With
    `look_ahead`, one row past `limit` is read to tell whether rows follow.
    """
    shape = (
        "rows",
        term_shape(terms),
        scoping.shape,
        tuple(order),
        limit is not None,
        bool(offset),
        after is not None,
        total,
    )

    def build() -> Any:
        criteria = [*term_criteria(facts, terms), *scope_criteria(facts, scoping)]
        columns: list[Any] = list(facts.columns)
        if total:
            count = select(func.count()).select_from(facts.table).where(*criteria)
            columns.append(count.scalar_subquery().label(_TOTAL))
        statement = select(*columns).where(*criteria)
        if after is not None:
            bound = [
                bindparam(f"dotmac_k{i}", type_=facts.column[spec.name].type)
                for i, spec in enumerate(order)
            ]
            ordered = [facts.column[spec.name] for spec in order]
            statement = statement.where(after_criterion(ordered, bound, order))
        statement = statement.order_by(*_order_clauses(facts, order))
        if limit is not None:
            statement = statement.limit(bindparam("dotmac_limit", type_=_INT))
        if offset:
            statement = statement.offset(bindparam("dotmac_offset", type_=_INT))
        return statement

    params = scope_params(scoping, term_params(terms, {}))
    if limit is not None:
        params["dotmac_limit"] = limit + 1 if look_ahead else limit
    if offset:
        params["dotmac_offset"] = offset
    for i, value in enumerate(after or ()):
        params[f"dotmac_k{i}"] = value
    keep = limit if look_ahead else None
    return _row_query(facts, shape, build, params, total=total, load=load, keep=keep)


def _value_query(
    facts: Facts, shape: Hashable, build: Callable[[], Any], params: dict[str, Any]
) -> Query:
    """A query of one value, on the model's entity (a session autoflushes first)."""
    statement, _ = facts.statements(shape, lambda: (build(),) * 2)
    return Query(
        facts, shape, statement, statement, params, "scalar", options=_READ_OPTIONS
    )


def count(facts: Facts, terms: Sequence[Term], scoping: Scoping) -> Query:
    """How many rows match `terms`."""

    def build() -> Any:
        return (
            select(func.count())
            .select_from(facts.model)
            .where(*term_criteria(facts, terms), *scope_criteria(facts, scoping))
        )

    params = scope_params(scoping, term_params(terms, {}))
    return _value_query(
        facts, ("count", term_shape(terms), scoping.shape), build, params
    )


def exists(facts: Facts, terms: Sequence[Term], scoping: Scoping) -> Query:
    """Whether any row matches `terms` (a scalar: the first key, or none)."""

    def build() -> Any:
        return (
            select(getattr(facts.model, facts.pk[0]))
            .where(*term_criteria(facts, terms), *scope_criteria(facts, scoping))
            .limit(1)
        )

    params = scope_params(scoping, term_params(terms, {}))
    return _value_query(
        facts, ("exists", term_shape(terms), scoping.shape), build, params
    )
