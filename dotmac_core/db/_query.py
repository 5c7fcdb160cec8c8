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
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import (
    Float,
    Integer,
    and_,
    bindparam,
    column,
    false,
    func,
    inspect,
    or_,
    select,
    tuple_,
)
from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import configure_mappers, selectinload

from .scoping import SCOPED, deleted_criterion, has_soft_delete, is_tenant_model

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping, Sequence

    from sqlalchemy import Column, ColumnElement
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql import Executable

    from .filters import OrderSpec, Term

__all__ = ["Facts", "Query", "Scoping", "facts_of"]

Deleted = Literal["live", "any", "only"]
Returns = Literal["rows", "scalar", "rowcount"]

#: Shapes kept per model; past this, statements are built per call (the
#: shapes come from callers' filters, so their number has no natural bound).
MAX_SHAPES = 512

_INT = Integer()
_TOTAL = "dotmac_total"


@dataclass(frozen=True, slots=True)
class Scoping:
    """Which rows a query may see: one tenant (or all under bypass), live or not.

    `tenant` is the tenant to filter by (`None`: no tenant criterion, for a
    model without tenant or under a bypass); `deleted` is `None` for a model
    without soft delete.
    """

    tenant: str | None
    deleted: Deleted | None

    @property
    def shape(self) -> tuple[bool, Deleted | None]:
        """What of the scoping changes the statement (not the tenant's value)."""
        return (self.tenant is not None, self.deleted)


class Facts:
    """What the builder, the executors and the materialiser know of one model."""

    def __init__(self, model: type[Any]) -> None:
        mapper: Mapper[Any] = inspect(model)
        if not mapper.configured:
            configure_mappers()  # attribute access on built objects needs it
        self.model = model
        self.mapper = mapper
        self.table: Any = mapper.local_table
        props = list(mapper.column_attrs)
        #: Attribute keys of the mapped columns, in the order statements select them.
        self.keys: tuple[str, ...] = tuple(prop.key for prop in props)
        #: The mapped columns, in `keys` order.
        self.columns: tuple[Column[Any], ...] = tuple(
            cast("Column[Any]", prop.columns[0]) for prop in props
        )
        #: Attribute key -> column.
        self.column: dict[str, Column[Any]] = dict(
            zip(self.keys, self.columns, strict=True)
        )
        #: Attribute keys of the primary key, in the mapper's order.
        self.pk: tuple[str, ...] = tuple(
            mapper.get_property_by_column(column).key for column in mapper.primary_key
        )
        #: Positions of the primary key's attributes in `keys`.
        self.pk_positions = tuple(self.keys.index(k) for k in self.pk)
        #: The primary key's values (a tuple) of a row in `keys` order.
        self.key_of: Callable[[Sequence[Any]], tuple[Any, ...]] = _key_getter(
            self.pk_positions
        )
        self.tenant = is_tenant_model(model)
        self.soft_delete = has_soft_delete(model)
        self.has_created_at = "created_at" in self.column
        #: Columns whose value a column type turns Python `None` into (JSON's
        #: null): `None` there is a value to write, not "not given".
        self.none_is_value = frozenset(
            key
            for key, column in self.column.items()
            if column.type.should_evaluate_none
        )
        #: Attribute keys of float columns (SQLite's REAL affinity).
        self.float_keys: tuple[str, ...] = tuple(
            key
            for key, column in self.column.items()
            if isinstance(column.type, Float) and not column.type.asdecimal
        )
        #: Column key -> attribute key.
        self.attribute: dict[str, str] = {
            column.key: key for key, column in self.column.items()
        }
        #: Checked `order_by` strings and the order each means (see repository).
        self.orders: dict[str | None, tuple[OrderSpec, ...]] = {}
        self._statements: dict[Hashable, tuple[Executable, Executable]] = {}

    def statements(
        self, shape: Hashable, build: Callable[[], tuple[Executable, Executable]]
    ) -> tuple[Executable, Executable]:
        """The statement of `shape` for the driver and for a session, built once."""
        statements = self._statements.get(shape)
        if statements is None:
            statements = build()
            if len(self._statements) < MAX_SHAPES:
                self._statements[shape] = statements
        return statements


def _key_getter(
    positions: tuple[int, ...],
) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if len(positions) > 1:
        return itemgetter(*positions)
    (only,) = positions
    return lambda row: (row[only],)


