"""`TransactionManager` and `@transactional`: one unit of work, committed or not at all.

The active transaction lives in a context variable, so repositories called
inside `async with TransactionManager():` join it without being handed a
session. Entering a `TransactionManager` inside another opens a SAVEPOINT on
the outer one's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Self, TypeVar

import anyio

from ..exceptions import (
    DatabaseConnectionError,
    DotMacError,
    TransactionConflictError,
    ValidationError,
    translate_error,
    translate_errors,
)
from .database import SQLITE_IMMEDIATE, SQLITE_READ_ONLY, Database, get_database
from .scoping import bind_session, current_scope
from .session import begin_now

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncSessionTransaction

    from ._replicas import ReplicaSet
    from .session import AsyncSession

__all__ = [
    "IsolationLevel",
    "TransactionManager",
    "current_transaction",
    "transactional",
]

P = ParamSpec("P")
R = TypeVar("R")

IsolationLevel = Literal[
    "SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED"
]
"""Transaction isolation levels a `TransactionManager` accepts."""

logger = logging.getLogger("dotmac_core.db")

#: Seconds a rollback may take after an error or a cancellation before the
#: connection is invalidated instead (so it never returns to the pool dirty).
ROLLBACK_TIMEOUT = 5.0

_CURRENT: contextvars.ContextVar[TransactionManager | None] = contextvars.ContextVar(
    "dotmac_core_transaction", default=None
)

Callback = Callable[[], Awaitable[None] | None]

_ISOLATION_LEVELS: dict[str, frozenset[str]] = {
    "postgresql": frozenset({"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"}),
    "sqlite": frozenset({"SERIALIZABLE", "READ UNCOMMITTED"}),
}


class _State(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"


class TransactionManager:
    """Run a block in one database transaction: commit on success, roll back otherwise.

    `async with TransactionManager() as tx:` opens a session (`tx.session`)
    and a transaction; leaving the block commits it, an exception or a
    cancellation rolls it back (shielded and bounded, so the connection never
    leaks). Nested use opens a SAVEPOINT. Each instance is entered once.

    Args:
        db: The database; defaults to the one from `configure_database()`.
        read_only: Refuse writes (PostgreSQL `READ ONLY` transaction).
        isolation_level: Isolation for this transaction (outermost only).

    Raises:
        ValidationError: an isolation level or read-only flag on a nested block.
    """

    def __init__(
        self,
        db: Database | None = None,
        *,
        read_only: bool = False,
        isolation_level: IsolationLevel | None = None,
    ) -> None:
        self._db = db
        self.read_only = read_only
        self.isolation_level = isolation_level
        self._state = _State.NEW
        self._session: AsyncSession | None = None
        self._parent: TransactionManager | None = None
        self._savepoint: AsyncSessionTransaction | None = None
        self._callbacks: list[Callback] = []
        self._token: contextvars.Token[TransactionManager | None] | None = None
        self._task: asyncio.Task[Any] | None = None
        #: The replicas of the database: told of a write transaction's commit,
        #: or of the loss of the replica a read-only one runs on.
        self._replicas: ReplicaSet | None = None
        self._replica: Database | None = None

    @property
    def session(self) -> AsyncSession:
        """The session of this transaction (shared with nested blocks)."""
        if self._session is None or self._state is not _State.ACTIVE:
            msg = f"the transaction is {self._state.value}, not active: no session"
            raise DotMacError(msg, code="transaction_inactive")
        return self._session

    @property
    def committed(self) -> bool:
        """Whether the block committed: also when it was cancelled during COMMIT."""
        return self._state is _State.COMMITTED

    @property
    def is_nested(self) -> bool:
        """Whether this block is a SAVEPOINT inside an outer transaction."""
        return self._parent is not None

    def on_commit(self, callback: Callback) -> None:
        """Run `callback` (sync or async) after the outermost transaction commits.

        Callbacks of a savepoint that rolls back are dropped; callbacks never
        run when the transaction rolls back. A failing callback is logged and
        does not stop the others (the data is already committed).
        """
        if self._state is not _State.ACTIVE:
            msg = "on_commit() needs an active transaction"
            raise DotMacError(msg, code="transaction_inactive")
        self._callbacks.append(callback)

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            msg = "a TransactionManager is entered once; create a new one"
            raise DotMacError(msg, code="transaction_reused")
        parent = _CURRENT.get()
        self._task = asyncio.current_task()
        # A savepoint needs the outer transaction's connection, which only the
        # task that opened it may drive; a child task gets its own transaction.
        if (
            parent is not None
            and parent._state is _State.ACTIVE
            and parent._task is self._task
        ):
            await self._begin_nested(parent)
        else:
            await self._begin()
        self._state = _State.ACTIVE
        self._token = _CURRENT.set(self)
        return self

    async def _begin(self) -> None:
        db = self._db or get_database()
        if (
            self.isolation_level is not None
            and self.isolation_level not in _ISOLATION_LEVELS[db.dialect]
        ):
            msg = (
                f"{db.dialect} supports isolation levels "
                f"{sorted(_ISOLATION_LEVELS[db.dialect])}, not {self.isolation_level!r}"
            )
            raise ValidationError(msg, field="isolation_level")
        options: dict[str, Any] = {}
        if self.isolation_level is not None:
            options["isolation_level"] = self.isolation_level
        if db.dialect == "postgresql":
            if self.read_only:
                options["postgresql_readonly"] = True
        elif self.read_only:
            options[SQLITE_READ_ONLY] = True
        else:
            # Take the write lock up front: a deferred transaction that reads
            # first and writes later fails at once with SQLITE_BUSY when
            # another writer got in between.
            options[SQLITE_IMMEDIATE] = True
        replicas = db._replica_set
        if self.read_only and replicas is not None:
            # A read-only block may run on a replica; its BEGIN goes out now,
            # so that a replica found unreachable is left for another.

            async def on_replica(replica: Database) -> tuple[AsyncSession, Database]:
                return await _open(replica, options, begin=True), replica

            with translate_errors():
                found = await replicas.begin_on_replica(on_replica)
            if found is not None:
                self._session, self._replica = found
                self._replicas = replicas
                return
        with translate_errors():
            self._session = await _open(db, options)
        if replicas is not None and not self.read_only:
            self._replicas = replicas

    async def _begin_nested(self, parent: TransactionManager) -> None:
        if self.isolation_level is not None or (
            self.read_only and not parent.read_only
        ):
            msg = "isolation_level and read_only apply to the outermost transaction"
            raise ValidationError(msg, field="isolation_level")
        if (
            self._db is not None
            and parent._db is not None
            and self._db is not parent._db
        ):
            msg = "a nested TransactionManager must use the outer one's database"
            raise DotMacError(msg, code="transaction_database_mismatch")
        self._parent = parent
        self._session = parent.session
        bind_session(self._session.sync_session, current_scope())
        with translate_errors():
            self._savepoint = await self._session.begin_nested()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        if exc is None:
            await self._commit()
            return
        await self._rollback()
        # Driver errors raised by statements inside the block leave it as
        # dotmac_core errors too (so @transactional sees 40001 / 40P01).
        translated = translate_error(exc)
        self._note_lost_replica(translated)
        if translated is not exc:
            raise translated from exc

    async def _commit(self) -> None:
        session = self.session
        cancelled: asyncio.CancelledError | None = None
        try:
            with translate_errors():
                if self._savepoint is not None:
                    await self._savepoint.commit()
                elif self._replicas is None or self._replica is not None:
                    cancelled = await _uninterrupted(session.commit())
                else:
                    pending = self._replicas.before_commit(session)
                    try:
                        cancelled = await _uninterrupted(session.commit())
                    finally:
                        # Also after a failed COMMIT, which may have committed.
                        self._replicas.committed(pending)
        except BaseException as exc:
            await self._rollback()
            if self._note_lost_replica(exc):
                # A read-only transaction has nothing to commit: what it read
                # stands, and the block's next statements were none.
                logger.info("replica lost at the COMMIT of a read-only transaction")
                return
            raise
        self._state = _State.COMMITTED
        if self._parent is not None:
            self._parent._callbacks.extend(self._callbacks)
            return
        if cancelled is None:
            await self._close()
            await self._run_callbacks()
            return
        # Cancelled while COMMIT was on its way: the transaction committed,
        # so what follows a commit happens, then the cancellation goes on.
        with anyio.CancelScope(shield=True):
            await self._close()
            await self._run_callbacks()
        raise cancelled

    def _note_lost_replica(self, error: BaseException) -> bool:
        """Tell the replicas that this block's replica was lost, if `error` says so."""
        if (
            self._replica is None
            or self._replicas is None
            or not isinstance(error, DatabaseConnectionError)
        ):
            return False
        self._replicas.lost(self._replica, error)
        return True

    async def _rollback(self) -> None:
        session = self._session
        self._state = _State.ROLLED_BACK
        self._callbacks.clear()
        if session is None:
            return
        # Shielded and bounded: a cancelled task must still roll back and give
        # the connection back; one that cannot is invalidated, never reused.
        with anyio.CancelScope(shield=True):
            done = False
            with anyio.move_on_after(ROLLBACK_TIMEOUT):
                try:
                    if self._savepoint is not None:
                        # Also when a failed flush already deactivated it: the
                        # session needs this rollback to use the outer again.
                        await self._savepoint.rollback()
                    else:
                        await session.rollback()
                    done = True
                except Exception:
                    logger.warning("rollback failed", exc_info=True)
            if self._parent is None:
                if not done:
                    await session.invalidate()
                await session.close()

    async def _close(self) -> None:
        session = self._session
        if session is None or self._parent is not None:
            return
        if session.sync_session.get_transaction() is None:
            # Committed: the connection is back in the pool and closing only
            # forgets the objects, without I/O (no greenlet needed).
            session.sync_session.close()
            return
        with anyio.CancelScope(shield=True):
            await session.close()

    async def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_commit callback %r failed", callback)


