"""Read replicas: which database a read goes to, and reading your own writes (private).

A `Database` made with replicas keeps a `Database` per hot standby. A read
outside a write transaction goes to the replicas in turn; one that cannot be
reached is left out for `replica_retry_after` seconds, after which a probe in
the background lets it back in, so no call waits on a dead replica twice. A
read that finds no replica it may use runs on the primary.

Read-your-writes: a write that commits notes, in the context of the task
that made it, the primary's WAL insert position read just after its COMMIT
(`pg_current_wal_insert_lsn()`, at or past the commit record). Reads in
that context go to a replica only once it is known to have replayed past
that position (`pg_last_wal_replay_lsn()`, probed in the background while
the reads run on the primary), so they never see the database from before
the write; other contexts carry no note and keep reading from replicas. In
`window` mode, or when the position could not be read, the note lasts
`read_your_writes_window` seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
from sqlalchemy import event
from sqlalchemy.util import await_only

from ..exceptions import (
    DatabaseConnectionError,
    TransactionConflictError,
    translate_error,
)
from ._driver import driver_for
from .scoping import ScopedSession

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from sqlalchemy.orm import Session

    from ..config import DatabaseConfig
    from .database import Database
    from .session import AsyncSession

__all__ = ["ReplicaSet", "carry", "parse_lsn", "written_here"]

logger = logging.getLogger("dotmac_core.db")

T = TypeVar("T")

#: The primary's WAL position at or past every record inserted so far,
#: the committing transaction's included.
_WRITTEN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
#: How far a hot standby has replayed (NULL on a server not in recovery).
_REPLAYED_SQL = "SELECT pg_last_wal_replay_lsn()::text"
#: Seconds between two probes of one replica's replay position.
PROBE_EVERY = 0.01
#: What `ReplicaSet._on_a_replica` gives when no replica may serve.
_NO_REPLICA = object()
#: `Session.info` key of the hook that reads the commit's WAL position.
_AFTER_COMMIT = "dotmac_after_commit"


def parse_lsn(text: str) -> int:
    """A WAL position as PostgreSQL prints it (`16/B374D848`) as one number."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True, slots=True)
class Written:
    """What a context wrote last: the WAL position, or until when to trust none."""

    lsn: int | None
    until: float


#: What each context wrote, per replica set; replaced, never changed in place.
_WRITTEN: contextvars.ContextVar[Mapping[ReplicaSet, Written] | None] = (
    contextvars.ContextVar("dotmac_core_written", default=None)
)


class _Replica:
    """One replica's `Database` and what is known of it."""

    __slots__ = ("database", "healthy", "probe", "probed_at", "replayed", "retry_at")

    def __init__(self, database: Database) -> None:
        self.database = database
        self.healthy = True
        self.retry_at = 0.0
        #: The replay position last read; -1: the server is not a standby.
        self.replayed = 0
        self.probed_at = 0.0
        self.probe: asyncio.Task[None] | None = None


class _Pending:
    """The WAL position a committing transaction's hook read (`None`: not read)."""

    __slots__ = ("lsn",)

    def __init__(self) -> None:
        self.lsn: int | None = None


