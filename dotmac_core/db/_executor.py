"""Where a repository call runs: the one place that chooses (private).

A `Query` (see `_query.py`) runs one of three ways, all on the same statement:

- **driver, pooled**: outside any transaction, on a connection of the
  `Database`'s pool in autocommit (`_driver.py`), rows made into detached
  objects by the materialiser (`_rows.py`);
- **driver, on a session's connection**: a read inside a transaction whose
  BEGIN has gone out, with nothing pending to flush: on the session's own
  connection, rows merged into its identity map by the materialiser;
- **session**: everything else. SQLAlchemy executes the statement on the
  session (given, ambient, or a short one of the call's own) and loads the
  objects: identity map, autoflush, events.

The driver ways skip SQLAlchemy's execution and loading, so they are taken
only when nothing is there to notice: no statement listener or SQL logging on
the engine, no `load` / `refresh` listener on the model, no session listener
of the user's. Otherwise, and for statements rendered per call (`in` lists)
or that load relationships, the call runs through SQLAlchemy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
from sqlalchemy.orm import RelationshipDirection

from ..exceptions import translate_errors
from . import _rows
from ._driver import driver_for
from .database import get_database
from .scoping import ScopedSession, bind_session, current_scope, scoping_listeners
from .session import begin_now
from .transaction import TransactionManager, current_transaction

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.orm import Session

    from ._driver import Compiled, DriverExecutor
    from ._facts import Facts
    from ._query import Query
    from .database import Database
    from .session import AsyncSession

__all__ = [
    "Loaded",
    "cascades",
    "delete_as_session_does",
    "dialect_of",
    "on_connection",
    "pooled_driver",
    "rowcount",
    "rows",
    "scalar",
    "scope_session",
    "session_driver",
    "session_of",
]

_SQL_LOG = logging.getLogger("sqlalchemy.engine.Engine")
_OURS = scoping_listeners()

#: A session whose dispatch shows the listeners of the session classes.
_PROBE = ScopedSession()


def _observed(engine: Engine, facts: Facts, session: Session | None) -> bool:
    """Whether anything would notice a call skipping SQLAlchemy's execution.

    Runs on every call: the checks are written out, not looped over.
    """
    if engine.echo or _SQL_LOG.isEnabledFor(logging.INFO):
        return True
    events: Any = engine.dispatch
    if (
        events.before_cursor_execute
        or events.after_cursor_execute
        or events.before_execute
        or events.after_execute
    ):
        return True
    events = engine.dialect.dispatch
    if events.handle_error or events.do_execute or events.do_execute_no_params:
        return True
    events = facts.mapper.class_manager.dispatch
    if events.load or events.refresh:
        return True
    events = (session or _PROBE).dispatch
    ours = _OURS
    for listener in events.do_orm_execute:
        if listener not in ours:
            return True
    return session is not None and bool(
        events.loaded_as_persistent
        or events.detached_to_persistent
        or events.before_attach
        or events.after_attach
    )


def session_of(given: AsyncSession | None) -> AsyncSession | None:
    """The session a call works on: the given one or the ambient transaction's."""
    if given is not None:
        return given
    ambient = current_transaction()
    return None if ambient is None else ambient.session


def _pooled(db: Database, query: Query) -> tuple[DriverExecutor, Compiled] | None:
    """The driver and compiled statement for a pooled run, or `None`."""
    if query.load:
        return None
    driver = pooled_driver(db, query.facts)
    if driver is None:
        return None
    compiled = driver.compiled(query)
    return None if compiled is None else (driver, compiled)


def pooled_driver(db: Database, facts: Facts) -> DriverExecutor | None:
    """`db`'s driver executor, when a call on `facts`' model may run on the pool."""
    engine = db.engine.sync_engine
    driver = driver_for(engine)
    if driver is None or not driver.pooled or _observed(engine, facts, None):
        return None
    return driver


