"""`AsyncRepository[ModelT]`: typed data access for one model.

```python
class UserRepository(AsyncRepository[User]):
    async def find_by_email(self, email: str) -> User | None:
        return await self.get_by_field("email", email)
```

`UserRepository()` joins the transaction of the surrounding
`TransactionManager`, or runs each call on its own; `UserRepository(session)`
works on that session (and leaves committing to its owner). Every call is
scoped to the current tenant and hides soft-deleted rows unless asked; every
error it raises is a `DotMacError`.

Each method validates its input, asks the statement builder (`_query.py`) for
one query and hands it to the executor (`_executor.py`), which decides how it
runs; this module only shapes the results.
"""

from __future__ import annotations

import builtins
import functools
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from sqlalchemy import inspect
from sqlmodel import SQLModel

from ..exceptions import AlreadyExistsError, NotFoundError, ValidationError
from . import _bulk, _executor, _rows
from . import _query as build
from . import _writes as writes
from ._facts import facts_of
from ._types import utc_now
from ._validation import (
    check_bounds,
    conflict_target,
    key_values,
    keyset_order,
    relationships,
    scoping_for,
    total_order,
    upsert_updates,
    validated_changes,
    validated_rows,
    validated_values,
)
from .database import Database, get_database
from .filters import OrderBy, parse_filters
from .pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    CursorPage,
    PaginationParams,
    PaginationResult,
    check_page,
    cursor_adapter,
    cursor_position,
    encode_cursor,
)
from .scoping import check_new_rows, current_scope

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from ..config import SecurityConfig
    from ._facts import Facts, Scoping
    from ._query import Query
    from .session import AsyncSession

__all__ = ["AsyncRepository"]

ModelT = TypeVar("ModelT", bound=SQLModel)