_FACTS: dict[type[Any], Facts] = {}


def facts_of(model: type[Any]) -> Facts:
    """The `Facts` of a table model, looked up once."""
    facts = _FACTS.get(model)
    if facts is None:
        facts = _FACTS[model] = Facts(model)
    return facts


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


def _scope_criteria(facts: Facts, scoping: Scoping) -> list[ColumnElement[bool]]:
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


def _scope_params(scoping: Scoping, params: dict[str, Any]) -> dict[str, Any]:
    if scoping.tenant is not None:
        params["dotmac_tenant"] = scoping.tenant
    return params


def _term_shape(terms: Sequence[Term]) -> tuple[tuple[str, str, Any], ...]:
    """What of the filters changes the SQL: names, operators, null comparisons."""
    return tuple((t.name, t.op, t.value if not t.bound else True) for t in terms)


def _term_criteria(facts: Facts, terms: Sequence[Term]) -> list[ColumnElement[bool]]:
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


def _term_params(terms: Sequence[Term], params: dict[str, Any]) -> dict[str, Any]:
    for i, term in enumerate(terms):
        if term.bound:
            params[f"dotmac_f{i}"] = term.value
    return params


def _key_criteria(facts: Facts) -> list[ColumnElement[bool]]:
    return [
        facts.column[key] == bindparam(f"dotmac_key{i}", type_=facts.column[key].type)
        for i, key in enumerate(facts.pk)
    ]


def _key_params(key: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
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
            *_key_criteria(facts), *_scope_criteria(facts, scoping)
        )

    params = _scope_params(scoping, _key_params(key, {}))
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
        _term_shape(terms),
        scoping.shape,
        tuple(order),
        limit is not None,
        bool(offset),
        after is not None,
        total,
    )

    def build() -> Any:
        criteria = [*_term_criteria(facts, terms), *_scope_criteria(facts, scoping)]
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

    params = _scope_params(scoping, _term_params(terms, {}))
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
            .where(*_term_criteria(facts, terms), *_scope_criteria(facts, scoping))
        )

    params = _scope_params(scoping, _term_params(terms, {}))
    return _value_query(
        facts, ("count", _term_shape(terms), scoping.shape), build, params
    )


def exists(facts: Facts, terms: Sequence[Term], scoping: Scoping) -> Query:
    """Whether any row matches `terms` (a scalar: the first key, or none)."""

    def build() -> Any:
        return (
            select(getattr(facts.model, facts.pk[0]))
            .where(*_term_criteria(facts, terms), *_scope_criteria(facts, scoping))
            .limit(1)
        )

    params = _scope_params(scoping, _term_params(terms, {}))
    return _value_query(
        facts, ("exists", _term_shape(terms), scoping.shape), build, params
    )


# --- writes ---------------------------------------------------------------------

_READ_OPTIONS = {SCOPED: True}
_WRITE_OPTIONS = {"populate_existing": True, SCOPED: True}
_BULK_OPTIONS = {"synchronize_session": "fetch", SCOPED: True}


