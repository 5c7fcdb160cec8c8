"""Engine and pool hooks of a `Database`, and the driver path's checkout (private).

The driver path (`_driver.py`) takes connections from the `Database`'s own
SQLAlchemy pool. When a connection waits in the pool, taking it needs no I/O,
so `checkout` takes it synchronously, without the greenlet that
`AsyncEngine.raw_connection()` spends (about a third of a short read); when
the pool would have to open a connection, it says so before any I/O starts
and `checkout` falls back to `raw_connection()`. See `docs/internals.md`.

The pool serves the tasks waiting for a connection in arrival order on both
paths (`install_fair_queue`): a returned connection goes straight to the
first waiter, so no checkout, synchronous or not, takes it from under it.

The liveness check replacing SQLAlchemy's `pool_pre_ping` (which sends BEGIN,
a statement and ROLLBACK on every checkout) is free for a connection the
server closed and pings only a connection that sat unused for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import threading
import time
import warnings
from collections import deque
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
    "connect_hook_supported",
    "connect_to_the_end",
    "fair_queue_works",
    "install_cancel_safe_terminate",
    "install_fair_queue",
    "install_liveness_check",
    "install_sqlite_reset",
    "install_sync_checkout",
    "spare_cancel_requests",
]

logger = logging.getLogger("dotmac_core.db")

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
        driver: Any = dbapi_connection.driver_connection
        spare_cancel_requests(driver)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: the garbage collector's case
            task = None
        if task is not None and task.cancelling():
            driver.terminate()
            return
        graceful(dbapi_connection)

    dialect.do_terminate = do_terminate


def spare_cancel_requests(driver: Any) -> None:
    """Let an asyncpg connection's CancelRequests in flight finish after it closes.

    A statement cut off by a cancellation makes asyncpg send a CancelRequest
    on a connection of its own, in a background task; closing the
    connection cancels that task, and one cancelled while it negotiates TLS
    leaves a future whose exception nobody retrieves (asyncpg issues #1211,
    #1310). Forgotten by the closing connection, the task finishes on its
    own, bounded by `command_timeout`, and stops the server's query too.
    asyncpg keeps the tasks in `_cancellations` (no public accessor); when
    that is not a set, nothing is done. A task that has not started is left
    to the close, which cancels it before it sends anything: once started it
    would read the closed connection's protocol, gone by then (before asyncpg
    0.32 that is an `AttributeError` set on a future nobody awaits).
    """
    pending = getattr(driver, "_cancellations", None)
    if not isinstance(pending, set):
        return
    for task in list(pending):
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        if not inspect.iscoroutine(coro) or (
            inspect.getcoroutinestate(coro) != inspect.CORO_CREATED
        ):
            pending.discard(task)


async def connect_to_the_end(*args: Any, **kwargs: Any) -> Any:
    """`asyncpg.connect`, run to its end even when the caller is cancelled.

    A connect cancelled while it negotiates TLS leaves a future whose
    exception nobody retrieves (asyncpg issues #1211, #1310). So the connect
    runs in a task of its own; a cancelled caller gives up waiting, and the
    connection, once made (its own `timeout` bounds that), is closed.
    """
    import asyncpg  # type: ignore[import-untyped]  # only PostgreSQL gets here

    task = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
    try:
        return await asyncio.shield(task)
    except BaseException:
        task.add_done_callback(_discard_connection)
        raise


def _discard_connection(task: asyncio.Future[Any]) -> None:
    """Close the connection a connect nobody waits for made (errors retrieved)."""
    if task.cancelled() or task.exception() is not None:
        return
    task.result().terminate()


@functools.cache
def connect_hook_supported() -> bool:
    """Whether SQLAlchemy's asyncpg adapter takes `async_creator_fn` in its connect.

    That is how `create_async_engine(async_creator=...)` hands it a connect
    function, with the URL's and `connect_args`' parameters applied as usual.
    """
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg

    connect = sa_asyncpg.AsyncAdapt_asyncpg_dbapi.connect
    return "async_creator_fn" in connect.__code__.co_consts


def install_sync_checkout(engine: AsyncEngine) -> None:
    """Make the driver path's synchronous checkout and checkin safe and fair.

    A synchronous checkout stops before the pool opens a connection; it never
    takes a connection from under a task already waiting for one (the pool's
    queue is made fair, `install_fair_queue`); and a synchronous checkin that
    finds the pool full closes the surplus connection on the event loop
    instead of failing to await its close (`_install_deferred_close`; on
    SQLite, an invalidated connection of a cancelled task is closed there
    too).
    """
    install_fair_queue(engine)
    _install_deferred_close(engine)

    def _on_connect(*_args: Any) -> None:
        # The first connection of a pool that `AsyncEngine.dispose()` made
        # anew: its queue is empty, nobody waits yet.
        _make_fair(engine.sync_engine.pool)
        if _SYNC.active:
            msg = "the pool has to open a connection: that needs I/O"
            raise _NeedsIO(msg)

    event.listen(engine.sync_engine, "do_connect", _on_connect)


class _Handoff:
    """The asyncio queue under a fair pool: waiters are served in arrival order.

    `asyncio.Queue` wakes its first waiter when an item arrives and lets it
    take the item when it next runs. A task taking an item in between (a
    checkout that finds it waiting, which SQLAlchemy's queue and the driver
    path both do first) gets it instead, and the woken waiter waits again, at
    the back of the line: under load some tasks wait for many turns while
    others never wait. Here an item arriving while tasks wait is handed to the
    first of them directly, so the queue holds items only while nobody waits,
    and a waiter cancelled after it was handed one passes it on.

    It offers what `sqlalchemy.util.queue.AsyncAdaptedQueue` uses of
    `asyncio.Queue`; a blocking `put` (which the pool never does) does not
    wait for room.
    """

    def __init__(self, maxsize: int = 0, *, lifo: bool = False) -> None:
        self.maxsize = maxsize
        self._lifo = lifo
        self._items: deque[Any] = deque()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        #: An item handed to a task that takes it with the next `get_nowait`,
        #: in the same synchronous step (`_connect_in_turn`).
        self.turn: Any = None

    def qsize(self) -> int:
        """How many items wait (none while a task waits)."""
        return len(self._items)

    def empty(self) -> bool:
        """Whether no item waits."""
        return not self._items

    def full(self) -> bool:
        """Whether the waiting items fill the queue."""
        return 0 < self.maxsize <= len(self._items)

    def put_nowait(self, item: Any) -> None:
        """Hand `item` to the first waiting task, or keep it; `QueueFull` if full."""
        if self._hand(item):
            return
        if self.full():
            raise asyncio.QueueFull
        self._items.append(item)

    def _hand(self, item: Any) -> bool:
        """Give `item` to the first task still waiting; False if none waits."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(item)
                return True
        return False

    async def put(self, item: Any) -> None:
        """As `put_nowait` (the pool returns connections without blocking)."""
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        """A waiting item; `QueueEmpty` if none waits."""
        turn = self.turn
        if turn is not None:
            self.turn = None
            return turn
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        return items.pop() if self._lifo else items.popleft()

    async def get(self) -> Any:
        """A waiting item, or the first one put after the tasks that wait already."""
        if self._items:
            return self.get_nowait()
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed an item as the wait ended (cancelled, timed out):
                # it goes to the next in line, not back to the end. With
                # nobody waiting it is kept even in a full queue: the pool
                # counts it as its own, and closes the surplus when a later
                # return finds the queue full.
                item = waiter.result()
                if not self._hand(item):
                    self._items.append(item)
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise


def install_fair_queue(engine: AsyncEngine) -> None:
    """Serve the tasks waiting for one of `engine`'s connections in arrival order.

    Puts a `_Handoff` under the pool's `AsyncAdaptedQueue` (its `_queue`,
    which SQLAlchemy creates on first use) when `fair_queue_works()`; any
    other pool or queue is left as it is.
    """
    _make_fair(engine.sync_engine.pool)


def _make_fair(pool: Any) -> None:
    from sqlalchemy.util.queue import AsyncAdaptedQueue

    queue = getattr(pool, "_pool", None)
    if type(queue) is not AsyncAdaptedQueue:
        return  # not SQLAlchemy's asyncio queue pool
    kept = vars(queue).get("_queue")
    if kept is not None and (isinstance(kept, _Handoff) or not kept.empty()):
        return  # fair already, or in use: never swapped under a connection
    if not fair_queue_works():
        return
    queue.__dict__["_queue"] = _Handoff(queue.maxsize, lifo=queue.use_lifo)


@functools.cache
def fair_queue_works() -> bool:
    """Whether SQLAlchemy's asyncio pool queue runs over a `_Handoff` (once).

    `AsyncAdaptedQueue` keeps its `asyncio.Queue` in a lazily created
    `_queue` attribute and goes through its `qsize`, `put_nowait` and
    `get_nowait`; found by putting and getting one item through a queue
    given a `_Handoff`.
    """
    from sqlalchemy.util.queue import AsyncAdaptedQueue

    try:
        queue: Any = AsyncAdaptedQueue(2)
        handoff = _Handoff(2)
        queue.__dict__["_queue"] = handoff
        item = object()
        queue.put_nowait(item)
        seen = queue.qsize() == 1 and handoff.qsize() == 1
        return bool(seen and queue.get(block=False) is item and handoff.empty())
    except Exception:  # noqa: BLE001 - any change of shape: leave pools as they are
        return False


#: Connections closed on the event loop after a synchronous checkin (kept
#: referenced until their close has run).
_CLOSING: set[asyncio.Task[None]] = set()


def _install_deferred_close(engine: AsyncEngine) -> None:
    """Close a connection the pool drops on a synchronous checkin on the loop.

    The driver path returns its connection outside a greenlet. A pool that is
    full then closes the connection (an overflow connection, beyond
    `pool_size`), and the dialect's close awaits: SQLAlchemy logs the
    `MissingGreenlet` and drops the connection unclosed, its socket open
    until the garbage collector finds it. The close then runs as a task on
    the loop instead.
    """
    dialect: Any = engine.sync_engine.dialect
    graceful = dialect.do_close

    def do_close(dbapi_connection: DBAPIConnection) -> None:
        try:
            graceful(dbapi_connection)
        except sa_exc.MissingGreenlet:
            # Raises RuntimeError outside a loop: SQLAlchemy logs that too.
            loop = asyncio.get_running_loop()
            driver: Any = dbapi_connection.driver_connection
            task = loop.create_task(_close_driver(driver))
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    dialect.do_close = do_close
    if dialect.name == "sqlite":
        _install_sqlite_cancel_safe_terminate(dialect)


def _install_sqlite_cancel_safe_terminate(dialect: Any) -> None:
    """Close an invalidated aiosqlite connection on the loop in a cancelled task.

    SQLAlchemy's aiosqlite terminate awaits a shielded graceful close; when
    that await is cancelled it stops aiosqlite's thread under the close, whose
    task then waits forever ("Task was destroyed but it is pending"). While the
    task is being cancelled, aiosqlite's own `close()` runs as a task of its own.
    """
    terminate = dialect.do_terminate

    def do_terminate(dbapi_connection: DBAPIConnection) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: the garbage collector's case
            task = None
        if task is None or not task.cancelling():
            terminate(dbapi_connection)
            return
        driver: Any = dbapi_connection.driver_connection
        closing = task.get_loop().create_task(_close_driver(driver))
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)

    dialect.do_terminate = do_terminate