async def session_driver(
    session: AsyncSession, facts: Facts
) -> tuple[DriverExecutor, Any, AsyncConnection] | None:
    """The driver executor and raw connection of `session`'s transaction, or `None`.

    Only when the driver may run there: nothing observes, nothing is pending
    to flush (SQLAlchemy would flush first), and the transaction's BEGIN has
    gone out (SQLAlchemy sends it, with its options, with the first statement).
    """
    sync = session.sync_session
    engine = getattr(sync.get_bind(), "engine", None)
    driver = driver_for(engine)
    if engine is None or driver is None or _observed(engine, facts, sync):
        return None
    if sync.autoflush and (sync.new or sync.dirty or sync.deleted):
        return None
    known = session.remembered_connection()
    if known is None:
        connection = await session.connection()
        session.remember_connection(connection)
        known = session.remembered_connection()
        if known is None:
            return None
    connection, raw = known
    connected: Any = raw.driver_connection
    if not driver.in_transaction(connected):
        try:
            begun = await begin_now(raw.dbapi_connection)
        except BaseException:
            # Cut off (cancelled) or failed with its BEGIN under way: the server
            # may hold a transaction the adapter does not know of, so the
            # connection must never go back to the pool (as SQLAlchemy does
            # with a statement cut off the same way).
            with anyio.CancelScope(shield=True):
                await connection.invalidate()
            raise
        if not begun:
            return None
    return driver, connected, connection


async def on_connection(
    session: AsyncSession,
    connection: AsyncConnection,
    driver: DriverExecutor,
    connected: Any,
    work: Callable[[Any], Awaitable[Any]],
) -> Any:
    """Run `work(raw_connection)` holding `session`; a broken connection is dropped."""
    try:
        with session.exclusive():
            return await work(connected)
    except BaseException as exc:
        if driver.is_broken(connected, exc):
            await connection.invalidate()
        raise


async def _on_session(session: AsyncSession, query: Query) -> list[Any] | None:
    """A query's rows from `session`'s own connection; `None`: SQLAlchemy's way.

    Writes too, unless a bulk-write listener of the session's would miss them.
    """
    engine = getattr(session.sync_session.get_bind(), "engine", None)
    driver = driver_for(engine)
    compiled = None if driver is None or query.load else driver.compiled(query)
    if compiled is None:
        return None
    if query.write:
        events: Any = session.sync_session.dispatch
        if events.after_bulk_update or events.after_bulk_delete:
            return None
    found = await session_driver(session, query.facts)
    if found is None:
        return None
    if query.facts.tenant:
        scope_session(session)
    driver, connected, connection = found
    records: list[Any] = await on_connection(
        session,
        connection,
        driver,
        connected,
        lambda raw: driver.run(query, compiled, raw),
    )
    return records


def scope_session(session: AsyncSession) -> None:
    """Bind `session` to the current tenant scope, or check it is bound to it."""
    bind_session(session.sync_session, current_scope())


async def _orm(session: AsyncSession, query: Query) -> Any:
    """Run `query` on `session` the SQLAlchemy way; its raw result."""
    if query.facts.tenant:
        scope_session(session)
    statement, params = query.for_session()
    run: Any = session.exec  # every kind of statement; the overloads name a few
    return await run(statement, params=params, execution_options=query.options)


class Loaded(NamedTuple):
    """What a row query gave: its objects, a page's total, whether rows follow."""

    objects: list[Any]
    total: int | None = None
    more: bool = False


def _loaded(query: Query, objects: list[Any], total: int | None) -> Loaded:
    """Cut a look-ahead query's objects to its page (see `Query.keep`)."""
    keep = query.keep
    if keep is None or len(objects) <= keep:
        return Loaded(objects, total)
    return Loaded(objects[:keep], total, more=True)


def _from_records(
    query: Query, records: Sequence[Any], session: Session | None = None
) -> Loaded:
    """Objects for the records a driver run gave (the look-ahead row makes none).

    Detached, or `session`'s own.
    """
    total = int(records[0][-1]) if query.total and records else None
    keep = query.keep
    more = keep is not None and len(records) > keep
    if more:
        records = records[:keep]
    if session is None:
        objects = _rows.detached(query.facts, records)
    else:
        # A write's rows replace what the session holds (`populate_existing`).
        objects = _rows.into_session(
            session, query.facts, records, overwrite=query.write
        )
    return Loaded(objects, total, more)


