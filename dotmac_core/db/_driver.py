"""The driver executor: a query's statement run on asyncpg / aiosqlite (private).

It knows statements, not models. A `Query`'s statement is compiled once per
shape by SQLAlchemy's compiler for the database's dialect, and the values of
each call are converted by the column types' own bind processors
(`TypeEngine.dialect_impl(dialect).bind_processor(dialect)`), the ones
SQLAlchemy's execution applies. Column defaults the compiled statement leaves
to Python (`insert_prefetch`, `update_prefetch`: a Python `default` of an
omitted column, an `onupdate`) are evaluated as SQLAlchemy's execution
context evaluates them. Result values go through each column type's result
processor for the real type code the driver reports for that column
(asyncpg's statement description; SQLite reports none), called on every
value, NULL included, as SQLAlchemy calls it.

A statement runs either on a connection of the `Database`'s pool in
autocommit (one round trip, no BEGIN / COMMIT) or on a session's connection,
inside its transaction. A statement that needs per-call rendering (an `in`
list) is not run here: `compile` says so and the call takes the session way.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ._pool import checkout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from sqlalchemy import Column
    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._query import Query

__all__ = [
    "Compiled",
    "DriverExecutor",
    "driver_for",
    "evaluate_default",
    "register_driver",
]

#: Compiled statements kept per executor (shapes come from callers' filters).
MAX_COMPILED = 4096


class _DefaultContext:
    """What a context-sensitive column default sees while the driver path runs.

    SQLAlchemy documents `get_current_parameters()` and `current_column` as
    the contract of a default or `onupdate` callable that takes the execution
    context; this gives both, over the statement's parameters.
    """

    def __init__(self, parameters: dict[str, Any]) -> None:
        self.current_parameters = parameters
        self.current_column: Column[Any] | None = None

    def get_current_parameters(
        self, isolate_multiinsert_groups: bool = True
    ) -> dict[str, Any]:
        """The parameters of the row being written (column keys and bind names)."""
        return self.current_parameters


def evaluate_default(default: Any, column: Any, parameters: dict[str, Any]) -> Any:
    """The value of a Python column default (`default` / `onupdate`) for one row.

    A scalar is itself; a callable gets a context offering what SQLAlchemy
    documents for context-sensitive defaults, over `parameters` (the row's
    values by column key).
    """
    if default.is_scalar:
        return default.arg
    context = _DefaultContext(parameters)
    context.current_column = column
    return default.arg(context)


@dataclass(slots=True)
class Compiled:
    """A statement compiled for the driver: SQL text, how to bind, how to read."""

    sql: str
    #: Per positional parameter: its name and the bind processor of its type.
    names: tuple[str, ...]
    bind: tuple[Callable[[Any], Any] | None, ...]
    #: Parameters the compiler gave a value of its own (`LIMIT 1`, say).
    fixed: Mapping[str, Any]
    #: Columns whose Python default / onupdate is evaluated per call: the
    #: bind name, the column and its default object.
    prefetch: tuple[tuple[str, Any, Any], ...]
    #: Types of the result columns (empty: the statement returns no rows).
    result_types: tuple[Any, ...]
    #: Result processors, known once the driver has described the statement.
    results: tuple[tuple[int, Callable[[Any], Any]], ...] | None = None
    dialect: Any = field(default=None, repr=False)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for one call, converted by the column types."""
        if self.prefetch:
            params = self._with_defaults(params)
        fixed = self.fixed
        args = []
        for name, process in zip(self.names, self.bind, strict=True):
            value = fixed[name] if name in fixed else params[name]
            args.append(value if process is None else process(value))
        return args

    def _with_defaults(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(params)
        for name, column, default in self.prefetch:
            values[name] = evaluate_default(default, column, values)
        return values

    def learn(self, type_codes: Sequence[Any]) -> None:
        """Resolve the result processors for the type codes the driver reported."""
        dialect = self.dialect
        found = []
        for i, (type_, code) in enumerate(
            zip(self.result_types, type_codes, strict=True)
        ):
            process = type_.dialect_impl(dialect).result_processor(dialect, code)
            if process is not None:
                found.append((i, process))
        self.results = tuple(found)

    def convert(self, records: Sequence[Any]) -> Sequence[Sequence[Any]]:
        """`records` with every value passed through its column's result processor."""
        results = self.results
        if not results:
            return records
        converted = []
        for record in records:
            row = list(record)
            for i, process in results:
                row[i] = process(row[i])
            converted.append(row)
        return converted


def compile_query(query: Query, dialect: Dialect) -> Compiled | None:
    """Compile `query`'s statement for the driver; `None` if it cannot run there."""
    statement: Any = query.statement
    compiled: Any = statement.compile(dialect=dialect, column_keys=query.column_keys)
    if compiled.literal_execute_params or compiled.post_compile_params:
        return None  # rendered per call (expanding `in` lists)
    prefetch = [(c.key, c, c.default) for c in compiled.insert_prefetch]
    prefetch += [(c.key, c, c.onupdate) for c in compiled.update_prefetch]
    if any(d is None or not (d.is_scalar or d.is_callable) for _, _, d in prefetch):
        return None  # a default only SQLAlchemy's execution can produce
    escaped = {v: k for k, v in (compiled.escaped_bind_names or {}).items()}
    names = tuple(escaped.get(name, name) for name in compiled.positiontup or ())
    binds = [compiled.binds[name] for name in names]
    processors = tuple(
        bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in binds
    )
    computed = {name for name, _, _ in prefetch}
    fixed = {
        name: bind.effective_value
        for name, bind in zip(names, binds, strict=True)
        if not bind.required and name not in query.params and name not in computed
    }
    types = tuple(column.type for column in statement.exported_columns)
    made = Compiled(
        compiled.string,
        names,
        processors,
        fixed,
        tuple(prefetch),
        types,
        dialect=dialect,
    )
    if dialect.name == "sqlite" or not types:
        made.learn([None] * len(types))  # SQLite reports no type codes
    return made


def _asyncpg_errors() -> tuple[type[BaseException], ...]:
    errors = sys.modules.get("asyncpg")
    return () if errors is None else (errors.PostgresError,)


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning the connection was gone before or while the statement went."""
    asyncpg = sys.modules.get("asyncpg")
    lost: tuple[type[BaseException], ...] = (ConnectionError,)
    if asyncpg is not None:
        lost += (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)
    return lost


class _Asyncpg:
    """How the driver executor talks to asyncpg."""

    @staticmethod
    async def fetch(driver: Any, compiled: Compiled, args: list[Any]) -> Sequence[Any]:
        if compiled.results is None:
            # First run of this statement: the description gives the type
            # code of every result column, which the processors need.
            prepared = await driver.prepare(compiled.sql)
            compiled.learn([a.type.oid for a in prepared.get_attributes()])
            return compiled.convert(await prepared.fetch(*args))
        return compiled.convert(await driver.fetch(compiled.sql, *args))

    @staticmethod
    async def rowcount(driver: Any, compiled: Compiled, args: list[Any]) -> int:
        status: str = await driver.execute(compiled.sql, *args)
        return int(status.rsplit(" ", 1)[-1])

    @staticmethod
    def is_closed(driver: Any) -> bool:
        closed: bool = driver.is_closed()
        return closed

    @staticmethod
    def statement_failed(exc: BaseException) -> bool:
        """An error the server reported for the statement (the connection is fine)."""
        return isinstance(exc, _asyncpg_errors())

    @staticmethod
    def in_transaction(driver: Any) -> bool:
        begun: bool = driver.is_in_transaction()
        return begun


class _Aiosqlite:
    """How the driver executor talks to aiosqlite (one hop to its thread per call)."""

    @staticmethod
    async def fetch(driver: Any, compiled: Compiled, args: list[Any]) -> Sequence[Any]:
        return compiled.convert(list(await driver.execute_fetchall(compiled.sql, args)))

    @staticmethod
    async def rowcount(driver: Any, compiled: Compiled, args: list[Any]) -> int:
        cursor = await driver.execute(compiled.sql, args)
        try:
            count: int = cursor.rowcount
        finally:
            await cursor.close()
        return count

    @staticmethod
    def is_closed(_driver: Any) -> bool:
        return False  # a file, not a server: nothing closes it behind our back

    @staticmethod
    def statement_failed(exc: BaseException) -> bool:
        """An error SQLite reported for the statement (the connection is fine)."""
        return isinstance(exc, sqlite3.Error)

    @staticmethod
    def in_transaction(driver: Any) -> bool:
        begun: bool = driver.in_transaction
        return begun


_DRIVERS: WeakKeyDictionary[Any, DriverExecutor] = WeakKeyDictionary()


def register_driver(engine: Engine, driver: DriverExecutor) -> None:
    """Make `driver` the driver executor of `engine` (the sync engine)."""
    _DRIVERS[engine] = driver


def driver_for(engine: Engine | None) -> DriverExecutor | None:
    """The driver executor of `engine` (a sync engine), if it has one."""
    return None if engine is None else _DRIVERS.get(engine)


class DriverExecutor:
    """Runs queries on the driver connections of one `Database`'s pool.

    Args:
        engine: The database's engine (its pool and dialect).
        sync_checkout: Whether a waiting connection may be taken without a
            greenlet (the pool does no I/O of its own on checkout).
        max_overflow: The pool's `max_overflow` (`None`: not known).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sync_checkout: bool,
        max_overflow: int | None = None,
    ) -> None:
        self.engine = engine
        self.dialect: Dialect = engine.dialect
        #: Whether a call outside any transaction may run on a pooled connection
        #: in autocommit; `False` when every statement needs a transaction of
        #: its own (settings made per transaction, such as row-level security).
        self.pooled = True
        #: Whether bulk inserts may use PostgreSQL's COPY; `False` where the
        #: server refuses it (tables under row-level security).
        self.copy = True
        self._via: type[_Asyncpg | _Aiosqlite] = (
            _Asyncpg if self.dialect.name == "postgresql" else _Aiosqlite
        )
        #: Run on the connection of each write outside a transaction, after
        #: it (the read-your-writes note of a database with replicas).
        self.after_write: Callable[[Any], Awaitable[None]] | None = None
        self._sync = sync_checkout
        self._max_overflow = max_overflow
        self._compiled: dict[tuple[type[Any], Any], Compiled | None] = {}

    def compiled(self, query: Query) -> Compiled | None:
        """The driver form of `query`'s statement (`None`: it cannot run here)."""
        key = (query.facts.model, query.shape)
        try:
            return self._compiled[key]
        except KeyError:
            made = compile_query(query, self.dialect)
            if len(self._compiled) < MAX_COMPILED:
                self._compiled[key] = made
            return made

    def in_transaction(self, driver: Any) -> bool:
        """Whether `driver` (a raw connection) has sent its BEGIN."""
        return self._via.in_transaction(driver)

    async def run(self, query: Query, compiled: Compiled, driver: Any = None) -> Any:
        """Run `query`: its converted rows, or its rowcount.

        On `driver` (a session's raw connection) the statement runs inside
        that connection's transaction; without, on a pooled connection in
        autocommit, where a read that finds its connection dead is sent once
        more on another.
        """
        args = compiled.args(query.params)
        via = self._via

        async def statement(connection: Any) -> Any:
            if query.returns == "rowcount":
                return await via.rowcount(connection, compiled, args)
            return await via.fetch(connection, compiled, args)

        if driver is not None:
            return await statement(driver)
        return await self.use(statement, retry=not query.write, write=query.write)

    async def use(
        self,
        work: Callable[[Any], Awaitable[Any]],
        *,
        retry: bool = False,
        write: bool = False,
    ) -> Any:
        """Run `work(driver_connection)` on a pooled connection, outside a transaction.

        A connection that fails for any reason other than an error the
        database reported for the statement (cancellation, a timeout, a lost
        socket) is closed, not handed out again: its state is unknown. With
        `retry`, work that found its connection gone runs once more on
        another. With `write`, `after_write` runs on the connection after it.
        """
        fairy = await checkout(
            self.engine, sync=self._sync, max_overflow=self._max_overflow
        )
        driver: Any = fairy.driver_connection
        try:
            result = await work(driver)
            if write and self.after_write is not None:
                await self.after_write(driver)
        except BaseException as exc:
            broken = self.is_broken(driver, exc)
            if broken:
                fairy.invalidate()
            else:
                fairy.close()
            if retry and broken and isinstance(exc, _lost_errors()):
                return await self.use(work)
            raise
        fairy.close()
        return result

    def is_broken(self, driver: Any, exc: BaseException) -> bool:
        """Whether `exc` leaves `driver`'s connection in an unknown state.

        Only an error the database reported for the statement leaves it
        usable; cancellation, a timeout or a lost socket do not.
        """
        return self._via.is_closed(driver) or not self._via.statement_failed(exc)
