"""The driver path: one-statement calls run straight on the driver (private).

A repository call made outside any transaction that needs one statement (a
get, a page, an insert, an update) needs no session, no unit of work and no
BEGIN / COMMIT: it runs in autocommit, one round trip, on a connection taken
from the `Database`'s own SQLAlchemy pool. The statement is a SQLAlchemy Core
statement with the tenant and soft-delete criteria written into it, compiled
once per shape (model, operation, filter names, order, flags) and executed
with asyncpg's prepared statements, or through aiosqlite on a SQLite file;
rows become model objects without the ORM's loading machinery, converted by
the column types' own result processors, and come back detached, as rows
read by a closed session do.

Pool checkout normally needs no greenlet: when a connection waits in the pool,
taking it is synchronous. The liveness check replacing SQLAlchemy's
`pool_pre_ping` (see `install_liveness_check`) is free for a connection the
server closed and costs one round trip only for one idle for a while.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from inspect import signature as inspect_signature
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import WeakKeyDictionary

from sqlalchemy import event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.util import await_, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from ._types import UTCDateTime, as_utc
from ._validation import RowMaker, row_maker

if TYPE_CHECKING:
    from collections.abc import (
        Awaitable,
        Callable,
        Collection,
        Hashable,
        Mapping,
        Sequence,
    )

    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
    from sqlalchemy.sql import ClauseElement

    from .session import AsyncSession

__all__ = [
    "Compiled",
    "Driver",
    "ModelPlan",
    "driver_for",
    "install_liveness_check",
    "install_sqlite_reset",
    "install_sync_checkout",
]

#: Seconds a pooled connection may sit unused before its checkout pings it.
PING_AFTER = 2.0

_T = TypeVar("_T")

_object_new = object.__new__
_set = object.__setattr__

_CHECKED_IN = "dotmac_checked_in"
_CONNECTION = "dotmac_driver_connection"
_NEEDS_PING = "dotmac_needs_ping"


def install_liveness_check(engine: AsyncEngine, *, ping: bool) -> None:
    """Check every PostgreSQL connection the pool hands out, cheaply.

    A connection the server closed (restart, `pg_terminate_backend`, idle
    timeout) is known to asyncpg as soon as the event loop has read the EOF:
    it is replaced without any round trip. With `ping`, a connection unused for
    more than `PING_AFTER` seconds is also sent one empty statement first (a
    silently dropped network path shows up only that way). SQLAlchemy's own
    `pool_pre_ping` instead spends three round trips (BEGIN, a statement,
    ROLLBACK) on every checkout.
    """
    pool = engine.sync_engine.pool

    def _on_checkin(
        _dbapi: DBAPIConnection | None, record: ConnectionPoolEntry
    ) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    def _on_checkout(
        dbapi: DBAPIConnection, record: ConnectionPoolEntry, _proxy: Any
    ) -> None:
        driver: Any = dbapi.driver_connection
        if driver.is_closed():
            msg = "connection closed by the server"
            raise sa_exc.DisconnectionError(msg)
        used = record.info.get(_CHECKED_IN)
        if not ping or used is None or time.monotonic() - used <= PING_AFTER:
            return
        if not in_greenlet():
            record.info[_NEEDS_PING] = True  # the driver path pings it itself
            return
        try:
            await_(driver.execute(";"))
        except Exception as exc:
            msg = "connection failed its ping"
            raise sa_exc.DisconnectionError(msg) from exc

    event.listen(pool, "checkin", _on_checkin)
    event.listen(pool, "checkout", _on_checkout)


def install_sync_checkout(engine: AsyncEngine) -> None:
    """Let the driver path take a waiting connection without a greenlet.

    When the connection it took turns out to need replacing, the pool would
    open a new one, which needs a greenlet: the check below stops that before
    any coroutine is made, and the driver path retries in a greenlet.
    """

    def _on_connect(*_args: Any) -> None:
        if not in_greenlet():
            msg = "opening a connection needs a greenlet (greenlet_spawn)"
            raise _NeedsGreenlet(msg)

    event.listen(engine.sync_engine, "do_connect", _on_connect)


def install_sqlite_reset(engine: AsyncEngine) -> None:
    """Roll back a returned SQLite connection only if a transaction is open.

    SQLAlchemy's reset-on-return sends a ROLLBACK through aiosqlite's thread
    on every return, needed or not (and needing a greenlet); the database is
    built with `pool_reset_on_return=None` and this does the reset instead.
    """

    def _on_reset(dbapi: DBAPIConnection, _record: Any, state: Any) -> None:
        if state.terminate_only or state.transaction_was_reset:
            return
        if not state.asyncio_safe:
            return  # collected outside the loop: the pool terminates it
        driver: Any = dbapi.driver_connection
        if driver.in_transaction:
            dbapi.rollback()

    event.listen(engine.sync_engine.pool, "reset", _on_reset)


class _NeedsGreenlet(sa_exc.MissingGreenlet):
    """A synchronous checkout found that it has to open a connection."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement compiled for the driver: SQL text and how to order its values."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    #: Parameters the compiler added with a value of its own (SQLite's
    #: `OFFSET ?` after a LIMIT, say); every other name comes from the call.
    fixed: Mapping[str, Any]

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for `values`, converted by the column types."""
        fixed = self.fixed
        return [
            value if process is None else process(value)
            for name, process in zip(self.names, self.processors, strict=True)
            for value in (values[name] if name not in fixed else fixed[name],)
        ]


def compile_for(statement: ClauseElement, dialect: Dialect) -> Compiled | None:
    """Compile `statement` for the driver; `None` if it needs per-call rendering."""
    compiled: Any = statement.compile(dialect=dialect)
    if compiled.literal_execute_params or compiled.post_compile_params:
        return None
    names = tuple(compiled.positiontup or ())
    binds = [compiled.binds[name] for name in names]
    processors = tuple(bind.type._cached_bind_processor(dialect) for bind in binds)
    fixed = {
        name: bind.effective_value
        for name, bind in zip(names, binds, strict=True)
        if not bind.required
    }
    return Compiled(compiled.string, names, processors, fixed)


class ModelPlan:
    """What the driver path knows about one model: columns, converters, statements."""

    def __init__(self, model: type[Any], driver: Driver) -> None:
        maker = row_maker(model)  # configures the mappers too
        mapper = inspect(model)
        table: Any = mapper.local_table
        dialect = driver.dialect
        self.model = model
        self.table = table
        self.driver = driver
        self.dialect = dialect
        #: Attribute name -> Column, for the statement builders.
        self.column = {key: mapper.columns[key] for key in mapper.columns.keys()}  # noqa: SIM118
        columns = list(table.columns)
        self.selected = columns
        self.keys = tuple(
            mapper.get_property_by_column(column).key for column in columns
        )
        converters = [
            # UTCDateTime's converter, minus SQLAlchemy's wrapper around it.
            as_utc
            if isinstance(column.type, UTCDateTime)
            and column.type.impl_instance._cached_result_processor(dialect, None)
            is None
            else column.type._cached_result_processor(dialect, None)
            for column in columns
        ]
        #: A detached model object from one result row (values in `selected`
        #: order; a trailing extra value, such as a page's total, is ignored).
        self.row: Callable[[Sequence[Any]], Any] = _row_builder(
            maker, self.keys, converters
        )
        #: Every column is written from Python: an INSERT needs no RETURNING.
        self.plain_insert = not any(
            column.server_default is not None or column.server_onupdate is not None
            for column in columns
        )
        #: Values for the columns with a Python `onupdate`, or `None` when one
        #: of them needs SQLAlchemy's execution context (then UPDATE goes the
        #: ORM way).
        self.on_update = _on_update(columns, self.keys)
        self._statements: dict[Hashable, Compiled | None] = {}

    def statement(
        self,
        key: Hashable,
        build: Callable[[], ClauseElement],
        names: Collection[str] | None = None,
    ) -> Compiled | None:
        """The compiled statement for `key`, built and compiled on first use.

        `None` (cached too) when the statement cannot run on the driver as
        compiled: it renders per call, or it takes a parameter outside `names`
        (a column default SQLAlchemy would compute while executing).
        """
        try:
            return self._statements[key]
        except KeyError:
            compiled = compile_for(build(), self.dialect)
            if (
                compiled is not None
                and names is not None
                and not set(compiled.names) <= {*names, *compiled.fixed}
            ):
                compiled = None
            self._statements[key] = compiled
            return compiled

    def attach(self, session: Session, records: Sequence[Any]) -> list[Any]:
        """The session's objects for `records`, as a query on it would return.

        A row already in the identity map comes back as that object (its
        expired attributes refilled from the row); a new one joins the session.
        """
        identity_map = session.identity_map
        objects = []
        for record in records:
            obj = self.row(record)
            existing = identity_map.get(obj._sa_instance_state.key)
            if existing is None:
                session.add(obj)
                objects.append(obj)
                continue
            fresh = obj.__dict__
            for key in list(instance_state(existing).expired_attributes):
                if key in fresh:
                    set_committed_value(existing, key, fresh[key])
            objects.append(existing)
        return objects


def _row_builder(
    maker: RowMaker, keys: Sequence[str], converters: Sequence[Any]
) -> Callable[[Sequence[Any]], Any]:
    """Generate `ModelPlan.row` for one model: a straight-line function.

    Pages build dozens of objects per call; a function written out for the
    model's columns (what SQLAlchemy's own loaders do with closures) costs
    about a third less per row than a loop over them. Only attribute names
    (as `repr` literals) and positions enter the generated source.
    """
    namespace: dict[str, Any] = {
        "new": _object_new,
        "put": _set,
        "cls": maker.cls,
        "state_of": maker.state,
        "manager": maker.manager,
        "identity": maker.identity,
    }
    items = []
    for i, (key, convert) in enumerate(zip(keys, converters, strict=True)):
        if convert is None:
            items.append(f"{key!r}: record[{i}]")
        else:
            namespace[f"convert{i}"] = convert
            items.append(
                f"{key!r}: None if (v{i} := record[{i}]) is None else convert{i}(v{i})"
            )
    source = (
        "def row(record):\n"
        f"    values = {{{', '.join(items)}}}\n"
        "    obj = new(cls)\n"
        "    put(obj, '__pydantic_fields_set__', set())\n"
        "    put(obj, '__pydantic_extra__', None)\n"
        "    put(obj, '__pydantic_private__', None)\n"
        "    state = state_of(obj, manager)\n"
        f"    state.key = (identity, (values[{maker.pk!r}],), None)\n"
        "    values['_sa_instance_state'] = state\n"
        "    put(obj, '__dict__', values)\n"
        "    return obj\n"
    )
    exec(compile(source, f"<row of {maker.cls.__name__}>", "exec"), namespace)  # noqa: S102
    row: Callable[[Sequence[Any]], Any] = namespace["row"]
    return row


def _on_update(
    columns: Sequence[Any], keys: Sequence[str]
) -> dict[str, Callable[[], Any]] | None:
    found: dict[str, Callable[[], Any]] = {}
    for column, key in zip(columns, keys, strict=True):
        default = column.onupdate
        if default is None:
            continue
        if default.is_scalar:
            found[key] = _constant(default.arg)
            continue
        function = getattr(default.arg, "__wrapped__", None)
        if not default.is_callable or function is None:
            return None
        if any(
            parameter.default is parameter.empty
            for parameter in inspect_signature(function).parameters.values()
        ):
            return None  # it wants SQLAlchemy's execution context
        found[key] = function
    return found


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


_DRIVERS: WeakKeyDictionary[Any, Driver] = WeakKeyDictionary()


def driver_for(session: Session) -> Driver | None:
    """The `Driver` of the database `session` is bound to, if it has one."""
    engine = getattr(session.bind, "engine", None)
    return None if engine is None else _DRIVERS.get(engine)


class _Asyncpg:
    """How the driver path talks to asyncpg."""

    @staticmethod
    async def fetch(driver: Any, sql: str, args: list[Any]) -> list[Any]:
        rows: list[Any] = await driver.fetch(sql, *args)
        return rows

    @staticmethod
    async def execute(driver: Any, sql: str, args: list[Any]) -> None:
        await driver.execute(sql, *args)

    @staticmethod
    def is_closed(driver: Any) -> bool:
        closed: bool = driver.is_closed()
        return closed

    @staticmethod
    def statement_failed(exc: BaseException) -> bool:
        """An error the server reported for the statement (the connection is fine)."""
        return type(exc).__module__.startswith("asyncpg") and hasattr(exc, "sqlstate")

    @staticmethod
    def in_transaction(fairy: PoolProxiedConnection) -> bool:
        # SQLAlchemy's adapter sends BEGIN lazily, with the first statement.
        adapter: Any = fairy.dbapi_connection
        return getattr(adapter, "_transaction", None) is not None or bool(
            getattr(adapter, "autocommit", False)
        )


class _Aiosqlite:
    """How the driver path talks to aiosqlite (one hop to its thread per call)."""

    @staticmethod
    async def fetch(driver: Any, sql: str, args: list[Any]) -> list[Any]:
        return list(await driver.execute_fetchall(sql, args))

    @staticmethod
    async def execute(driver: Any, sql: str, args: list[Any]) -> None:
        await driver.execute_fetchall(sql, args)

    @staticmethod
    def is_closed(_driver: Any) -> bool:
        return False  # a file, not a server: nothing closes it behind our back

    @staticmethod
    def statement_failed(exc: BaseException) -> bool:
        """An error SQLite reported for the statement (the connection is fine)."""
        return isinstance(exc, sqlite3.Error)

    @staticmethod
    def in_transaction(fairy: PoolProxiedConnection) -> bool:
        # BEGIN is sent by the engine's begin hook, with the transaction.
        driver: Any = fairy.driver_connection
        return bool(driver.in_transaction)


class Driver:
    """Runs compiled statements on the driver connections of a `Database`'s pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.dialect = engine.dialect
        self._via: type[_Asyncpg | _Aiosqlite] = (
            _Asyncpg if self.dialect.name == "postgresql" else _Aiosqlite
        )
        self._pool: Any = engine.sync_engine.pool
        idle = getattr(self._pool, "checkedin", None)
        # Taking a waiting connection needs no I/O, so no greenlet (that saves
        # about a third of a short read), unless SQLAlchemy pings on checkout.
        self._idle: Callable[[], int] | None = (
            None if getattr(self._pool, "_pre_ping", True) else idle
        )
        self._plans: dict[type[Any], ModelPlan] = {}
        _DRIVERS[engine.sync_engine] = self

    def plan(self, model: type[Any]) -> ModelPlan:
        """The `ModelPlan` of `model` on this database."""
        plan = self._plans.get(model)
        if plan is None:
            plan = self._plans[model] = ModelPlan(model, self)
        return plan

    async def _checkout(self) -> PoolProxiedConnection:
        pool = self._pool
        if self._idle is not None and self._idle():
            try:
                fairy: PoolProxiedConnection = pool.connect()
            except _NeedsGreenlet:
                # The waiting connection was closed, expired or invalidated.
                fairy = await greenlet_spawn(pool.connect)
        else:
            fairy = await greenlet_spawn(pool.connect)
        if fairy.info.pop(_NEEDS_PING, False):
            try:
                await fairy.driver_connection.execute(";")  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - any failure: use another connection
                fairy.invalidate()
                fairy = await greenlet_spawn(pool.connect)
        return fairy

    async def run(
        self,
        compiled: Compiled,
        values: Mapping[str, Any],
        *,
        rows: bool = True,
        retry: bool = False,
    ) -> list[Any]:
        """Run `compiled` in autocommit; return its rows (`[]` when `rows` is false).

        With `retry` (reads only), a connection found dead by the statement is
        replaced and the statement sent once more.
        """
        args = compiled.args(values)
        via = self._via

        async def statement(driver: Any) -> list[Any]:
            if rows:
                return await via.fetch(driver, compiled.sql, args)
            await via.execute(driver, compiled.sql, args)
            return []

        return await self.use(statement, retry=retry)

    async def use(
        self, work: Callable[[Any], Awaitable[_T]], *, retry: bool = False
    ) -> _T:
        """Run `work(driver_connection)` on a pooled connection, outside a transaction.

        A connection that fails for any reason other than an error the
        database reported for the statement (cancellation, a timeout, a lost
        socket) is closed, not handed out again: its state is unknown. With
        `retry`, work that found its connection gone runs once more on another.
        """
        fairy = await self._checkout()
        driver: Any = fairy.driver_connection
        try:
            result = await work(driver)
        except BaseException as exc:
            broken = self._broken(driver, exc)
            if broken:
                fairy.invalidate()
            else:
                fairy.close()
            if retry and broken and isinstance(exc, Exception) and _is_lost(exc):
                return await self.use(work)
            raise
        fairy.close()
        return result

    def _broken(self, driver: Any, exc: BaseException) -> bool:
        """Whether `exc` leaves `driver`'s connection in an unknown state.

        Only an error the database reported for the statement leaves it
        usable; cancellation, a timeout or a lost socket do not.
        """
        return self._via.is_closed(driver) or not self._via.statement_failed(exc)

    async def run_in(
        self, session: AsyncSession, compiled: Compiled, values: Mapping[str, Any]
    ) -> list[Any] | None:
        """Run a read on `session`'s connection, inside its transaction.

        `None` (take the ORM way) when the session holds unflushed changes (a
        query would flush them first) or its transaction has not started on
        the database yet (the ORM way starts it, with its isolation level).
        """
        sync = session.sync_session
        if sync.autoflush and (sync.new or sync.deleted or sync.dirty):
            return None
        # The connection of the session's current transaction, remembered for
        # the transaction's life: asking the session costs a greenlet each time.
        transaction = sync.get_transaction()
        known: tuple[Any, AsyncConnection, PoolProxiedConnection] | None
        known = sync.info.get(_CONNECTION)
        connection: AsyncConnection
        if (
            known is not None
            and transaction is not None
            and known[0] is transaction
            and known[2].is_valid
        ):
            _, connection, fairy = known
        else:
            connection = await session.connection()
            fairy = await connection.get_raw_connection()
            sync.info[_CONNECTION] = (sync.get_transaction(), connection, fairy)
        via = self._via
        if not via.in_transaction(fairy):
            return None
        driver: Any = fairy.driver_connection
        try:
            return await via.fetch(driver, compiled.sql, compiled.args(values))
        except BaseException as exc:
            if self._broken(driver, exc):
                sync_connection = connection.sync_connection
                if sync_connection is not None:
                    sync_connection.invalidate()
            raise


def _is_lost(exc: Exception) -> bool:
    """The connection was gone before or while the statement was sent."""
    name = type(exc).__name__
    return name in ("ConnectionDoesNotExistError", "InterfaceError") or isinstance(
        exc, ConnectionError
    )
