"""Tenant and soft-delete enforcement on every toolkit session.

Listeners on `ScopedSession` (the sync half of every toolkit `AsyncSession`):

- ORM SELECT, UPDATE and DELETE statements, relationship loads and
  `session.get` misses on a `TenantMixin` model get `tenant_id = <current>`;
  on a model with `deleted_at` they get `deleted_at IS NULL` unless the
  statement asks for deleted rows (`include_deleted` / `only_deleted`
  execution options).
- Flushes stamp new rows with the current tenant and refuse rows, changes or
  deletions that belong to another tenant; `updated_by` follows the acting user.
- ORM INSERTs are checked row by row (a row naming another tenant, `None` or
  an expression is refused; one naming none gets the current tenant); ORM
  UPDATEs may not set `tenant_id` (these write checks are in
  `_scoping_writes.py`); UPDATE and DELETE carry the tenant in their own
  WHERE, which also reaches a bulk UPDATE by primary key.
- Core statements on a tenant model's `Table`, which loader criteria never
  reach, are refused under a tenant.
- A session is bound, for its whole life, to the tenant it first worked for
  (a `TransactionManager` binds it when it begins): using it under another
  tenant raises `TenantError`, because its identity map would otherwise hand
  back the other tenant's objects without any SQL.

With no tenant set, tenant-scoped work raises `TenantError` (fail closed)
unless the code runs inside `tenant_scope(None, bypass=True)`. Raw SQL text
and statements on a bare connection are not rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, Table, event, inspect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import ORMExecuteState, with_loader_criteria
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql import visitors
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Session
from sqlmodel.main import default_registry

from ..exceptions import TenantError
from ..tenancy import current_user_id, get_current_tenant, is_scoping_bypassed
from ._scoping_writes import check_insert, check_new_rows, check_row, refuse_tenant_move
from .models import TenantMixin

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from sqlalchemy.orm import UOWTransaction
    from sqlmodel import SQLModel

__all__ = [
    "INCLUDE_DELETED",
    "MODELS",
    "ONLY_DELETED",
    "SCOPED",
    "Scope",
    "ScopedSession",
    "check_new_rows",
    "current_scope",
    "has_soft_delete",
    "is_tenant_model",
    "scoping_listeners",
]

#: Execution option: the statement already carries tenant / soft-delete criteria.
SCOPED = "dotmac_scoped"
#: Execution option: also return soft-deleted rows.
INCLUDE_DELETED = "dotmac_include_deleted"
#: Execution option: return only soft-deleted rows.
ONLY_DELETED = "dotmac_only_deleted"
#: Execution option: the mapped classes the statement touches (saves a walk).
MODELS = "dotmac_models"

_BINDING = "dotmac_tenant_binding"


@dataclass(frozen=True, slots=True)
class Scope:
    """Who the current work is for: one tenant, or every tenant (bypass)."""

    tenant_id: str | None
    bypass: bool

    def require(self, what: str) -> str | None:
        """Return the tenant to filter by (`None` under bypass), or fail closed."""
        if self.tenant_id is None and not self.bypass:
            msg = (
                f"{what} needs a tenant: use tenant_scope(), or "
                "tenant_scope(None, bypass=True) for admin jobs"
            )
            raise TenantError(msg)
        return self.tenant_id


def current_scope() -> Scope:
    """Return the scope of the running code (a set tenant wins over a bypass)."""
    tenant = get_current_tenant()
    return Scope(tenant, bypass=tenant is None and is_scoping_bypassed())


def is_tenant_model(model: object) -> bool:
    """Return whether rows of `model` belong to a tenant (`TenantMixin`)."""
    return isinstance(model, type) and issubclass(model, TenantMixin)


_SOFT_DELETE: dict[type[Any], bool] = {}


def has_soft_delete(model: type[Any]) -> bool:
    """Return whether `model` is mapped with a `deleted_at` column."""
    known = _SOFT_DELETE.get(model)
    if known is None:
        mapper = inspect(model, raiseerr=False)
        known = _SOFT_DELETE[model] = (
            mapper is not None and "deleted_at" in mapper.columns
        )
    return known


def bind_session(session: SASession, scope: Scope) -> None:
    """Bind `session` to `scope`, or check that it was bound to the same one."""
    bound = session.info.setdefault(_BINDING, scope)
    if bound != scope:
        msg = (
            f"this session works for tenant {_describe(bound)} and cannot be used "
            f"for {_describe(scope)}: start a new session or TransactionManager"
        )
        raise TenantError(msg)


class ScopedSession(Session):
    """Sync session under every toolkit `AsyncSession`; the listeners attach here."""

    def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        """Return the row with primary key `ident`, checking the tenant binding.

        An identity-map hit emits no SQL, so the binding check is what keeps
        another tenant's cached object out of reach.
        """
        if is_tenant_model(entity):
            scope = current_scope()
            scope.require(f"loading {entity.__name__}")
            bind_session(self, scope)
        return super().get(entity, ident, **kwargs)


def _describe(scope: Scope) -> str:
    if scope.tenant_id is not None:
        return repr(scope.tenant_id)
    return "every tenant (bypass)" if scope.bypass else "no tenant"


class _Unindexed(FunctionElement[Any]):
    """A column that no index may serve on SQLite (`+column`); itself elsewhere.

    SQLite's planner takes the `deleted_at` index for `deleted_at IS NULL`
    once ANALYZE has run (its statistics average over all values, and the
    NULLs are nearly every row), scanning the whole table instead of the
    tenant's index: 90 times slower for a count of one tenant's rows.
    """

    inherit_cache = True
    name = "unindexed"


@compiles(_Unindexed)
def _compile_unindexed(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_Unindexed, "sqlite")
def _compile_unindexed_sqlite(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


def live(column: Any) -> ColumnElement[bool]:
    """The criterion for rows that are not soft-deleted (`deleted_at IS NULL`)."""
    return _Unindexed(column).is_(None)


def deleted_criterion(deleted_at: Any, *, only_deleted: bool) -> ColumnElement[bool]:
    """Soft-delete scoping on `deleted_at`: live rows, or only deleted ones.

    The one definition both ways of running a query use: the ORM's loader
    criteria and the driver path's compiled statements.
    """
    return deleted_at.is_not(None) if only_deleted else live(deleted_at)


def _criteria(
    model: type[Any], scope: Scope, include_deleted: bool, only_deleted: bool
) -> list[Any]:
    options: list[Any] = []
    if is_tenant_model(model):
        tenant = scope.require(f"querying {model.__name__}")
        if tenant is not None:
            options.append(
                with_loader_criteria(
                    model, lambda cls: cls.tenant_id == tenant, include_aliases=True
                )
            )
    if has_soft_delete(model) and (only_deleted or not include_deleted):
        criterion = _only_deleted if only_deleted else _not_deleted
        options.append(with_loader_criteria(model, criterion, include_aliases=True))
    return options


# Loader criteria callables are cached by their code: one function per case.
def _only_deleted(cls: Any) -> ColumnElement[bool]:
    return deleted_criterion(cls.deleted_at, only_deleted=True)


def _not_deleted(cls: Any) -> ColumnElement[bool]:
    return deleted_criterion(cls.deleted_at, only_deleted=False)


@event.listens_for(ScopedSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> Any:
    if state.is_column_load:
        return None  # loading more columns of a row this session already scoped
    options = state.execution_options
    if options.get(SCOPED) and not state.is_relationship_load:
        return None  # built by the repository with the criteria inline
    models = _models_in(state)
    scope = current_scope()
    tenant_models = [model for model in models if is_tenant_model(model)]
    if tenant_models:
        bind_session(state.session, scope)
        _refuse_unscoped(state, tenant_models, scope)
    if state.is_insert:
        target = _dml_target(state)
        if target is not None and is_tenant_model(target):
            table = _plain(cast("Any", state.statement).table)
            check_insert(state, target, table, scope)
        return None
    if not (state.is_select or state.is_update or state.is_delete):
        return None
    include_deleted = bool(options.get(INCLUDE_DELETED))
    only_deleted = bool(options.get(ONLY_DELETED))
    criteria: list[Any] = []
    for model in models:
        criteria.extend(_criteria(model, scope, include_deleted, only_deleted))
    if criteria:
        state.statement = state.statement.options(*criteria)
    if state.is_update or state.is_delete:
        target = _dml_target(state)
        if target is not None and is_tenant_model(target):
            return _scope_dml(state, target, scope, include_deleted, only_deleted)
    return None


def scoping_listeners() -> frozenset[Any]:
    """The session listeners this module installs (to tell them from users' own)."""
    return _LISTENERS


_LISTENERS: frozenset[Any] = frozenset({_scope_statement})

_TABLE_MODELS: dict[Any, list[type[Any]]] = {}
_MAPPERS_SEEN = 0


def _table_models(table: Any) -> list[type[Any]]:
    """Mapped classes whose table is `table` (rebuilt when new models appear)."""
    global _MAPPERS_SEEN
    mappers = default_registry.mappers
    if len(mappers) != _MAPPERS_SEEN:
        _TABLE_MODELS.clear()
        for mapper in mappers:
            for mapped_table in mapper.tables:
                _TABLE_MODELS.setdefault(mapped_table, []).append(mapper.class_)
        _MAPPERS_SEEN = len(mappers)
    return _TABLE_MODELS.get(table, [])


def _models_in(state: ORMExecuteState) -> list[type[Any]]:
    """Every mapped class the statement touches, in FROM lists and subqueries too.

    `ORMExecuteState.all_mappers` misses entities named only in `select_from()`
    or inside a subquery (`select(func.count()).select_from(Model)`), which
    would leave those reads unscoped; walking the statement finds them.
    """
    models = {mapper.class_ for mapper in state.all_mappers}
    declared = state.execution_options.get(MODELS)
    if declared is not None and not state.is_relationship_load:
        return list(models.union(declared))
    for element in visitors.iterate(cast("Any", state.statement)):
        if isinstance(element, Table):
            models.update(_table_models(element))
    return list(models)


def _refuse_unscoped(
    state: ORMExecuteState, models: Sequence[type[Any]], scope: Scope
) -> None:
    """Refuse a statement on tenant tables that the ORM's criteria cannot reach.

    SQLAlchemy applies loader criteria to ORM statements only: a Core
    statement on `Model.__table__` run through a session, and the inner
    statement of `select(Model).from_statement(...)`, would see, change or
    add every tenant's rows. Under a bypass they run as written.
    """
    if scope.bypass:
        return
    name = models[0].__name__
    scope.require(f"querying {name}")
    statement: Any = state.statement
    inner = statement.element if isinstance(statement, FromStatement) else None
    if state.is_orm_statement and not (
        inner is not None and _tables_of_tenant_models(inner)
    ):
        return
    msg = (
        f"a Core statement on the table of {name} cannot be scoped to the tenant "
        f"on a session: build it on the model (select({name}), update({name}), "
        f"insert({name}), ...), or run it under tenant_scope(None, bypass=True)"
    )
    raise TenantError(msg, details={"model": name})


def _tables_of_tenant_models(element: Any) -> bool:
    return any(
        isinstance(part, Table)
        and any(is_tenant_model(model) for model in _table_models(_plain(part)))
        for part in visitors.iterate(element)
    )


def _plain(table: Any) -> Any:
    """The table itself, without the ORM's annotations (`Model.__table__`)."""
    return table._deannotate() if getattr(table, "_annotations", None) else table


def _dml_target(state: ORMExecuteState) -> type[Any] | None:
    mapper = state.bind_mapper
    if mapper is not None:
        return mapper.class_
    table = getattr(state.statement, "table", None)
    found = _table_models(_plain(table)) if table is not None else []
    return found[0] if found else None


def _scope_dml(
    state: ORMExecuteState,
    model: type[Any],
    scope: Scope,
    include_deleted: bool,
    only_deleted: bool,
) -> Any:
    """Scope an UPDATE / DELETE on `model` in its own WHERE; refuse a tenant move.

    Loader criteria do not reach an ORM bulk UPDATE by primary key
    (`session.execute(update(Model), [rows])`), so the tenant criterion is
    written into the statement itself. SQLAlchemy then cannot synchronise
    the session's objects with such an UPDATE; the listener does it, for
    the objects of this tenant (the only ones this session can hold).
    """
    refuse_tenant_move(state, model)
    tenant = scope.require(f"changing {model.__name__}")
    statement: Any = state.statement
    table = statement.table
    where: list[Any] = []
    if tenant is not None:
        where.append(table.c.tenant_id == tenant)
    params: Any = state.parameters
    bulk = state.is_update and isinstance(params, list)
    if bulk and has_soft_delete(model) and (only_deleted or not include_deleted):
        where.append(deleted_criterion(table.c.deleted_at, only_deleted=only_deleted))
    if not where:
        return None
    state.statement = statement.where(*where)
    if not bulk:
        return None
    sync = state.execution_options.get("synchronize_session", "auto")
    result = state.invoke_statement(execution_options={"synchronize_session": None})
    if sync is not None and sync is not False:
        _synchronise(state.session, model, params, deleted=not include_deleted)
    return result


def _synchronise(
    session: SASession,
    model: type[Any],
    rows: Iterable[Mapping[str, Any]],
    *,
    deleted: bool,
) -> None:
    """Give the session's objects the values a bulk UPDATE by key wrote."""
    mapper = inspect(model)
    keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    for row in rows:
        if any(key not in row for key in keys):
            continue
        identity = identity_key(model, tuple(row[key] for key in keys))
        obj = session.identity_map.get(identity)
        if obj is None or (deleted and getattr(obj, "deleted_at", None) is not None):
            continue
        for key, value in row.items():
            if key not in keys and key in mapper.attrs:
                set_committed_value(obj, key, value)


@event.listens_for(ScopedSession, "before_flush")
def _scope_flush(session: SASession, _context: UOWTransaction, _instances: Any) -> None:
    scope: Scope | None = None
    user = current_user_id()
    for obj in session.new:
        if is_tenant_model(type(obj)):
            scope = scope or current_scope()
            _check_row(session, obj, scope, "insert")
    for obj in session.dirty:
        model = type(obj)
        if is_tenant_model(model):
            if inspect(obj).attrs.tenant_id.history.has_changes():
                msg = f"tenant_id of a {model.__name__} row cannot change"
                raise TenantError(msg)
            scope = scope or current_scope()
            _check_row(session, obj, scope, "update")
        if user is not None and hasattr(obj, "updated_by") and session.is_modified(obj):
            obj.updated_by = user
    for obj in session.deleted:
        if is_tenant_model(type(obj)):
            scope = scope or current_scope()
            _check_row(session, obj, scope, "delete")


def _check_row(session: SASession, obj: SQLModel, scope: Scope, action: str) -> None:
    model = type(obj)
    tenant = scope.require(f"{action} of {model.__name__}")
    bind_session(session, scope)
    check_row(model, getattr(obj, "tenant_id", None), tenant, action)
