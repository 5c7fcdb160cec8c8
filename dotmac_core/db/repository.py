"""`AsyncRepository[ModelT]`: typed data access for one model.

```python
class UserRepository(AsyncRepository[User]):
    async def find_by_email(self, email: str) -> User | None:
        return await self.get_by_field("email", email)
```

`UserRepository()` joins the transaction of the surrounding
`TransactionManager`, or runs each call on its own (one statement in
autocommit where the call is one statement, see `_fast.py`);
`UserRepository(session)` works on that session (and leaves committing to its
owner). Every call is scoped to the current tenant and hides soft-deleted rows
unless asked; every error it raises is a `DotMacError`.
"""

from __future__ import annotations

import asyncio
import builtins
from contextlib import asynccontextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    NamedTuple,
    TypeVar,
    cast,
    get_args,
    get_origin,
)

from pydantic_core import to_jsonable_python
from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    bindparam,
    false,
    func,
    inspect,
    or_,
    tuple_,
)
from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload
from sqlmodel import SQLModel, select

from ..exceptions import (
    AlreadyExistsError,
    NotFoundError,
    TenantError,
    ValidationError,
    translate_errors,
)
from ..tenancy import current_user_id
from ._fast import driver_for
from ._types import utc_now
from ._validation import (
    batch_allocation,
    detached_row,
    detached_rows,
    validated,
    validated_changes,
    validated_rows,
    validated_values,
)
from .database import Database, get_database
from .filters import (
    OrderBy,
    OrderSpec,
    Term,
    build_filters,
    coerce_value,
    parse_filters,
    parse_order_by,
)
from .pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    CursorPage,
    PaginationParams,
    PaginationResult,
    check_page,
    decode_cursor,
    encode_cursor,
)
from .scoping import (
    INCLUDE_DELETED,
    MODELS,
    ONLY_DELETED,
    SCOPED,
    Scope,
    bind_session,
    current_scope,
    deleted_criterion,
    has_soft_delete,
    is_tenant_model,
)
from .transaction import TransactionManager, current_transaction

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Callable,
        Hashable,
        Iterable,
        Mapping,
        Sequence,
    )

    from sqlalchemy.sql import ClauseElement

    from ..config import SecurityConfig
    from ._fast import ModelPlan
    from .session import AsyncSession

__all__ = ["AsyncRepository"]

ModelT = TypeVar("ModelT", bound=SQLModel)

_INT = Integer()
#: Parsed `order_by` strings per model (bounded: the strings come from callers).
_ORDERS: dict[tuple[type[Any], str], tuple[OrderSpec, ...]] = {}
_MAX_ORDERS = 1024