async def _open(
    db: Database, options: dict[str, Any], *, begin: bool = False
) -> AsyncSession:
    """A session of `db` bound to the current tenant, its connection taken.

    With `begin`, the transaction's BEGIN is sent now rather than with the
    first statement.
    """
    session = db.session()
    bind_session(session.sync_session, current_scope())
    try:
        connection = await session.connection(execution_options=options)
        session.remember_connection(connection)
        known = session.remembered_connection() if begin else None
        if known is not None:
            try:
                await begin_now(known[1].dbapi_connection)
            except BaseException:
                # Cut off or failed with its BEGIN under way, the server may
                # hold a transaction the adapter does not know of: the
                # connection must not go back to the pool.
                with anyio.CancelScope(shield=True):
                    await connection.invalidate()
                raise
    except BaseException:
        with anyio.CancelScope(shield=True):
            await session.close()
        raise
    return session


async def _uninterrupted(
    commit: Coroutine[Any, Any, None],
) -> asyncio.CancelledError | None:
    """Run `commit` to its end even if this task is cancelled meanwhile.

    A COMMIT cut off after it was sent may still commit on the server, and
    the caller could not tell. So the commit runs in a task of its own that
    cancellation does not reach, and is awaited to the end; a cancellation
    that arrived meanwhile is returned for the caller to raise once the
    outcome is settled. Errors of the commit itself are raised.
    """
    task = asyncio.ensure_future(commit)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError as exc:
        if task.cancelled():  # the commit itself (the loop is closing)
            raise
        cancelled = exc
    else:
        return None
    # Cancelled meanwhile: wait for the commit to settle, shielded from
    # anyio's cancellations too (they are delivered again at every await).
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
    if task.cancelled():
        raise cancelled
    task.result()  # the commit's own error, if it failed
    return cancelled


