"""The tenant checks of writes through a toolkit session (private).

`scoping.py` finds the statement or flush and the tenant model it writes;
the checks here decide whether its rows may be written under the scope:

- ORM INSERTs, row by row: a row naming another tenant, `None` or a SQL
  expression is refused, one naming none gets the current tenant (the
  column's default); INSERT ... FROM SELECT, ON CONFLICT DO UPDATE that
  could meet another tenant's row, and SQLite's INSERT OR REPLACE are
  refused outright.
- ORM UPDATEs may not set `tenant_id`.
- Flushed objects and the repository's new rows must belong to the current
  tenant, or, under a bypass, name a valid tenant id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import BindParameter
from sqlalchemy.dialects.postgresql.dml import OnConflictDoUpdate as PGDoUpdate
from sqlalchemy.dialects.sqlite.dml import OnConflictDoUpdate as SQLiteDoUpdate
from sqlalchemy.sql.elements import ClauseElement

from ..exceptions import TenantError, ValidationError
from ..tenancy import _check_id as check_tenant_id

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.orm import ORMExecuteState

    from .scoping import Scope

__all__ = [
    "check_insert",
    "check_new_rows",
    "check_row",
    "refuse_tenant_move",
]


def _key_name(key: object) -> object:
    """The column name a SET / VALUES key stands for (a str, or a column's key)."""
    return key if isinstance(key, str) else getattr(key, "key", None)


def _set_keys(state: ORMExecuteState) -> set[object]:
    """The columns an UPDATE sets: its `values()` and the execute parameters."""
    statement: Any = state.statement
    keys = {_key_name(key) for key in (statement._values or {})}
    ordered = getattr(statement, "_ordered_values", None) or ()  # SQLAlchemy 2.1
    keys.update(_key_name(key) for key, _ in ordered)
    params: Any = state.parameters
    for row in [params] if isinstance(params, dict) else list(params or []):
        keys.update(_key_name(key) for key in row)
    return keys


def refuse_tenant_move(state: ORMExecuteState, model: type[Any]) -> None:
    """Refuse an ORM UPDATE on `model` that sets `tenant_id`, under any scope."""
    if state.is_update and "tenant_id" in _set_keys(state):
        msg = f"tenant_id of a {model.__name__} row cannot change"
        raise TenantError(msg, details={"model": model.__name__})


def check_insert(
    state: ORMExecuteState, model: type[Any], table: Any, scope: Scope
) -> None:
    """Check (and stamp) `tenant_id` in an ORM INSERT into tenant `model`'s `table`.

    Rows that leave `tenant_id` out get the current tenant (the column's
    default); a row naming another tenant, `None`, or a SQL expression is
    refused, as are INSERT ... FROM SELECT, ON CONFLICT DO UPDATE that could
    meet another tenant's row, and SQLite's INSERT OR REPLACE.
    """
    tenant = scope.require(f"inserting into {model.__name__}")
    statement: Any = state.statement
    if tenant is not None:
        _refuse_risky_insert(statement, model, table, tenant)
    rows: list[Mapping[Any, Any]] = []
    if statement._values:
        rows.append(statement._values)
    for values in statement._multi_values or ():
        rows.extend(
            row if isinstance(row, Mapping) else dict(zip(table.c, row, strict=False))
            for row in values
        )
    params: Any = state.parameters
    given_rows = [params] if isinstance(params, dict) else list(params or [])
    if not given_rows and not rows and statement.select is None and tenant is None:
        rows.append({})  # no values at all: the column default would be used
    for row in [*rows, *given_rows]:
        _check_inserted(model, row, tenant)


def _refuse_risky_insert(
    statement: Any, model: type[Any], table: Any, tenant: str
) -> None:
    name = model.__name__
    problem = None
    if statement.select is not None:
        problem = "INSERT ... FROM SELECT cannot be checked for its rows' tenant"
    elif any("replace" in str(prefix).lower() for prefix, _ in statement._prefixes):
        problem = "INSERT OR REPLACE may delete another tenant's row"
    else:
        conflict = getattr(statement, "_post_values_clause", None)
        if isinstance(conflict, (PGDoUpdate, SQLiteDoUpdate)):
            problem = _conflict_problem(conflict, table)
    if problem is not None:
        msg = (
            f"{problem} ({name} under tenant {tenant!r}): use AsyncRepository "
            "create / upsert, or tenant_scope(None, bypass=True)"
        )
        raise TenantError(msg, details={"model": name})


def _conflict_problem(conflict: Any, table: Any) -> str | None:
    """Why an ON CONFLICT DO UPDATE could write another tenant's row, if it could."""
    sets = conflict.update_values_to_set
    pairs = sets.items() if isinstance(sets, Mapping) else sets
    if any(_key_name(key) == "tenant_id" for key, _ in pairs):
        return "ON CONFLICT DO UPDATE may not set tenant_id"
    target = conflict.inferred_target_elements
    names: set[object] = set()
    if target is not None:
        names = {_key_name(element) for element in target}
    elif getattr(conflict, "constraint_target", None) is not None:
        wanted = conflict.constraint_target
        for constraint in [*table.constraints, *table.indexes]:
            if constraint.name == wanted:
                names = {column.key for column in constraint.columns}
    if "tenant_id" not in names:
        return (
            "ON CONFLICT DO UPDATE on a key without tenant_id may update "
            "another tenant's row"
        )
    return None


def _check_inserted(
    model: type[Any], row: Mapping[Any, Any], tenant: str | None
) -> None:
    given: Any = _ABSENT
    for key, value in row.items():
        if _key_name(key) == "tenant_id":
            given = value
    if isinstance(given, BindParameter) and given.callable is None:
        given = given.value if not given.required else _EXPRESSION
    elif isinstance(given, ClauseElement):
        given = _EXPRESSION
    if tenant is None:
        if given is _ABSENT or given is None:
            msg = f"rows of {model.__name__} need a tenant_id under a bypass"
            raise ValidationError(msg, field="tenant_id")
        if given is not _EXPRESSION:
            check_tenant_id(given, "tenant_id")
        return
    if given is _ABSENT:
        return  # the column's default stamps the current tenant
    if given is _EXPRESSION:
        msg = (
            f"tenant_id of a {model.__name__} row set by a SQL expression cannot "
            "be checked: give the tenant id as a value, or leave it out"
        )
        raise TenantError(msg, details={"model": model.__name__})
    if not _same_tenant(given, tenant):
        _refuse(model, given, tenant)


_ABSENT = object()
_EXPRESSION = object()


def _same_tenant(given: object, tenant: str) -> bool:
    """Whether `given` is the tenant id `tenant`, by `str`'s own equality."""
    return isinstance(given, str) and str.__eq__(given, tenant) is True


def check_new_rows(
    model: type[Any], rows: Iterable[Mapping[str, Any]], scope: Scope
) -> None:
    """Refuse new rows of a tenant model that the scope may not write.

    Raises:
        TenantError: no tenant is set (and no bypass), or a row names another
            tenant than the current one.
        ValidationError: under a bypass, a row names no tenant.
    """
    tenant = scope.require(f"inserting into {model.__name__}")
    for row in rows:
        given = row.get("tenant_id")
        if given is None:
            msg = f"rows of {model.__name__} need a tenant_id under a bypass"
            raise ValidationError(msg, field="tenant_id")
        if tenant is None:
            check_tenant_id(given, "tenant_id")
        elif not _same_tenant(given, tenant):
            _refuse(model, given, tenant)


def check_row(model: type[Any], given: object, tenant: str | None, action: str) -> None:
    """Refuse a flushed object of `model` whose `tenant_id` the scope may not write.

    `tenant` is the scope's tenant (`None` under a bypass, where an inserted
    object must hold a valid tenant id of its own).
    """
    if tenant is None:
        if action == "insert":
            check_tenant_id(given, "tenant_id")
    elif not _same_tenant(given, tenant):
        _refuse(model, given, tenant)


def _refuse(model: type[Any], given: object, tenant: str) -> None:
    msg = f"{model.__name__} row of tenant {given!r} refused under tenant {tenant!r}"
    raise TenantError(msg, details={"model": model.__name__})
