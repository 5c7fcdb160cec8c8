"""The toolkit's session classes: tenant-bound, and guarded against concurrent use.

Every session made by a `Database` is one of these. Its sync half carries the
tenant and soft-delete scoping (see `scoping.py`); its async half refuses to
be driven by two tasks at the same time, which SQLAlchemy would otherwise
interleave silently on one connection.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlmodel.ext.asyncio.session import AsyncSession as _SQLModelAsyncSession

from ..exceptions import DotMacError
from .scoping import ScopedSession

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["AsyncSession", "ConcurrentSessionUseError"]

_CONNECTION = "dotmac_driver_connection"


class ConcurrentSessionUseError(DotMacError, RuntimeError):
    """One session (or transaction) was used by two tasks at the same time."""

    default_code = "concurrent_session_use"


def _guarded(
    method: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def wrapper(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        with self.exclusive():
            return await method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__qualname__ = method.__qualname__
    wrapper.__doc__ = method.__doc__
    return wrapper


class AsyncSession(_SQLModelAsyncSession):
    """SQLModel's `AsyncSession`, used by one task at a time and scoped by tenant.

    A second task that calls into the session while another task's call is in
    flight gets `ConcurrentSessionUseError` instead of silently sharing the
    connection. Sequential use from different tasks is fine.
    """

    sync_session_class = ScopedSession
    sync_session: ScopedSession

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the session for the current task during the block (re-entrant).

        Raises:
            ConcurrentSessionUseError: another task's call is in flight.
        """
        task = asyncio.current_task()
        if self._depth and self._owner is not task:
            msg = (
                "this session is in use by another task; give each task its own "
                "session (or TransactionManager) instead of sharing one"
            )
            raise ConcurrentSessionUseError(msg)
        self._owner = task
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._owner = None

    def remember_connection(self, connection: AsyncConnection) -> None:
        """Note `connection` as the one of the session's innermost transaction.

        The driver path reuses it for the transaction's life instead of asking
        the session (two greenlet hops a call). Call it right after the
        session handed the connection out: reading its pooled connection then
        needs no I/O.
        """
        sync = self.sync_session
        current = sync.get_nested_transaction() or sync.get_transaction()
        fairy = connection.sync_connection
        if fairy is None:  # not started: nothing to remember
            return
        sync.info[_CONNECTION] = (current, connection, fairy.connection)

    def remembered_connection(self) -> tuple[AsyncConnection, Any] | None:
        """The connection noted for the innermost transaction and its pooled one.

        `None` when none was noted for this transaction or it was invalidated.
        """
        sync = self.sync_session
        known = sync.info.get(_CONNECTION)
        if known is None:
            return None
        current = sync.get_nested_transaction() or sync.get_transaction()
        if current is None or known[0] is not current or not known[2].is_valid:
            return None
        return known[1], known[2]

    if not TYPE_CHECKING:  # the parent's precise signatures stay visible to mypy
        exec = _guarded(_SQLModelAsyncSession.exec)
        execute = _guarded(_SQLModelAsyncSession.execute)
        scalar = _guarded(_SQLModelAsyncSession.scalar)
        scalars = _guarded(_SQLModelAsyncSession.scalars)
        get = _guarded(_SQLModelAsyncSession.get)
        flush = _guarded(_SQLModelAsyncSession.flush)
        commit = _guarded(_SQLModelAsyncSession.commit)
        refresh = _guarded(_SQLModelAsyncSession.refresh)
        merge = _guarded(_SQLModelAsyncSession.merge)
        delete = _guarded(_SQLModelAsyncSession.delete)
        run_sync = _guarded(_SQLModelAsyncSession.run_sync)


async def begin_now(adapted: Any) -> bool:
    """Send the BEGIN that SQLAlchemy's asyncpg adapter holds back; whether it did.

    The adapter begins its transaction (isolation level, read only, as the
    session set them) with the first statement. Asking it to do that now, by
    its own method, lets the first statement of a transaction run on the
    driver too: the same BEGIN, sent at the same point, by the same code.
    Where the adapter has no such method, the statement runs through
    SQLAlchemy, which sends the BEGIN itself.
    """
    start = getattr(adapted, "_start_transaction", None)
    if start is None or getattr(adapted, "_transaction", True) is not None:
        return False
    if getattr(adapted, "isolation_level", None) == "autocommit":
        return False
    await start()
    return getattr(adapted, "_transaction", None) is not None