def current_transaction() -> TransactionManager | None:
    """Return the innermost active `TransactionManager` of this context, if any."""
    tx = _CURRENT.get()
    return tx if tx is not None and tx._state is _State.ACTIVE else None


def transactional(
    retries: int = 3,
    isolation_level: IsolationLevel | None = None,
    *,
    db: Database | None = None,
    backoff: float = 0.05,
    max_backoff: float = 1.0,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Run the decorated coroutine in a transaction, rerunning it on conflicts.

    A serialization failure or deadlock (SQLSTATE 40001 / 40P01, read from the
    driver error) rolls back and reruns the whole function up to `retries`
    more times, sleeping a jittered, exponentially growing delay (at most
    `max_backoff` seconds). Inside an already active transaction the function
    joins it as a SAVEPOINT and is not retried (only a whole transaction can be).

    Raises:
        TransactionConflictError: still conflicting after the last attempt.
    """
    if retries < 0:
        msg = "retries must be >= 0"
        raise ValidationError(msg, field="retries")

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            outer = current_transaction()
            if outer is not None and outer._task is asyncio.current_task():
                # Joins as a savepoint: only a whole transaction can be rerun.
                async with TransactionManager(db):
                    return await func(*args, **kwargs)
            attempt = 0
            while True:
                try:
                    async with TransactionManager(db, isolation_level=isolation_level):
                        return await func(*args, **kwargs)
                except TransactionConflictError as exc:
                    if attempt >= retries:
                        raise
                    attempt += 1
                    delay = random.uniform(0, min(max_backoff, backoff * 2**attempt))  # noqa: S311
                    logger.info(
                        "transaction conflict (SQLSTATE %s), retry %d/%d in %.3fs",
                        exc.sqlstate,
                        attempt,
                        retries,
                        delay,
                    )
                    await anyio.sleep(delay)

        return wrapper

    return decorate
