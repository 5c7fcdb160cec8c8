"""Engine and pool hooks of a `Database`, and the driver path's checkout (private).

The driver path (`_driver.py`) takes connections from the `Database`'s own
SQLAlchemy pool. When a connection waits in the pool, taking it needs no I/O,
so `checkout` takes it synchronously, without the greenlet that
`AsyncEngine.raw_connection()` spends (about a third of a short read); when
the pool would have to open a connection, it says so before any I/O starts
and `checkout` falls back to `raw_connection()`. See `docs/internals.md`.

The liveness check replacing SQLAlchemy's `pool_pre_ping` (which sends BEGIN,
a statement and ROLLBACK on every checkout) is free for a connection the
server closed and pings only a connection that sat unused for a while.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

__all__ = [
    "PING_AFTER",
    "blocking_get_awaits",
    "checkout",
    "install_cancel_safe_terminate",
    "install_liveness_check",
    "install_sqlite_reset",
    "install_sync_checkout",
]

#: Seconds a pooled connection may sit unused before its checkout pings it.
PING_AFTER = 2.0

_CHECKED_IN = "dotmac_checked_in"
_NEEDS_PING = "dotmac_needs_ping"


class _SyncCheckout(threading.local):
    """Set while `checkout` takes a connection without a greenlet (no I/O allowed)."""

    active = False


_SYNC = _SyncCheckout()


class _NeedsIO(RuntimeError):
    """A synchronous checkout found that the pool has to open a connection."""


def install_liveness_check(engine: AsyncEngine, *, ping: bool) -> None:
    """Check every PostgreSQL connection the pool hands out, cheaply.

    A connection the server closed (restart, `pg_terminate_backend`, idle
    timeout) is known to asyncpg as soon as the event loop has read the EOF:
    it is replaced without any round trip. With `ping`, a connection unused for
    more than `PING_AFTER` seconds is pinged first (a silently dropped network
    path shows up only that way): by the dialect's own `do_ping` on
    SQLAlchemy's checkouts, by `checkout` on the driver path's.
    """
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

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
        if _SYNC.active:
            record.info[_NEEDS_PING] = True  # `checkout` pings it, awaiting
            return
        try:
            dialect.do_ping(dbapi)
        except Exception as exc:
            msg = "connection failed its ping"
            raise sa_exc.DisconnectionError(msg) from exc

    event.listen(pool, "checkin", _on_checkin)
    event.listen(pool, "checkout", _on_checkout)


def install_cancel_safe_terminate(engine: AsyncEngine) -> None:
    """Close an invalidated asyncpg connection at once while its task is cancelled.

    SQLAlchemy invalidates a connection whose statement was cancelled and
    terminates it with a graceful close that it awaits. Under a cancellation
    that is delivered again at every await (anyio's cancel scopes, and so
    `move_on_after` and task groups), that await is cancelled too; the
    cancellation then leaves the pool's invalidation half done, and the
    connection stays checked out until the garbage collector finds it. While
    the task is being cancelled, the connection is aborted without awaiting
    (asyncpg's public, synchronous `terminate()`); otherwise SQLAlchemy's own
    graceful close runs.
    """
    dialect: Any = engine.sync_engine.dialect
    graceful = dialect.do_terminate

    def do_terminate(dbapi_connection: DBAPIConnection) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: the garbage collector's case
            task = None
        if task is not None and task.cancelling():
            driver: Any = dbapi_connection.driver_connection
            driver.terminate()
            return
        graceful(dbapi_connection)

    dialect.do_terminate = do_terminate


def install_sync_checkout(engine: AsyncEngine) -> None:
    """Make a synchronous checkout stop before the pool opens a connection."""

    def _on_connect(*_args: Any) -> None:
        if _SYNC.active:
            msg = "the pool has to open a connection: that needs I/O"
            raise _NeedsIO(msg)

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


async def checkout(
    engine: AsyncEngine, *, sync: bool, max_overflow: int | None = None
) -> PoolProxiedConnection:
    """A connection from `engine`'s pool for the driver path.

    With `sync` (the pool's checkout needs no I/O of SQLAlchemy's own: no
    `pool_pre_ping`), a connection waiting in the pool is taken without a
    greenlet, unless the pool is at its overflow limit (`max_overflow`) on a
    SQLAlchemy whose blocking queue get awaits before looking for a waiting
    connection. The caller returns it with `close()` or drops it with
    `invalidate()`.
    """
    pool: Any = engine.sync_engine.pool
    fairy: PoolProxiedConnection | None = None
    if sync and pool.checkedin() and not _waits(pool, max_overflow):
        _SYNC.active = True
        try:
            fairy = pool.connect()
        except _NeedsIO:
            fairy = None  # the waiting connection was closed, expired or invalid
        finally:
            _SYNC.active = False
    if fairy is None:
        fairy = await engine.raw_connection()
    if fairy.info.pop(_NEEDS_PING, False):
        driver: Any = fairy.driver_connection
        try:
            await driver.fetchrow(";")
        except Exception:  # noqa: BLE001 - any failure: use another connection
            fairy.invalidate()
            fairy = await engine.raw_connection()
    return fairy


def _waits(pool: Any, max_overflow: int | None) -> bool:
    """Whether `pool.connect()` outside a greenlet could await its queue.

    A `QueuePool` at its overflow limit takes a connection with a blocking
    queue get (`QueuePool.overflow()` against `max_overflow`, as the pool
    decides); older SQLAlchemy releases await there even when a connection
    is waiting (`blocking_get_awaits`).
    """
    if max_overflow is None:
        return True  # not known: never risk it
    if max_overflow < 0:
        return False  # no limit: the pool never waits
    overflow = getattr(pool, "overflow", None)
    if overflow is None:
        return True
    return bool(overflow() >= max_overflow and blocking_get_awaits())


@functools.cache
def blocking_get_awaits() -> bool:
    """Whether SQLAlchemy's asyncio pool queue awaits on a blocking get (once).

    SQLAlchemy 2.1 takes a waiting item first; 2.0 awaits `Queue.get()` at
    once, which outside a greenlet fails with `MissingGreenlet`. Found by
    trying it on a queue of one item (the coroutine it leaves is dropped
    silently).
    """
    from sqlalchemy.util.queue import AsyncAdaptedQueue

    queue: Any = AsyncAdaptedQueue()
    queue.put_nowait(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return bool(queue.get(block=True, timeout=1.0) != 1)
        except Exception:  # noqa: BLE001 - MissingGreenlet, or anything else
            return True
        finally:
            gc.collect()