def insert_values(facts: Facts, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values an INSERT names: SQLAlchemy's rule for `None`.

    As the ORM does, a `None` is "not given" (the column's server or Python
    default applies, or NULL), unless the column type turns `None` into a
    value of its own (JSON null).
    """
    keep = facts.none_is_value
    return {
        key: value for key, value in values.items() if value is not None or key in keep
    }


def by_column(facts: Facts, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (by attribute) keyed by column key, in the table's order."""
    return {facts.column[key].key: values[key] for key in facts.keys if key in values}


def insert(facts: Facts, values: Mapping[str, Any]) -> Query:
    """INSERT of one row (`insert_values` applied) returning the stored row.

    The values are parameters named by column key, as SQLAlchemy names them
    for `insert(table)` executed with a dict: a default that reads
    `context.get_current_parameters()` sees the same names on every route.
    """
    params = by_column(facts, insert_values(facts, values))
    names = tuple(params)
    shape = ("insert", names)

    def build() -> tuple[Executable, Executable]:
        return (
            sa_insert(facts.table).returning(*facts.columns),
            sa_insert(facts.model).returning(facts.model),
        )

    core, orm = facts.statements(shape, build)
    return Query(
        facts,
        shape,
        core,
        orm,
        params,
        "rows",
        write=True,
        options=_WRITE_OPTIONS,
        column_keys=names,
        by_attribute=True,
    )


def update(
    facts: Facts, key: Sequence[Any], sets: Mapping[str, Any], scoping: Scoping
) -> Query:
    """UPDATE of the row with primary key `key`, returning the stored row.

    `sets` become parameters named by column key (the SET clause), as for
    `insert`; columns with a Python `onupdate` that `sets` does not name get
    it, as SQLAlchemy gives them to any UPDATE.
    """
    values = by_column(facts, sets)
    names = tuple(values)
    shape = ("update", names, scoping.shape)

    def build() -> tuple[Executable, Executable]:
        criteria = [*_key_criteria(facts), *_scope_criteria(facts, scoping)]
        return (
            sa_update(facts.table).where(*criteria).returning(*facts.columns),
            sa_update(facts.model).where(*criteria).returning(facts.model),
        )

    core, orm = facts.statements(shape, build)
    params = _scope_params(scoping, _key_params(key, values))
    return Query(
        facts,
        shape,
        core,
        orm,
        params,
        "rows",
        write=True,
        options={**_WRITE_OPTIONS, "synchronize_session": False},
        column_keys=names,
    )


def update_where(
    facts: Facts,
    terms: Sequence[Term],
    sets: Mapping[str, Any],
    scoping: Scoping,
    *,
    key: Sequence[Any] | None = None,
) -> Query:
    """UPDATE of every row matching `terms` (and `key`, if given); a rowcount."""
    values = by_column(facts, sets)
    names = tuple(values)
    shape = ("update_where", _term_shape(terms), names, scoping.shape, key is not None)

    def build() -> tuple[Executable, Executable]:
        criteria = [*_term_criteria(facts, terms), *_scope_criteria(facts, scoping)]
        if key is not None:
            criteria = [*_key_criteria(facts), *criteria]
        statement = sa_update(facts.model).where(*criteria)
        return statement, statement

    core, orm = facts.statements(shape, build)
    params = _scope_params(scoping, _term_params(terms, values))
    if key is not None:
        _key_params(key, params)
    return Query(
        facts,
        shape,
        core,
        orm,
        params,
        "rowcount",
        write=True,
        options=_BULK_OPTIONS,
        column_keys=names,
    )


def delete(facts: Facts, key: Sequence[Any], scoping: Scoping) -> Query:
    """DELETE of the row with primary key `key`; a rowcount."""

    def build() -> tuple[Executable, Executable]:
        statement = sa_delete(facts.model).where(
            *_key_criteria(facts), *_scope_criteria(facts, scoping)
        )
        return statement, statement

    shape = ("delete", scoping.shape)
    core, orm = facts.statements(shape, build)
    params = _scope_params(scoping, _key_params(key, {}))
    return Query(
        facts, shape, core, orm, params, "rowcount", write=True, options=_BULK_OPTIONS
    )


def upsert(
    facts: Facts,
    dialect: str,
    values: Mapping[str, Any],
    target: Sequence[str],
    updates: Sequence[str],
) -> Query:
    """INSERT ... ON CONFLICT (`target`) DO UPDATE (`updates`), returning the row.

    On a tenant model the update only touches a row of the inserted row's
    tenant; a conflict with another tenant's row returns no row.
    """
    params = by_column(facts, insert_values(facts, values))
    names = tuple(params)
    shape = ("upsert", dialect, names, tuple(target), tuple(updates))

    def build() -> tuple[Executable, Executable]:
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

        def conflict(statement: Any) -> Any:
            excluded = statement.excluded
            sets: dict[Any, Any] = {
                facts.column[key]: excluded[facts.column[key].key] for key in updates
            }
            pk = facts.column[facts.pk[0]]
            where = None
            if facts.tenant:
                tenant = facts.column["tenant_id"]
                where = tenant == excluded[tenant.key]
            return statement.on_conflict_do_update(
                index_elements=[facts.column[key] for key in target],
                set_=sets or {pk: pk},
                where=where,
            )

        return (
            conflict(dialect_insert(facts.table)).returning(*facts.columns),
            conflict(dialect_insert(facts.model)).returning(facts.model),
        )

    core, orm = facts.statements(shape, build)
    return Query(
        facts,
        shape,
        core,
        orm,
        params,
        "rows",
        write=True,
        options=_WRITE_OPTIONS,
        column_keys=names,
        by_attribute=True,
    )
