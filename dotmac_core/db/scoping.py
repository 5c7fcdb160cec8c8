"""Tenant and soft-delete enforcement on every toolkit session.

Listeners on `ScopedSession` (the sync half of every toolkit `AsyncSession`):

- ORM SELECT, UPDATE and DELETE statements, relationship loads and
  `session.get` misses on a `TenantMixin` model get `tenant_id = <current>`;
  on a model with `deleted_at` they get `deleted_at IS NULL` unless the
  statement asks for deleted rows (`include_deleted` / `only_deleted`
  execution options).
- Flushes stamp new rows with the current tenant and refuse rows, changes or
  deletions that belong to another tenant; `updated_by` follows the acting user.
- A session is bound, for its whole life, to the tenant it first worked for
  (a `TransactionManager` binds it when it begins): using it under another
  tenant raises `TenantError`, because its identity map would otherwise hand
  back the other tenant's objects without any SQL.

With no tenant set, tenant-scoped work raises `TenantError` (fail closed)
unless the code runs inside `tenant_scope(None, bypass=True)`. Raw SQL text
and Core statements on a bare connection are not rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, Table, event, inspect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import ORMExecuteState, with_loader_criteria
from sqlalchemy.orm import Session as SASession
from sqlalchemy.sql import visitors
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Session
from sqlmodel.main import default_registry

from ..exceptions import TenantError, ValidationError
from ..tenancy import current_user_id, get_current_tenant, is_scoping_bypassed
from .models import TenantMixin

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

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
def _scope_statement(state: ORMExecuteState) -> None:
    if state.is_column_load:
        return  # loading more columns of a row this session already scoped
    options = state.execution_options
    if options.get(SCOPED) and not state.is_relationship_load:
        return  # built by the repository with the criteria inline
    models = _models_in(state)
    scope = current_scope()
    if any(is_tenant_model(model) for model in models):
        bind_session(state.session, scope)
    if state.is_insert:
        _stamp_insert(state, scope)
        return
    if not (state.is_select or state.is_update or state.is_delete):
        return
    include_deleted = bool(options.get(INCLUDE_DELETED))
    only_deleted = bool(options.get(ONLY_DELETED))
    criteria: list[Any] = []
    for model in models:
        criteria.extend(_criteria(model, scope, include_deleted, only_deleted))
    if criteria:
        state.statement = state.statement.options(*criteria)


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


def _stamp_insert(state: ORMExecuteState, scope: Scope) -> None:
    """Stamp or check `tenant_id` in an ORM INSERT run through the session."""
    model = state.bind_mapper.class_ if state.bind_mapper is not None else None
    if model is None or not is_tenant_model(model):
        return
    tenant = scope.require(f"inserting into {model.__name__}")
    params = state.parameters
    rows: list[dict[str, Any]] = (
        [params] if isinstance(params, dict) else list(params or [])  # type: ignore[arg-type]
    )
    for row in rows:
        given = row.get("tenant_id")
        if given is None and tenant is None:
            msg = f"rows of {model.__name__} need a tenant_id under a bypass"
            raise ValidationError(msg, field="tenant_id")
        if given is None:
            row["tenant_id"] = tenant
        elif tenant is not None and given != tenant:
            _refuse(model, given, tenant)
    if not rows:
        compiled = cast("Any", state.statement).compile()
        given_ids = {
            value
            for key, value in compiled.params.items()
            if key.startswith("tenant_id")
        }
        if not given_ids:
            msg = f"INSERT into {model.__name__} must set tenant_id"
            raise ValidationError(msg, field="tenant_id")
        for given in given_ids:
            if tenant is not None and given != tenant:
                _refuse(model, given, tenant)


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
        if tenant is not None and given != tenant:
            _refuse(model, given, tenant)


def _refuse(model: type[Any], given: object, tenant: str) -> None:
    msg = f"{model.__name__} row of tenant {given!r} refused under tenant {tenant!r}"
    raise TenantError(msg, details={"model": model.__name__})


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
    given = getattr(obj, "tenant_id", None)
    if tenant is not None and given != tenant:
        _refuse(model, given, tenant)
