"""The statement builder's writes: INSERT, UPDATE, DELETE, upsert (private).

The same rules as `_query.py`: one statement per shape, built once per model,
criteria from the same helpers, values as parameters. INSERT and UPDATE
values are named by column key, as SQLAlchemy names them for a statement
executed with a dict, so a default reading `context.get_current_parameters()`
sees the same names on every route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql, sqlite

from ._query import (
    Query,
    key_criteria,
    key_params,
    scope_criteria,
    scope_params,
    term_criteria,
    term_params,
    term_shape,
)
from .scoping import SCOPED

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping, Sequence

    from sqlalchemy.sql import Executable

    from ._facts import Facts, Scoping
    from .filters import Term

__all__ = [
    "by_column",
    "delete",
    "insert",
    "insert_params",
    "update",
    "update_where",
    "upsert",
]

_WRITE_OPTIONS = {"populate_existing": True, SCOPED: True}
_BULK_OPTIONS = {"synchronize_session": "fetch", SCOPED: True}


def insert_params(facts: Facts, values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters an INSERT names, by column key: SQLAlchemy's rule for `None`.

    As the ORM does, a `None` is "not given" (the column's server or Python
    default applies, or NULL), unless the column type turns `None` into a
    value of its own (JSON null).
    """
    keep = facts.none_is_value
    column = facts.column
    return {
        column[key].key: value
        for key in facts.keys
        if (value := values.get(key, _ABSENT)) is not _ABSENT
        and (value is not None or key in keep)
    }


_ABSENT = object()


def _row_insert(
    facts: Facts,
    shape: Hashable,
    build: Callable[[], tuple[Executable, Executable]],
    params: dict[str, Any],
) -> Query:
    """The query of an INSERT of one row (named by column key) returning it."""
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
        column_keys=tuple(params),
        by_attribute=True,
    )


def by_column(facts: Facts, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (by attribute) keyed by column key, in the table's order."""
    return {facts.column[key].key: values[key] for key in facts.keys if key in values}


def insert(facts: Facts, values: Mapping[str, Any]) -> Query:
    """INSERT of one row (`insert_params` applied) returning the stored row.

    The values are parameters named by column key, as SQLAlchemy names them
    for `insert(table)` executed with a dict: a default that reads
    `context.get_current_parameters()` sees the same names on every route.
    """
    params = insert_params(facts, values)
    names = tuple(params)
    shape = ("insert", names)

    def build() -> tuple[Executable, Executable]:
        return (
            sa_insert(facts.table).returning(*facts.columns),
            sa_insert(facts.model).returning(facts.model),
        )

    return _row_insert(facts, shape, build, params)


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
        criteria = [*key_criteria(facts), *scope_criteria(facts, scoping)]
        return (
            sa_update(facts.table).where(*criteria).returning(*facts.columns),
            sa_update(facts.model).where(*criteria).returning(facts.model),
        )

    core, orm = facts.statements(shape, build)
    params = scope_params(scoping, key_params(key, values))
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
    shape = ("update_where", term_shape(terms), names, scoping.shape, key is not None)

    def build() -> tuple[Executable, Executable]:
        criteria = [*term_criteria(facts, terms), *scope_criteria(facts, scoping)]
        if key is not None:
            criteria = [*key_criteria(facts), *criteria]
        statement = sa_update(facts.model).where(*criteria)
        return statement, statement

    core, orm = facts.statements(shape, build)
    params = scope_params(scoping, term_params(terms, values))
    if key is not None:
        key_params(key, params)
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
            *key_criteria(facts), *scope_criteria(facts, scoping)
        )
        return statement, statement

    shape = ("delete", scoping.shape)
    core, orm = facts.statements(shape, build)
    params = scope_params(scoping, key_params(key, {}))
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
    params = insert_params(facts, values)
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

    return _row_insert(facts, shape, build, params)