def _tuples(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> builtins.list[tuple[Any, ...]]:
    """The values of `rows` as tuples in `columns` order (for COPY)."""
    if len(columns) == 1:
        (only,) = columns
        return [(row[only],) for row in rows]
    take = itemgetter(*columns)
    return [take(row) for row in rows]


class _Via(NamedTuple):
    """Where a driver-path call runs: the pool (no session) or a session."""

    plan: ModelPlan
    session: AsyncSession | None


@dataclass(frozen=True, slots=True)
class _Where:
    """The shape of a driver-path WHERE clause; its values travel separately.

    `terms` holds `(name, op, flag)` per filter: `flag` is `True` for a bound
    value, `None` for a comparison with null, the boolean of `is_null`.
    """

    terms: tuple[tuple[str, str, Any], ...]
    tenant: bool
    deleted: str | None  # "live", "any", "only", or None without soft delete

    def clauses(self, plan: ModelPlan) -> builtins.list[ColumnElement[bool]]:
        """The criteria, with the parameter names `AsyncRepository._where` fills."""
        column = plan.column
        clauses: builtins.list[ColumnElement[bool]] = []
        for i, (name, op, flag) in enumerate(self.terms):
            col = column[name]
            if op == "is_null" or flag is None:
                clauses.append(Term(name, op, flag).clause(col))
            else:
                bound = bindparam(f"dotmac_f{i}", type_=col.type)
                clauses.append(Term(name, op, flag).clause(col, bound))
        if self.tenant:
            tenant = column["tenant_id"]
            clauses.append(tenant == bindparam("dotmac_tenant", type_=tenant.type))
        if self.deleted in ("live", "only"):
            only = self.deleted == "only"
            clauses.append(deleted_criterion(column["deleted_at"], only_deleted=only))
        return clauses


class AsyncRepository(Generic[ModelT]):
    """Async CRUD, filters and pagination for the model given as type parameter.

    Args:
        session: Work on this session instead of the ambient transaction.
        db: Database for calls outside a transaction (default: `get_database()`).
        security: Key for keyset cursors (default: `SecurityConfig()`).
    """

    model: ClassVar[type[Any]]
    _pk: ClassVar[Any]
    _columns: ClassVar[frozenset[str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, AsyncRepository):
                (arg,) = get_args(base)
                if isinstance(arg, type) and issubclass(arg, SQLModel):
                    mapper = inspect(arg, raiseerr=False)
                    if mapper is None:
                        msg = f"{arg.__name__} is not a table model (table=True)"
                        raise TypeError(msg)
                    # Worked out once per class: repositories are made per call.
                    cls.model = arg
                    (cls._pk,) = mapper.primary_key
                    cls._columns = frozenset(mapper.columns.keys())

    def __init__(
        self,
        session: AsyncSession | None = None,
        *,
        db: Database | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        if not hasattr(type(self), "model"):
            msg = (
                f"{type(self).__name__} has no model: subclass "
                "AsyncRepository[YourModel]"
            )
            raise TypeError(msg)
        self._session = session
        self._db = db
        self._security = security

    # --- sessions ------------------------------------------------------------

    @asynccontextmanager
    async def _use(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """The session to work on: given, ambient, or a short transaction of our own."""
        with translate_errors():
            if self._session is not None:
                yield self._session
                return
            ambient = current_transaction()
            if ambient is not None:
                yield ambient.session
                return
            db = self._db or get_database()
            if read_only:
                async with db.read_session() as session:
                    yield session
                return
            async with TransactionManager(db) as tx:
                yield tx.session

    def _check_only_deleted(self, only_deleted: bool) -> None:
        if only_deleted and not has_soft_delete(self.model):
            msg = f"{self.model.__name__} has no soft delete: only_deleted is invalid"
            raise ValidationError(msg, field="only_deleted")

    def _options(
        self, *, include_deleted: bool = False, only_deleted: bool = False
    ) -> dict[str, Any]:
        self._check_only_deleted(only_deleted)
        return {
            INCLUDE_DELETED: include_deleted,
            ONLY_DELETED: only_deleted,
            MODELS: (self.model,),
        }

    def _load(self, load: Iterable[str]) -> list[Any]:
        relationships = inspect(self.model).relationships
        options = []
        for name in load:
            if not isinstance(name, str) or name not in relationships:
                msg = f"{self.model.__name__} has no relationship {name!r} to load"
                raise ValidationError(msg, field=str(name)[:64])
            options.append(selectinload(getattr(self.model, name)))
        return options

    def _id(self, value: Any) -> Any:
        return coerce_value(self.model, self._pk.key, value)

    # --- the driver path (see _fast.py) --------------------------------------

    def _via(self, *, write: bool = False) -> _Via | None:
        """How this call may run on the driver, or `None` for the ORM way.

        Outside any transaction (PostgreSQL, SQLite files): on a pooled
        connection, one statement in autocommit. Reads on a session (given or
        ambient): on its connection, inside its transaction, once that has
        started.
        """
        session = self._session
        if session is None:
            ambient = current_transaction()
            if ambient is not None:
                session = ambient.session
        if session is None:
            driver = (self._db or get_database()).driver
            return None if driver is None else _Via(driver.plan(self.model), None)
        if write:
            return None
        driver = driver_for(session.sync_session)
        return None if driver is None else _Via(driver.plan(self.model), session)

    def _where(
        self,
        filters: Mapping[str, Any] | None,
        values: dict[str, Any],
        *,
        include_deleted: bool = False,
        only_deleted: bool = False,
    ) -> _Where | None:
        """Check `filters` and the scope into a `_Where`, filling `values`.

        `None` when a filter needs per-call SQL (`in` / `not_in` lists).
        """
        self._check_only_deleted(only_deleted)
        shape = []
        for i, term in enumerate(parse_filters(self.model, filters)):
            if term.op in ("in", "not_in"):
                return None
            if term.op == "is_null" or term.value is None:
                shape.append((term.name, term.op, term.value))
            else:
                values[f"dotmac_f{i}"] = term.value
                shape.append((term.name, term.op, True))
        tenant = False
        if is_tenant_model(self.model):
            scoped = current_scope().require(f"querying {self.model.__name__}")
            if scoped is not None:
                values["dotmac_tenant"] = scoped
                tenant = True
        deleted = None
        if has_soft_delete(self.model):
            deleted = "only" if only_deleted else "any" if include_deleted else "live"
        return _Where(tuple(shape), tenant, deleted)

    async def _records(
        self,
        via: _Via,
        key: Hashable,
        build: Callable[[], ClauseElement],
        values: Mapping[str, Any],
        *,
        names: Sequence[str] | None = None,
        rows: bool = True,
        retry: bool = True,
    ) -> builtins.list[Any] | None:
        """Run the statement `key` on the driver; `None` if it cannot run there."""
        plan = via.plan
        compiled = plan.statement(key, build, names)
        if compiled is None:
            return None
        with translate_errors():
            if via.session is None:
                return await plan.driver.run(compiled, values, rows=rows, retry=retry)
            session = via.session
            if is_tenant_model(self.model):
                bind_session(session.sync_session, current_scope())
            with session._in_use():
                return await plan.driver.run_in(session, compiled, values)

    def _rows(self, via: _Via, records: Sequence[Any]) -> builtins.list[ModelT]:
        """Model objects for `records`: detached, or the session's own."""
        if via.session is None:
            return [via.plan.row(record) for record in records]
        return via.plan.attach(via.session.sync_session, records)

    def _select_rows(
        self,
        plan: ModelPlan,
        where: _Where,
        order: Sequence[OrderSpec] = (),
        *,
        extra: Sequence[Any] = (),
        after: bool = False,
        limit: bool = False,
        offset: bool = False,
    ) -> ClauseElement:
        """SELECT of whole rows for the driver path (parameters named as `_where`)."""
        clauses = where.clauses(plan)
        columns = [*plan.selected]
        if extra:
            count = select(func.count()).select_from(plan.table).where(*clauses)
            columns.append(count.scalar_subquery().label("dotmac_total"))
        statement = select(*columns).where(*clauses)
        if after:
            bound = [
                bindparam(f"dotmac_k{i}", type_=plan.column[spec.name].type)
                for i, spec in enumerate(order)
            ]
            statement = statement.where(self._after(order, bound, plan.column))
        statement = statement.order_by(*self._order_clauses(order, plan.column))
        if limit:
            statement = statement.limit(bindparam("dotmac_limit", type_=_INT))
        if offset:
            statement = statement.offset(bindparam("dotmac_offset", type_=_INT))
        built: ClauseElement = statement
        return built

    # --- reads ---------------------------------------------------------------

    async def get_by_id(
        self, id: Any, *, load: Iterable[str] = (), include_deleted: bool = False
    ) -> ModelT | None:
        """Return the row with this primary key, or `None`."""
        key = self._id(id)
        via = None if load else self._via()
        if via is not None:
            plan = via.plan
            values: dict[str, Any] = {"dotmac_key": key}
            where = self._where(None, values, include_deleted=include_deleted)
            assert where is not None  # noqa: S101 - no filters, no lists
            records = await self._records(
                via, ("get", where), lambda: self._get_statement(plan, where), values
            )
            if records is not None:
                return self._rows(via, records[:1])[0] if records else None
        statement = (
            select(self.model)
            .where(self._pk == key)
            .options(*self._load(load))
            .execution_options(**self._options(include_deleted=include_deleted))
        )
        async with self._use(read_only=True) as session:
            return (await session.exec(statement)).first()

    def _get_statement(self, plan: ModelPlan, where: _Where) -> ClauseElement:
        pk = plan.column[self._pk.key]
        statement: ClauseElement = select(*plan.selected).where(
            pk == bindparam("dotmac_key", type_=pk.type), *where.clauses(plan)
        )
        return statement

    async def get_by_field(
        self, name: str, value: Any, *, load: Iterable[str] = ()
    ) -> ModelT | None:
        """Return the first row whose column `name` equals `value`, or `None`."""
        rows = await self.list({name: value}, limit=1, load=load)
        return rows[0] if rows else None

    async def get_one(self, **filters: Any) -> ModelT:
        """Return the one row matching `filters`.

        Raises:
            NotFoundError: no row matched.
            ValidationError: more than one row matched (the filters are not unique).
        """
        rows = await self.list(filters, limit=2)
        if not rows:
            msg = f"no {self.model.__name__} matches {sorted(filters)}"
            raise NotFoundError(msg, model=self.model.__name__, criteria=filters)
        if len(rows) > 1:
            msg = f"more than one {self.model.__name__} matches {sorted(filters)}"
            raise ValidationError(msg, field=",".join(sorted(filters)) or "filters")
        return rows[0]

    def _select(
        self,
        filters: Mapping[str, Any] | None,
        order: Sequence[OrderSpec],
        *,
        include_deleted: bool,
        only_deleted: bool,
    ) -> Any:
        statement = select(self.model).where(*build_filters(self.model, filters))
        statement = statement.order_by(*self._order_clauses(order))
        return statement.execution_options(
            **self._options(include_deleted=include_deleted, only_deleted=only_deleted)
        )

    def _order_clauses(
        self, order: Sequence[OrderSpec], columns: Mapping[str, Any] | None = None
    ) -> builtins.list[Any]:
        clauses = []
        for spec in order:
            column = (
                getattr(self.model, spec.name)
                if columns is None
                else columns[spec.name]
            )
            clauses.append(column.desc() if spec.descending else column.asc())
        return clauses

    def _total_order(self, order_by: OrderBy) -> builtins.list[OrderSpec]:
        """The requested order, ended by the primary key so rows never tie."""
        key = (self.model, order_by) if isinstance(order_by, str) else None
        known = _ORDERS.get(key) if key is not None else None
        if known is not None:
            return builtins.list(known)
        specs = parse_order_by(self.model, order_by)
        if not any(spec.name == self._pk.key for spec in specs):
            descending = specs[0].descending if specs else False
            specs.append(OrderSpec(self._pk.key, descending))
        if key is not None and len(_ORDERS) < _MAX_ORDERS:
            _ORDERS[key] = tuple(specs)  # one checked string, parsed once
        return specs

    async def list(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: OrderBy = None,
        limit: int | None = None,
        offset: int | None = None,
        load: Iterable[str] = (),
        include_deleted: bool = False,
        only_deleted: bool = False,
    ) -> builtins.list[ModelT]:
        """Return the rows matching `filters`, in `order_by` order (then by key)."""
        for name, value in (("limit", limit), ("offset", offset)):
            if value is not None and (not isinstance(value, int) or value < 0):
                msg = f"{name} must be an int >= 0, got {value!r}"
                raise ValidationError(msg, field=name)
        via = None if load else self._via()
        if via is not None:
            plan = via.plan
            values: dict[str, Any] = {}
            where = self._where(
                filters,
                values,
                include_deleted=include_deleted,
                only_deleted=only_deleted,
            )
            if where is not None:
                order = tuple(self._total_order(order_by))
                if limit is not None:
                    values["dotmac_limit"] = limit
                if offset:
                    values["dotmac_offset"] = offset
                records = await self._records(
                    via,
                    ("list", where, order, limit is not None, bool(offset)),
                    lambda: self._select_rows(
                        plan, where, order, limit=limit is not None, offset=bool(offset)
                    ),
                    values,
                )
                if records is not None:
                    return self._rows(via, records)
        statement = self._select(
            filters,
            self._total_order(order_by),
            include_deleted=include_deleted,
            only_deleted=only_deleted,
        ).options(*self._load(load))
        if limit is not None:
            statement = statement.limit(limit)
        if offset:
            statement = statement.offset(offset)
        async with self._use(read_only=True) as session:
            return builtins.list((await session.exec(statement)).all())

    async def count(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        include_deleted: bool = False,
        only_deleted: bool = False,
    ) -> int:
        """Return how many rows match `filters`."""
        via = self._via()
        if via is not None:
            values: dict[str, Any] = {}
            where = self._where(
                filters,
                values,
                include_deleted=include_deleted,
                only_deleted=only_deleted,
            )
            if where is not None:
                total = await self._driver_count(via, where, values)
                if total is not None:
                    return total
        async with self._use(read_only=True) as session:
            return await self._count(
                session,
                filters,
                include_deleted=include_deleted,
                only_deleted=only_deleted,
            )

    async def _driver_count(
        self, via: _Via, where: _Where, values: Mapping[str, Any]
    ) -> int | None:
        plan = via.plan
        records = await self._records(
            via,
            ("count", where),
            lambda: (
                select(func.count()).select_from(plan.table).where(*where.clauses(plan))
            ),
            values,
        )
        return None if records is None else int(records[0][0])

    async def _count(
        self,
        session: AsyncSession,
        filters: Mapping[str, Any] | None,
        *,
        include_deleted: bool,
        only_deleted: bool,
    ) -> int:
        statement = (
            select(func.count())
            .select_from(self.model)
            .where(*build_filters(self.model, filters))
            .execution_options(
                **self._options(
                    include_deleted=include_deleted, only_deleted=only_deleted
                )
            )
        )
        return int((await session.exec(statement)).one())

    async def exists(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        include_deleted: bool = False,
    ) -> bool:
        """Return whether any row matches `filters`."""
        statement = (
            select(self._pk)
            .where(*build_filters(self.model, filters))
            .limit(1)
            .execution_options(**self._options(include_deleted=include_deleted))
        )
        async with self._use(read_only=True) as session:
            return (await session.exec(statement)).first() is not None

    # --- writes --------------------------------------------------------------

    async def create(self, data: Mapping[str, Any] | ModelT) -> ModelT:
        """Validate `data`, insert it and return the new row.

        Raises:
            ValidationError: a field is unknown, missing or invalid.
            AlreadyExistsError: a unique key is taken.
            TenantError: the row belongs to another tenant, or none is set.
        """
        via = None if isinstance(data, self.model) else self._via(write=True)
        if via is not None and via.plan.plain_insert:
            plan = via.plan
            values = validated_values(self.model, data)
            self._check_tenant((values,))
            params = {f"dotmac_v_{key}": value for key, value in values.items()}
            done = await self._records(
                via,
                ("insert",),
                lambda: sa_insert(plan.table).values(
                    {
                        plan.column[key]: bindparam(
                            f"dotmac_v_{key}", type_=plan.column[key].type
                        )
                        for key in plan.keys
                    }
                ),
                params,
                names=tuple(params),
                rows=False,
                retry=False,
            )
            if done is not None:
                created: ModelT = detached_row(self.model, values)
                return created
        row: ModelT = validated(self.model, data)
        async with self._use() as session:
            session.add(row)
            await session.flush()
        return row

    def _check_tenant(self, rows: Iterable[Mapping[str, Any]]) -> Scope | None:
        """Refuse new rows of another tenant; return the scope (tenant models)."""
        if not is_tenant_model(self.model):
            return None
        scope = current_scope()
        tenant = scope.require(f"inserting into {self.model.__name__}")
        for row in rows:
            if tenant is not None and row["tenant_id"] != tenant:
                msg = f"{self.model.__name__} row of another tenant refused"
                raise TenantError(msg)
        return scope

    async def create_many(
        self, items: Iterable[Mapping[str, Any] | ModelT]
    ) -> builtins.list[ModelT]:
        """Validate and insert many rows in one bulk statement; return them.

        PostgreSQL receives the rows through COPY, SQLite through one
        executemany: no per-row round trip and no unit-of-work bookkeeping.
        The returned objects are detached, ready to be added to a session for
        later changes.
        """
        rows = validated_rows(self.model, items)
        if not rows:
            return []
        table = self.model.__table__
        columns = [column.key for column in table.columns]
        via = self._via(write=True)
        if via is not None and via.plan.dialect.name == "postgresql":
            # One COPY in autocommit: atomic on its own, no BEGIN / COMMIT.
            self._check_tenant(rows)
            records = _tuples(rows, columns)
            copy = asyncio.ensure_future(
                via.plan.driver.use(
                    lambda driver: driver.copy_records_to_table(
                        table.name,
                        schema_name=table.schema,
                        columns=columns,
                        records=records,
                    )
                )
            )
            try:
                # The objects are built while the server ingests the rows:
                # the COPY's own Python work runs first (the task starts at
                # the first await), then this fills the wait for the server.
                await asyncio.sleep(0)
                with batch_allocation():
                    made = detached_rows(self.model, rows)
                with translate_errors():
                    await copy
            finally:
                copy.cancel()  # a no-op once done; stops it if we were cancelled
            return made
        async with self._use() as session:
            scope = self._check_tenant(rows)
            if scope is not None:
                bind_session(session.sync_session, scope)
            connection = await session.connection()
            if connection.dialect.name == "postgresql":
                raw = await connection.get_raw_connection()
                await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                    table.name,
                    schema_name=table.schema,
                    columns=columns,
                    records=_tuples(rows, columns),
                )
            else:
                await session.exec(sa_insert(table), params=rows)
        with batch_allocation():
            return detached_rows(self.model, rows)

    async def update(self, id: Any, data: Mapping[str, Any]) -> ModelT:
        """Apply the changes in `data` to the row with this key; return it.

        Raises:
            NotFoundError: no such row (for this tenant).
            ValidationError: a field is unknown, protected or invalid.
        """
        changes = validated_changes(self.model, data)
        via = self._via(write=True) if changes else None
        on_update = None if via is None else via.plan.on_update
        if via is not None and on_update is not None:
            plan = via.plan
            values: dict[str, Any] = {"dotmac_key": self._id(id)}
            where = self._where(None, values)
            assert where is not None  # noqa: S101 - no filters, no lists
            sets = dict(changes)
            for name, make in on_update.items():
                sets.setdefault(name, make())
            user = current_user_id()
            if user is not None and "updated_by" in self._columns:
                sets["updated_by"] = user
            for name, value in sets.items():
                values[f"dotmac_s_{name}"] = value
            names = tuple(sets)
            records = await self._records(
                via,
                ("update", where, names),
                lambda: self._update_statement(plan, where, names),
                values,
                names=tuple(values),
                retry=False,
            )
            if records is not None:
                if not records:
                    raise self._not_found(id)
                updated: ModelT = self._rows(via, records[:1])[0]
                return updated
        async with self._use() as session:
            row = (
                await session.exec(
                    select(self.model)
                    .where(self._pk == self._id(id))
                    .execution_options(**self._options())
                )
            ).first()
            if row is None:
                raise self._not_found(id)
            for name, value in changes.items():
                setattr(row, name, value)
            await session.flush()
            changed: ModelT = row
            return changed

    def _update_statement(
        self, plan: ModelPlan, where: _Where, names: Sequence[str]
    ) -> ClauseElement:
        pk = plan.column[self._pk.key]
        sets = {
            plan.column[name]: bindparam(
                f"dotmac_s_{name}", type_=plan.column[name].type
            )
            for name in names
        }
        statement: ClauseElement = (
            sa_update(plan.table)
            .where(pk == bindparam("dotmac_key", type_=pk.type), *where.clauses(plan))
            .values(sets)
            .returning(*plan.selected)
        )
        return statement

    async def update_many(
        self, filters: Mapping[str, Any] | None, data: Mapping[str, Any]
    ) -> int:
        """Apply `data` to every row matching `filters`; return how many changed."""
        changes = validated_changes(self.model, data)
        if not changes:
            return 0
        user = current_user_id()
        if user is not None and "updated_by" in self._columns:
            changes["updated_by"] = user
        statement = (
            sa_update(self.model)
            .where(*build_filters(self.model, filters))
            .values(**changes)
            .execution_options(synchronize_session="fetch", **self._options())
        )
        async with self._use() as session:
            result = await session.exec(statement)
            return int(result.rowcount)

    async def delete(self, id: Any, *, hard: bool = False) -> bool:
        """Delete the row with this key; soft (`deleted_at`) where the model has it.

        Returns:
            Whether a row was deleted.
        """
        key = self._id(id)
        if hard or not has_soft_delete(self.model):
            statement: Any = (
                sa_delete(self.model)
                .where(self._pk == key)
                .execution_options(
                    synchronize_session="fetch", **self._options(include_deleted=True)
                )
            )
        else:
            statement = (
                sa_update(self.model)
                .where(self._pk == key)
                .values(deleted_at=utc_now())
                .execution_options(synchronize_session="fetch", **self._options())
            )
        async with self._use() as session:
            result = await session.exec(statement)
            return bool(result.rowcount)

    async def restore(self, id: Any) -> ModelT:
        """Undo a soft delete and return the row.

        Raises:
            NotFoundError: no soft-deleted row with this key (for this tenant).
            ValidationError: the model has no soft delete.
        """
        if not has_soft_delete(self.model):
            msg = f"{self.model.__name__} has no soft delete: nothing to restore"
            raise ValidationError(msg, field="id")
        key = self._id(id)
        statement = (
            sa_update(self.model)
            .where(self._pk == key)
            .values(deleted_at=None)
            .execution_options(
                synchronize_session="fetch", **self._options(only_deleted=True)
            )
        )
        async with self._use() as session:
            result = await session.exec(statement)
            if not result.rowcount:
                raise self._not_found(id)
            row = (
                await session.exec(select(self.model).where(self._pk == key))
            ).first()
            assert row is not None  # noqa: S101 - restored just now
            restored: ModelT = row
            return restored

    async def upsert(
        self, data: Mapping[str, Any] | ModelT, conflict_on: Sequence[str] = ("id",)
    ) -> ModelT:
        """Insert the row, or update the one with the same `conflict_on` key; atomic.

        One `INSERT ... ON CONFLICT ... DO UPDATE ... RETURNING` statement on
        both databases. On a tenant model the update only touches a row of
        the current tenant, and `tenant_id` joins the conflict key when a unique
        constraint includes it.

        Raises:
            ValidationError: invalid data, or no unique constraint on `conflict_on`.
            AlreadyExistsError: the key is taken by another tenant's row.
        """
        row = validated(self.model, data)
        target = self._conflict_target(conflict_on)
        values = {key: getattr(row, key) for key in self._columns}
        keep = {
            self._pk.key,
            "created_at",
            "created_by",
            "updated_by",
            "tenant_id",
            *target,
        }
        # An existing row changes only in the fields the caller gave (all of
        # them for a model object); omitted fields keep their stored values.
        given: frozenset[str] = (
            self._columns
            if isinstance(data, self.model)
            else frozenset(cast("Mapping[str, Any]", data))
        )
        updates: dict[str, Any] = {
            key: values[key] for key in given if key in values and key not in keep
        }
        if "updated_at" in self._columns:
            updates["updated_at"] = utc_now()
        user = current_user_id()
        if user is not None and "updated_by" in self._columns:
            updates["updated_by"] = user
        async with self._use() as session:
            scope = current_scope()
            where = None
            if is_tenant_model(self.model):
                tenant = scope.require(f"upsert of {self.model.__name__}")
                bind_session(session.sync_session, scope)
                if tenant is not None and values["tenant_id"] != tenant:
                    msg = f"{self.model.__name__} row of another tenant refused"
                    raise TenantError(msg)
                where = self.model.tenant_id == values["tenant_id"]
            is_pg = (
                session.bind is not None and session.bind.dialect.name == "postgresql"
            )
            dialect_insert = postgresql.insert if is_pg else sqlite.insert
            statement = (
                dialect_insert(self.model)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=list(target),
                    set_=updates or {self._pk.key: self._pk},
                    where=where,
                )
                .returning(self.model)
                .execution_options(populate_existing=True, **{SCOPED: True})
            )
            upserted: ModelT | None = (await session.exec(statement)).scalars().first()
            if upserted is None:
                msg = f"{self.model.__name__} key {list(target)} is taken"
                raise AlreadyExistsError(msg, constraint=",".join(target))
            return upserted

    def _conflict_target(self, conflict_on: Sequence[str]) -> tuple[str, ...]:
        if isinstance(conflict_on, str) or not conflict_on:
            msg = "conflict_on must be a non-empty list of column names"
            raise ValidationError(msg, field="conflict_on")
        for name in conflict_on:
            if name not in self._columns:
                msg = f"{self.model.__name__} has no column {name!r}"
                raise ValidationError(msg, field="conflict_on")
        table = self.model.__table__
        unique_sets = [frozenset(c.key for c in table.primary_key.columns)]
        unique_sets += [
            frozenset(c.key for c in constraint.columns)
            for constraint in table.constraints
            if constraint.__class__.__name__ == "UniqueConstraint"
        ]
        unique_sets += [
            frozenset(c.key for c in index.columns)
            for index in table.indexes
            if index.unique
        ]
        wanted = frozenset(conflict_on)
        if is_tenant_model(self.model) and wanted | {"tenant_id"} in unique_sets:
            return (*conflict_on, *(() if "tenant_id" in wanted else ("tenant_id",)))
        if wanted in unique_sets:
            return tuple(conflict_on)
        msg = f"{self.model.__name__} has no unique constraint on {sorted(wanted)}"
        raise ValidationError(msg, field="conflict_on")

    def _not_found(self, id: Any) -> NotFoundError:
        name = self.model.__name__
        return NotFoundError(
            f"{name} {id} not found", model=name, criteria={self._pk.key: str(id)}
        )

    # --- pages ---------------------------------------------------------------

    async def list_paginated(
        self,
        page: int = 1,
        size: int = DEFAULT_PAGE_SIZE,
        *,
        per_page: int | None = None,
        order_by: OrderBy = "created_at",
        filters: Mapping[str, Any] | None = None,
        with_total: bool = True,
        include_deleted: bool = False,
    ) -> PaginationResult[ModelT]:
        """Return one offset page; `with_total=False` skips the COUNT query.

        Raises:
            ValidationError: page below 1, size outside 1..100, bad filters or order.
        """
        if per_page is not None:
            size = per_page
        check_page(page, size, MAX_PAGE_SIZE)
        offset = (page - 1) * size
        via = self._via()
        if via is not None:
            plan = via.plan
            values: dict[str, Any] = {"dotmac_limit": size + 1, "dotmac_offset": offset}
            where = self._where(filters, values, include_deleted=include_deleted)
            if where is not None:
                order = tuple(self._total_order(order_by))
                # The total rides in the same statement, as a scalar subquery
                # PostgreSQL evaluates once: one round trip for page and count.
                records = await self._records(
                    via,
                    ("page", where, order, with_total),
                    lambda: self._select_rows(
                        plan,
                        where,
                        order,
                        extra=("total",) if with_total else (),
                        limit=True,
                        offset=True,
                    ),
                    values,
                )
                if records is not None:
                    total = None
                    if with_total:
                        if records:
                            total = int(records[0][-1])
                        elif offset == 0:
                            total = 0
                        else:  # past the end: no row carried the total
                            total = await self._driver_count(via, where, values)
                    return PaginationResult[ModelT].build(
                        self._rows(via, records[:size]),
                        page=page,
                        size=size,
                        total=total,
                        more=len(records) > size,
                    )
        statement = self._select(
            filters,
            self._total_order(order_by),
            include_deleted=include_deleted,
            only_deleted=False,
        )
        statement = statement.offset(offset).limit(size + 1)
        async with self._use(read_only=True) as session:
            rows = builtins.list((await session.exec(statement)).all())
            total = None
            if with_total:
                total = await self._count(
                    session,
                    filters,
                    include_deleted=include_deleted,
                    only_deleted=False,
                )
        return PaginationResult[ModelT].build(
            rows[:size], page=page, size=size, total=total, more=len(rows) > size
        )

    async def paginate(
        self,
        params: PaginationParams,
        *,
        order_by: OrderBy = "created_at",
        filters: Mapping[str, Any] | None = None,
        with_total: bool = True,
    ) -> PaginationResult[ModelT]:
        """Return the page `params` asks for (see `list_paginated`)."""
        return await self.list_paginated(
            params.page,
            params.size,
            order_by=order_by,
            filters=filters,
            with_total=with_total,
        )

    async def list_after(
        self,
        cursor: str | None = None,
        size: int = DEFAULT_PAGE_SIZE,
        *,
        order_by: OrderBy = "created_at",
        filters: Mapping[str, Any] | None = None,
    ) -> CursorPage[ModelT]:
        """Return the keyset page after `cursor` (the first page without one).

        The order always ends with the primary key, so rows with equal sort
        values are neither skipped nor repeated; sort columns must be NOT NULL.

        Raises:
            ValidationError: a tampered, foreign or malformed cursor; a bad size,
                order or filter.
        """
        check_page(1, size, MAX_PAGE_SIZE)
        order = self._total_order(order_by)
        table = self.model.__table__
        for spec in order:
            if table.c[spec.name].nullable:
                msg = f"keyset order needs NOT NULL columns; {spec.name!r} is nullable"
                raise ValidationError(msg, field="order_by")
        binding = f"{table.name}|{','.join(str(spec) for spec in order)}"
        position = None
        if cursor is not None:
            raw = decode_cursor(cursor, binding, self._security)
            if len(raw) != len(order):
                msg = "invalid cursor"
                raise ValidationError(msg, field="cursor")
            position = [
                coerce_value(self.model, spec.name, value)
                for spec, value in zip(order, raw, strict=True)
            ]
        rows, more = await self._keyset_rows(filters, order, position, size)
        next_cursor = None
        if more:
            last = rows[-1]
            position = [to_jsonable_python(getattr(last, spec.name)) for spec in order]
            next_cursor = encode_cursor(binding, position, self._security)
        return CursorPage[ModelT].model_construct(
            items=rows, next_cursor=next_cursor, size=size
        )

    async def _keyset_rows(
        self,
        filters: Mapping[str, Any] | None,
        order: Sequence[OrderSpec],
        position: Sequence[Any] | None,
        size: int,
    ) -> tuple[builtins.list[ModelT], bool]:
        """Up to `size` rows after `position`, and whether more follow."""
        via = self._via()
        if via is not None:
            plan = via.plan
            values: dict[str, Any] = {"dotmac_limit": size + 1}
            where = self._where(filters, values)
            if where is not None:
                after = position is not None
                for i, value in enumerate(position or ()):
                    values[f"dotmac_k{i}"] = value
                records = await self._records(
                    via,
                    ("after", where, tuple(order), after),
                    lambda: self._select_rows(
                        plan, where, order, after=after, limit=True
                    ),
                    values,
                )
                if records is not None:
                    # The extra row only says that more follow: no object.
                    return self._rows(via, records[:size]), len(records) > size
        statement = self._select(
            filters, order, include_deleted=False, only_deleted=False
        )
        if position is not None:
            statement = statement.where(self._after(order, position))
        async with self._use(read_only=True) as session:
            rows = builtins.list((await session.exec(statement.limit(size + 1))).all())
        return rows[:size], len(rows) > size

    def _after(
        self,
        order: Sequence[OrderSpec],
        values: Sequence[Any],
        mapped: Mapping[str, Any] | None = None,
    ) -> ColumnElement[bool]:
        columns = [
            getattr(self.model, spec.name) if mapped is None else mapped[spec.name]
            for spec in order
        ]
        directions = {spec.descending for spec in order}
        if len(directions) == 1:
            # One direction: a row-value comparison the index can range-scan.
            left, right = tuple_(*columns), tuple_(*values)
            return left < right if order[0].descending else left > right
        terms: builtins.list[ColumnElement[bool]] = []
        for i, spec in enumerate(order):
            equal = [columns[j] == values[j] for j in range(i)]
            step = columns[i] < values[i] if spec.descending else columns[i] > values[i]
            terms.append(and_(*equal, step))
        return or_(*terms) if terms else false()