class ReplicaSet:
    """The replicas of one `Database` and the routing of its reads."""

    def __init__(
        self, primary: Database, replicas: Sequence[Database], config: DatabaseConfig
    ) -> None:
        self.primary = primary
        self.members = tuple(_Replica(database) for database in replicas)
        self._turn = 0
        self._lsn = config.read_your_writes == "lsn"
        self._window = config.read_your_writes_window
        self._retry_after = config.replica_retry_after
        self._probe_timeout = config.connect_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        _install_after_commit()

    # -- where a read goes --------------------------------------------------

    def _choose(self) -> _Replica | None:
        """The replica the next read in this context may use, or `None`: the primary."""
        members = self.members
        marks = _WRITTEN.get()
        mark = None if marks is None else marks.get(self)
        now = time.monotonic()
        if mark is not None and mark.lsn is None and now >= mark.until:
            self._forget(mark)
            mark = None
        count = len(members)
        start = self._turn
        self._turn = (start + 1) % count
        for step in range(count):
            member = members[(start + step) % count]
            if not member.healthy:
                if now >= member.retry_at:
                    self._probe(member, now)
                continue
            if mark is None:
                return member
            if mark.lsn is not None:
                if member.replayed >= mark.lsn:
                    return member
                self._probe(member, now)
        return None

    async def read(self, attempt: Callable[[Database], Awaitable[T]]) -> T:
        """Run `attempt` on a replica this context may read from, else on the primary.

        A replica that cannot be reached is left out and the read goes on to
        the next one, then to the primary; one that cancelled the statement
        for a conflict with its recovery (SQLSTATE 40001) hands it to the
        primary. Any other error is the read's own and is raised.
        """
        try:
            result = await self._on_a_replica(attempt)
        except Exception as exc:
            if isinstance(translate_error(exc), TransactionConflictError):
                return await attempt(self.primary)
            raise
        if result is _NO_REPLICA:
            return await attempt(self.primary)
        return cast("T", result)

    async def begin_on_replica(
        self, begin: Callable[[Database], Awaitable[T]]
    ) -> T | None:
        """Run `begin` (a read-only transaction's start) on a usable replica.

        `None` when there is none: the transaction begins on the primary.
        """
        result = await self._on_a_replica(begin)
        return None if result is _NO_REPLICA else cast("T", result)

    async def _on_a_replica(
        self, attempt: Callable[[Database], Awaitable[T]]
    ) -> object:
        """`attempt` on the first usable replica, leaving out unusable ones.

        `_NO_REPLICA` when none is left; any other error is raised.
        """
        while True:
            member = self._choose()
            if member is None:
                return _NO_REPLICA
            try:
                return await attempt(member.database)
            except Exception as exc:
                error = translate_error(exc)
                if not _unusable(error):
                    raise
                self._down(member, error)

    def lost(self, database: Database, error: BaseException) -> None:
        """Leave out the replica `database` (its connection was lost in use)."""
        for member in self.members:
            if member.database is database:
                self._down(member, error)

    def _down(self, member: _Replica, error: BaseException) -> None:
        if member.healthy:
            logger.warning(
                "replica %r cannot serve reads (%s): they go to the other "
                "replicas or the primary; checked again in %.1f s",
                member.database.url,
                error,
                self._retry_after,
            )
        member.healthy = False
        member.retry_at = time.monotonic() + self._retry_after

    # -- what replicas have replayed ----------------------------------------

    def _probe(self, member: _Replica, now: float) -> None:
        """Read `member`'s replay position in the background (at most one at a time)."""
        if member.probe is not None or now - member.probed_at < PROBE_EVERY:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - reads always run in a loop
            return
        member.probed_at = now
        task = loop.create_task(self._check(member))
        member.probe = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, member: _Replica) -> None:
        try:
            with anyio.fail_after(self._probe_timeout):
                value = await _fetch_value(member.database, _REPLAYED_SQL)
        except Exception as exc:  # noqa: BLE001 - any failure: not usable now
            self._down(member, translate_error(exc))
            return
        finally:
            member.probe = None
        if value is None:
            if member.replayed != -1:
                logger.warning(
                    "replica %r is not in recovery (not a standby): reads after a "
                    "write stay on the primary",
                    member.database.url,
                )
            member.replayed = -1
        else:
            member.replayed = max(member.replayed, parse_lsn(value))
        if not member.healthy:
            logger.info("replica %r reachable again", member.database.url)
        member.healthy = True

    # -- reading your own writes --------------------------------------------

    def wrote(self, lsn: int | None) -> None:
        """Note in this context that it wrote, up to `lsn` (`None`: not known)."""
        marks = _WRITTEN.get() or {}
        until = time.monotonic() + self._window
        _WRITTEN.set({**marks, self: Written(lsn, until)})

    def _forget(self, mark: Written) -> None:
        marks = dict(_WRITTEN.get() or {})
        if marks.get(self) is mark:
            del marks[self]
            _WRITTEN.set(marks)

    async def after_pooled_write(self, connection: Any) -> None:
        """Note a write committed on `connection` (a driver connection, autocommit)."""
        self.wrote(None)  # until the position is known, or if it cannot be
        if not self._lsn:
            return
        try:
            value = await connection.fetchval(_WRITTEN_SQL)
        except Exception:  # the write stands; the window covers it
            logger.warning("could not read the WAL position of a write", exc_info=True)
            return
        self.wrote(parse_lsn(value))

    def before_commit(self, session: AsyncSession) -> _Pending:
        """Have `session`'s next COMMIT read the WAL position on its connection.

        Read in SQLAlchemy's `after_commit` event, after the COMMIT and before
        the connection goes back to the pool, on the driver connection the
        transaction ran on; noted in this context by `committed`.
        """
        pending = _Pending()
        if self._lsn:
            session.sync_session.info[_AFTER_COMMIT] = (session, pending)
        return pending

    def committed(self, pending: _Pending) -> None:
        """Note the transaction `before_commit` prepared as written."""
        self.wrote(pending.lsn)

    async def aclose(self) -> None:
        """Stop the probes under way (those of this event loop are awaited)."""
        loop = asyncio.get_running_loop()
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                task.cancel()
        for task in tasks:
            if task.get_loop() is loop:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # a probe catches its own errors
        for member in self.members:
            member.probe = None  # used again, the database probes afresh


def _unusable(error: BaseException) -> bool:
    """Whether `error` says the replica cannot serve anyone, not this statement.

    Unreachable or lost, and also refusing the login (SQLSTATE class 28) or
    lacking the database (3D000): a replica set up wrong is left out (with
    its WARNING) rather than failing the reads the primary can serve.
    """
    if isinstance(error, DatabaseConnectionError):
        return True
    state = getattr(error, "sqlstate", None) or ""
    return state.startswith("28") or state == "3D000"


def written_here() -> Mapping[ReplicaSet, Written] | None:
    """What this context noted as written (to carry out of a task of its own)."""
    return _WRITTEN.get()


def carry(marks: Mapping[ReplicaSet, Written] | None) -> None:
    """Note here what a task started from this context noted (`written_here`)."""
    if marks and marks is not _WRITTEN.get():
        _WRITTEN.set({**(_WRITTEN.get() or {}), **marks})


async def _fetch_value(database: Database, sql: str) -> Any:
    """One value of `sql`, on a pooled driver connection of `database`."""
    driver = driver_for(database.engine.sync_engine)
    assert driver is not None  # noqa: S101 - every PostgreSQL database has one

    async def fetch(connection: Any) -> Any:
        return await connection.fetchval(sql)

    return await driver.use(fetch, retry=True)


_installed = False


def _install_after_commit() -> None:
    global _installed
    if not _installed:
        event.listen(ScopedSession, "after_commit", _read_commit_position)
        _installed = True


def _read_commit_position(sync_session: Session) -> None:
    """Read the WAL position on the connection that just committed (in its greenlet)."""
    noted = sync_session.info.pop(_AFTER_COMMIT, None)
    if noted is None:
        return
    session, pending = noted
    known = session.remembered_connection()
    if known is None:
        return  # the window covers the write
    try:
        value = await_only(known[1].driver_connection.fetchval(_WRITTEN_SQL))
    except Exception:  # committed; the window covers it
        logger.warning("could not read the WAL position of a commit", exc_info=True)
        return
    pending.lsn = parse_lsn(value)