async def rows(
    query: Query, *, session: AsyncSession | None = None, db: Database | None = None
) -> Loaded:
    """Run a row query: its model objects, and a page's total where asked.

    Outside a session the objects are detached; on one, they are its own.
    """
    with translate_errors():
        target = session_of(session)
        if target is None:
            database = db or get_database()
            if not query.write:
                replicas = database._replica_set
                if replicas is not None:
                    return await replicas.read(lambda on: _read_rows(on, query))
                return await _read_rows(database, query)
            pooled = _pooled(database, query)
            if pooled is not None:
                driver, compiled = pooled
                records = await driver.run(query, compiled)
                return _from_records(query, records)
            async with TransactionManager(database) as tx:
                return await _session_rows(tx.session, query)
        with target.exclusive():
            records = await _on_session(target, query)
            if records is not None:
                return _from_records(query, records, target.sync_session)
            return await _session_rows(target, query)


async def _read_rows(database: Database, query: Query) -> Loaded:
    """A read's objects from `database` (the primary or a replica), detached."""
    pooled = _pooled(database, query)
    if pooled is not None:
        driver, compiled = pooled
        return _from_records(query, await driver.run(query, compiled))
    async with database.read_session() as own:
        return await _session_rows(own, query)


async def _session_rows(session: AsyncSession, query: Query) -> Loaded:
    result = await _orm(session, query)
    if not query.total:
        return _loaded(query, list(result.scalars().all()), None)
    pairs = result.all()
    total = int(pairs[0][1]) if pairs else None
    return _loaded(query, [obj for obj, _ in pairs], total)


async def scalar(
    query: Query, *, session: AsyncSession | None = None, db: Database | None = None
) -> Any:
    """Run a one-value query (a count, an existence check); its value."""
    with translate_errors():
        target = session_of(session)
        if target is None:
            database = db or get_database()
            replicas = database._replica_set
            if replicas is not None:
                return await replicas.read(lambda on: _read_scalar(on, query))
            return await _read_scalar(database, query)
        with target.exclusive():
            records = await _on_session(target, query)
            if records is not None:
                return records[0][0] if records else None
            return (await _orm(target, query)).scalar()


async def _read_scalar(database: Database, query: Query) -> Any:
    """A one-value read's value from `database` (the primary or a replica)."""
    pooled = _pooled(database, query)
    if pooled is not None:
        driver, compiled = pooled
        records = await driver.run(query, compiled)
        return records[0][0] if records else None
    async with database.read_session() as own:
        return (await _orm(own, query)).scalar()


async def rowcount(
    query: Query, *, session: AsyncSession | None = None, db: Database | None = None
) -> int:
    """Run a write that returns no rows; how many rows it changed."""
    with translate_errors():
        target = session_of(session)
        if target is None:
            database = db or get_database()
            pooled = _pooled(database, query)
            if pooled is not None:
                driver, compiled = pooled
                count: int = await driver.run(query, compiled)
                return count
            async with TransactionManager(database) as tx:
                return int((await _orm(tx.session, query)).rowcount)
        return int((await _orm(target, query)).rowcount)


def dialect_of(session: AsyncSession | None, db: Database | None) -> str:
    """The dialect name a call runs on: its session's, or its database's."""
    target = session_of(session)
    if target is not None and target.bind is not None:
        return str(target.bind.dialect.name)
    return (db or get_database()).dialect


def cascades(facts: Facts) -> bool:
    """Whether deleting a row is more than a DELETE to the ORM (its relationships)."""
    return any(
        rel.direction is not RelationshipDirection.MANYTOONE or rel.cascade.delete
        for rel in facts.mapper.relationships
    )


async def delete_as_session_does(
    query: Query, *, session: AsyncSession | None = None, db: Database | None = None
) -> bool:
    """`session.delete()` of the row `query` (a get) finds, then a flush.

    The relationships' cascade and passive-delete settings apply, as in
    SQLAlchemy's unit of work; in a short transaction outside a session.
    """
    with translate_errors():
        target = session_of(session)
        if target is None:
            async with TransactionManager(db or get_database()) as tx:
                return await _delete_found(tx.session, query)
        return await _delete_found(target, query)


async def _delete_found(session: AsyncSession, query: Query) -> bool:
    objects = (await _session_rows(session, query)).objects
    if not objects:
        return False
    await session.delete(objects[0])
    await session.flush()
    return True