class AsyncRepository(Generic[ModelT]):
    """Async CRUD, filters and pagination for the model given as type parameter.

    Args:
        session: Work on this session instead of the ambient transaction.
        db: Database for calls outside a transaction (default: `get_database()`).
        security: Key for keyset cursors (default: `SecurityConfig()`).
    """

    model: ClassVar[type[Any]]
    _facts: ClassVar[Facts]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, AsyncRepository):
                (arg,) = get_args(base)
                if isinstance(arg, type) and issubclass(arg, SQLModel):
                    if inspect(arg, raiseerr=False) is None:
                        msg = f"{arg.__name__} is not a table model (table=True)"
                        raise TypeError(msg)
                    cls.model = arg

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
        # The checks call it only for a value whose fate depends on the
        # database (a NaN), so the hot path pays nothing for the lookup.
        self._dialect = functools.partial(_executor.dialect_of, session, db)
        # Looked up here, not at class definition: relationships may name
        # classes defined later.
        self._f: Facts = facts_of(self.model)

    # --- input ---------------------------------------------------------------

    def _scoping(
        self, what: str, *, include_deleted: bool = False, only_deleted: bool = False
    ) -> Scoping:
        return scoping_for(
            self._f, what, include_deleted=include_deleted, only_deleted=only_deleted
        )

    def _context(self) -> dict[str, Any]:
        return {"session": self._session, "db": self._db}

    def _not_found(self, id: Any) -> NotFoundError:
        name = self.model.__name__
        return NotFoundError(
            f"{name} {id} not found", model=name, criteria={"id": str(id)}
        )

    # --- reads ---------------------------------------------------------------

    async def _rows(self, query: Query) -> builtins.list[ModelT]:
        objects = (await _executor.rows(query, **self._context())).objects
        if query.write and self._f.float_keys and self._dialect() == "sqlite":
            _rows.floats_as_read(self._f, objects)
        return objects

    async def get_by_id(
        self, id: Any, *, load: Iterable[str] = (), include_deleted: bool = False
    ) -> ModelT | None:
        """Return the row with this primary key, or `None`."""
        scoping = self._scoping("loading", include_deleted=include_deleted)
        key = key_values(self._f, id, self._dialect)
        query = build.get(self._f, key, scoping, load=relationships(self._f, load))
        rows = await self._rows(query)
        return rows[0] if rows else None

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
        check_bounds(limit=limit, offset=offset)
        query = build.rows(
            self._f,
            parse_filters(self.model, filters, self._dialect),
            self._scoping(
                "querying", include_deleted=include_deleted, only_deleted=only_deleted
            ),
            total_order(self._f, order_by),
            limit=limit,
            offset=offset,
            load=relationships(self._f, load),
        )
        return await self._rows(query)

    async def count(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        include_deleted: bool = False,
        only_deleted: bool = False,
    ) -> int:
        """Return how many rows match `filters`."""
        query = build.count(
            self._f,
            parse_filters(self.model, filters, self._dialect),
            self._scoping(
                "querying", include_deleted=include_deleted, only_deleted=only_deleted
            ),
        )
        return int(await _executor.scalar(query, **self._context()))

    async def exists(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        include_deleted: bool = False,
    ) -> bool:
        """Return whether any row matches `filters`."""
        query = build.exists(
            self._f,
            parse_filters(self.model, filters, self._dialect),
            self._scoping("querying", include_deleted=include_deleted),
        )
        return await _executor.scalar(query, **self._context()) is not None

    # --- writes --------------------------------------------------------------

    def _check_new(self, rows: Iterable[Mapping[str, Any]]) -> None:
        if self._f.tenant:
            check_new_rows(self.model, rows, current_scope())

    async def create(self, data: Mapping[str, Any] | ModelT) -> ModelT:
        """Validate `data`, insert it and return the row as stored.

        Given a model instance, that object is returned, holding the stored row.

        Raises:
            ValidationError: a field is unknown, missing or invalid.
            AlreadyExistsError: a unique key is taken.
            TenantError: the row belongs to another tenant, or none is set.
        """
        values = validated_values(self.model, data, self._dialect)
        self._check_new((values,))
        (row,) = await self._rows(writes.insert(self._f, values))
        if isinstance(data, self.model):
            return _rows.adopt(self._f, data, row)  # type: ignore[no-any-return]
        return row

    async def create_many(
        self, items: Iterable[Mapping[str, Any] | ModelT]
    ) -> builtins.list[ModelT]:
        """Validate and insert many rows in one bulk write; return them.

        The returned objects are detached and hold the rows as written (see
        `_bulk.py`): one `COPY` on PostgreSQL where it can be, else
        SQLAlchemy's batched bulk INSERT.
        """
        rows = validated_rows(self.model, items, self._dialect)
        if not rows:
            return []
        self._check_new(rows)
        made: builtins.list[ModelT] = await _bulk.write(
            self._f, rows, session=self._session, db=self._db or get_database()
        )
        return made

    async def update(self, id: Any, data: Mapping[str, Any]) -> ModelT:
        """Apply the changes in `data` to the row with this key; return it as stored.

        One `UPDATE ... RETURNING`, which always moves `updated_at`; empty
        `data` writes nothing and returns the row.

        Raises:
            NotFoundError: no such row (for this tenant).
            ValidationError: a field is unknown, protected or invalid.
        """
        changes = validated_changes(self._f, data, self._dialect)
        if not changes:
            row = await self.get_by_id(id)
            if row is None:
                raise self._not_found(id)
            return row
        key = key_values(self._f, id, self._dialect)
        rows = await self._rows(
            writes.update(self._f, key, changes, self._scoping("update of"))
        )
        if not rows:
            raise self._not_found(id)
        return rows[0]

    async def update_many(
        self, filters: Mapping[str, Any] | None, data: Mapping[str, Any]
    ) -> int:
        """Apply `data` to every row matching `filters`; return how many changed."""
        changes = validated_changes(self._f, data, self._dialect)
        if not changes:
            return 0
        terms = parse_filters(self.model, filters, self._dialect)
        query = writes.update_where(self._f, terms, changes, self._scoping("update of"))
        return await _executor.rowcount(query, **self._context())

    async def delete(self, id: Any, *, hard: bool = False) -> bool:
        """Delete the row with this key; soft (`deleted_at`) where the model has it.

        A hard delete of a row with relationships runs as `session.delete()`
        would: the relationships' cascade and passive-delete settings apply.

        Returns:
            Whether a row was deleted.
        """
        key = key_values(self._f, id, self._dialect)
        if not hard and self._f.soft_delete:
            query = writes.update_where(
                self._f,
                [],
                {"deleted_at": utc_now()},
                self._scoping("delete of"),
                key=key,
            )
            return bool(await _executor.rowcount(query, **self._context()))
        scoping = self._scoping("delete of", include_deleted=True)
        if _executor.cascades(self._f):
            return await _executor.delete_as_session_does(
                build.get(self._f, key, scoping), **self._context()
            )
        query = writes.delete(self._f, key, scoping)
        return bool(await _executor.rowcount(query, **self._context()))

    async def restore(self, id: Any) -> ModelT:
        """Undo a soft delete and return the row as stored.

        Raises:
            NotFoundError: no soft-deleted row with this key (for this tenant).
            ValidationError: the model has no soft delete.
        """
        if not self._f.soft_delete:
            msg = f"{self.model.__name__} has no soft delete: nothing to restore"
            raise ValidationError(msg, field="id")
        scoping = self._scoping("restore of", only_deleted=True)
        key = key_values(self._f, id, self._dialect)
        query = writes.update(self._f, key, {"deleted_at": None}, scoping)
        rows = await self._rows(query)
        if not rows:
            raise self._not_found(id)
        return rows[0]

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
        facts = self._f
        values = validated_values(self.model, data, self._dialect)
        target = conflict_target(facts, conflict_on)
        self._check_new((values,))
        updates = upsert_updates(facts, data, target)
        query = writes.upsert(facts, self._dialect(), values, target, updates)
        rows = await self._rows(query)
        if not rows:
            msg = f"{self.model.__name__} key {builtins.list(target)} is taken"
            raise AlreadyExistsError(msg, constraint=",".join(target))
        return rows[0]

    # --- pages ---------------------------------------------------------------

    async def list_paginated(
        self,
        page: int = 1,
        size: int = DEFAULT_PAGE_SIZE,
        *,
        per_page: int | None = None,
        order_by: OrderBy = None,
        filters: Mapping[str, Any] | None = None,
        with_total: bool = True,
        include_deleted: bool = False,
    ) -> PaginationResult[ModelT]:
        """Return one offset page; `with_total=False` skips the count.

        The default order is `created_at` (then the key), or the key alone
        for a model without `created_at`.

        Raises:
            ValidationError: page below 1, size outside 1..100, bad filters or order.
        """
        if per_page is not None:
            size = per_page
        check_page(page, size, MAX_PAGE_SIZE)
        offset = (page - 1) * size
        terms = parse_filters(self.model, filters, self._dialect)
        scoping = self._scoping("querying", include_deleted=include_deleted)
        # With the total, whether a page follows is known from it; without,
        # one row more than the page says so.
        query = build.rows(
            self._f,
            terms,
            scoping,
            total_order(self._f, order_by, default=True),
            limit=size,
            offset=offset,
            total=with_total,
            look_ahead=not with_total,
        )
        rows, total, more = await _executor.rows(query, **self._context())
        if with_total and total is None:
            # No row carried the total: an empty result, or a page past the end.
            if offset:
                count = build.count(self._f, terms, scoping)
                total = int(await _executor.scalar(count, **self._context()))
            else:
                total = 0
        return PaginationResult[ModelT].build(
            rows, page=page, size=size, total=total, more=more
        )

    async def paginate(
        self,
        params: PaginationParams,
        *,
        order_by: OrderBy = None,
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
        order_by: OrderBy = None,
        filters: Mapping[str, Any] | None = None,
    ) -> CursorPage[ModelT]:
        """Return the keyset page after `cursor` (the first page without one).

        The order always ends with the primary key, so rows with equal sort
        values are neither skipped nor repeated; sort columns must be NOT NULL.
        The default order is as for `list_paginated`.

        Raises:
            ValidationError: a tampered, foreign or malformed cursor; a bad size,
                order or filter.
        """
        check_page(1, size, MAX_PAGE_SIZE)
        facts = self._f
        order = keyset_order(facts, order_by)
        binding = f"{facts.table.name}|{','.join(str(spec) for spec in order)}"
        adapter = cursor_adapter(self.model, tuple(spec.name for spec in order))
        position = None
        if cursor is not None:
            position = cursor_position(cursor, binding, adapter, self._security)
        query = build.rows(
            facts,
            parse_filters(self.model, filters, self._dialect),
            self._scoping("querying"),
            order,
            limit=size,
            after=position,
            look_ahead=True,
        )
        rows, _, more = await _executor.rows(query, **self._context())
        next_cursor = None
        if more:
            last = tuple(getattr(rows[-1], spec.name) for spec in order)
            values = adapter.dump_python(last, mode="json")
            next_cursor = encode_cursor(binding, values, self._security)
        return CursorPage[ModelT].model_construct(
            items=rows, next_cursor=next_cursor, size=size
        )