async def _close_driver(driver: Any) -> None:
    """Close a driver connection; abort it if that fails."""
    try:
        await asyncio.wait_for(driver.close(), 5.0)
    except Exception:  # a close that fails: abort, never raise
        logger.debug("closing a surplus connection failed", exc_info=True)
        terminate = getattr(driver, "terminate", None)
        if terminate is not None:
            terminate()


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
    connection. At that limit with no connection waiting, the task waits for
    its turn in the pool's fair queue and then takes the connection it was
    handed the same way. The caller returns it with `close()` or drops it
    with `invalidate()`.
    """
    pool: Any = engine.sync_engine.pool
    fairy: PoolProxiedConnection | None = None
    if sync and pool.checkedin():
        if not _waits(pool, max_overflow):
            fairy = _connect(pool)
    elif sync and _at_limit(pool, max_overflow) and not blocking_get_awaits():
        fairy = await _connect_in_turn(pool)
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


def _connect(pool: Any) -> PoolProxiedConnection | None:
    """`pool.connect()` without I/O; `None` if the pool has to open a connection."""
    _SYNC.active = True
    try:
        fairy: PoolProxiedConnection = pool.connect()
    except _NeedsIO:
        return None  # the waiting connection was closed, expired or invalid
    finally:
        _SYNC.active = False
    return fairy


def _at_limit(pool: Any, max_overflow: int | None) -> bool:
    """Whether a checkout of `pool` (none waiting in it) has to wait for a return."""
    if max_overflow is None or max_overflow < 0:
        return False
    overflow = getattr(pool, "overflow", None)
    return overflow is not None and bool(overflow() >= max_overflow)


async def _connect_in_turn(pool: Any) -> PoolProxiedConnection | None:
    """Wait in line in `pool`'s fair queue, then take the connection handed over.

    The same wait as SQLAlchemy's own checkout at the overflow limit (the
    pool's `timeout()`, then its `TimeoutError`), without a greenlet: the
    connection handed to this task is given to the pool's synchronous
    checkout that follows, before any other task runs. `None`: not a fair
    queue, or the connection handed over has to be reopened (which needs
    I/O): check out the usual way.
    """
    handoff = vars(getattr(pool, "_pool", None) or object()).get("_queue")
    if not isinstance(handoff, _Handoff):
        return None
    timeout = pool.timeout()
    try:
        async with asyncio.timeout(timeout):
            record = await handoff.get()
    except TimeoutError:
        msg = (
            f"QueuePool limit of size {pool.size()} overflow {pool.overflow()} "
            f"reached, connection timed out, timeout {timeout:.2f}"
        )
        raise sa_exc.TimeoutError(msg, code="3o7r") from None
    handoff.turn = record
    try:
        return _connect(pool)
    finally:
        if handoff.turn is not None:  # not taken: back to the line
            handoff.turn = None
            handoff.put_nowait(record)


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
