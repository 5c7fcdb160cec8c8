"""Fault injection for tests: a switchable TCP proxy, backend kills, failing calls.

Three tools, each for a failure a healthy local server cannot produce by
itself:

- `FaultProxy`: an asyncio TCP proxy on a free loopback port in front of
  PostgreSQL or Redis. Point a client at `proxy.url(real_url)` and switch
  the proxy at runtime: `pass_through()`, `delay(seconds)` (each chunk held
  back), `black_hole()` (reads, never answers, never closes), `reset()` (RST
  on every connection) and `cut_after(n, of="request" | "reply")` (RST once
  `n` more bytes of requests, or of replies, went through). `stop()`
  refuses new connections and closes every open one; `start()` listens
  again on the same port (a restart).
- `kill_backends(url)`: `pg_terminate_backend` on every other backend of the
  URL's PostgreSQL database; returns how many were killed.
- `fail_nth(db, n, on="execute" | "commit")`: makes the `n`-th statement (or
  commit) sent on one `Database`'s pooled connections fail as a lost
  connection does, before it is sent or after its reply came back. It wraps
  the driver methods (asyncpg, aiosqlite) that both the default driver path
  and SQLAlchemy's session use, so it needs no SQLAlchemy events.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import event
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from dotmac_core import Database

__all__ = ["FaultPlan", "FaultProxy", "Mode", "dead_port", "fail_nth", "kill_backends"]

_CHUNK = 65536


class Mode(enum.Enum):
    """What the proxy does with the traffic."""

    PASS = "pass"
    """Forward every byte as it comes."""
    DELAY = "delay"
    """Forward each chunk after `FaultProxy.delay_seconds`."""
    BLACK_HOLE = "black-hole"
    """Accept and read, never answer, never close (a lost network path)."""
    RESET = "reset"
    """Abort every connection with a TCP RST (a crashed peer)."""
    CUT = "cut"
    """Forward `cut_after(n)` more bytes one way, then RST that connection."""


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close `writer`'s socket with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One client connection and, unless it was black-holed, its upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)


class FaultProxy:
    """A TCP proxy to `host:port`, switchable between faults while it runs.

    Use as `async with FaultProxy(host, port) as proxy:`. Counters say what
    reached it: `accepted` connections and `requests` (client chunks read,
    forwarded or swallowed), so a test can assert how many calls a client
    sent while it should have stopped sending.

    Args:
        host: The real server's host.
        port: The real server's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.mode = Mode.PASS
        self.delay_seconds = 0.0
        #: Connections accepted since the start.
        self.accepted = 0
        #: Chunks read from clients since the start (forwarded or swallowed).
        self.requests = 0
        self._cut_budget = 0
        self._cut_replies = False
        #: Connections cut by `cut_after` since the start.
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._forwarded = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening (connections are refused) and abort every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.drop_connections()

    async def drop_connections(self) -> None:
        """Abort every open connection (RST), as a restarted server does."""
        links, self._links = list(self._links), set()
        tasks = [task for link in links for task in link.tasks]
        for link in links:
            link.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def url(self, real_url: str) -> str:
        """`real_url` (PostgreSQL or Redis) pointing at the proxy instead."""
        parts = urlsplit(real_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@" if auth else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    # --- switching -----------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward everything again (connections black-holed so far stay dead)."""
        self.mode = Mode.PASS

    def delay(self, seconds: float) -> None:
        """Hold each chunk back `seconds` before forwarding it (both ways)."""
        self.delay_seconds = seconds
        self.mode = Mode.DELAY

    def black_hole(self) -> None:
        """Swallow everything from now on; answer nothing; close nothing."""
        self.mode = Mode.BLACK_HOLE

    def reset(self) -> None:
        """RST every open connection now, and each new one on arrival."""
        self.mode = Mode.RESET
        for link in list(self._links):
            self._discard(link)
            link.abort()

    def cut_after(
        self, n_bytes: int, *, of: Literal["request", "reply"] = "request"
    ) -> None:
        """Forward `n_bytes` more bytes one way, then RST that connection, once.

        `of="request"` counts the bytes clients send (a request cut short);
        `of="reply"` those the server sends back (a reply cut short, the
        connection reset mid-reply). The proxy passes everything through
        again after the cut.
        """
        if n_bytes < 0:
            msg = f"n_bytes must be 0 or more, got {n_bytes}"
            raise ValueError(msg)
        self._cut_budget = n_bytes
        self._cut_replies = of == "reply"
        self.mode = Mode.CUT

    async def wait_forwarded(self) -> None:
        """Wait until a client chunk is forwarded upstream after this call."""
        self._forwarded.clear()
        await self._forwarded.wait()

    # --- plumbing ------------------------------------------------------------------

    def _discard(self, link: _Link) -> None:
        self._links.discard(link)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        link = _Link(writer)
        if self.mode is Mode.RESET:
            _abort(writer)
            return
        self._links.add(link)
        if self.mode is Mode.BLACK_HOLE:
            link.tasks.append(asyncio.ensure_future(self._swallow(reader)))
            return
        try:
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._links.discard(link)
            _abort(writer)
            return
        link.tasks.append(asyncio.ensure_future(self._pipe(link, reader, True)))
        link.tasks.append(asyncio.ensure_future(self._pipe(link, up_reader, False)))

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(_CHUNK):
                self.requests += 1

    async def _pipe(
        self, link: _Link, reader: asyncio.StreamReader, from_client: bool
    ) -> None:
        target = link.upstream if from_client else link.client
        assert target is not None
        try:
            while data := await reader.read(_CHUNK):
                if from_client:
                    self.requests += 1
                mode = self.mode
                if mode is Mode.BLACK_HOLE:
                    continue
                if mode is Mode.RESET:
                    break
                if mode is Mode.DELAY:
                    await asyncio.sleep(self.delay_seconds)
                if mode is Mode.CUT and from_client != self._cut_replies:
                    if len(data) >= self._cut_budget:
                        target.write(data[: self._cut_budget])
                        with contextlib.suppress(OSError):
                            await target.drain()  # the part before the cut arrives
                        self._cut_budget = 0
                        self.mode = Mode.PASS
                        self.cuts += 1
                        break
                    self._cut_budget -= len(data)
                target.write(data)
                await target.drain()
                if from_client:
                    self._forwarded.set()
            else:
                # A clean end of stream: pass the FIN on.
                with contextlib.suppress(OSError):
                    target.write_eof()
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        self._discard(link)
        link.abort()


# --- PostgreSQL backends ------------------------------------------------------------


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released): free for a server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def kill_backends(url: str) -> int:
    """Terminate every backend of `url`'s database except the one asking.

    Waits (up to 5 s each) until the backends are gone. Returns how many were
    terminated.
    """
    import asyncpg

    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        database=parsed.database,
        timeout=10,
    )
    try:
        killed = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            "FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return int(killed)


# --- the n-th statement or commit fails ---------------------------------------------

_CONTROL = re.compile(
    r"^\s*(;|$|(BEGIN|START|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|END)\b)", re.IGNORECASE
)
_COMMIT = re.compile(r"^\s*(COMMIT|END)\b", re.IGNORECASE)


class InjectedFault(ConnectionResetError):
    """The error `fail_nth` raises on SQLite (PostgreSQL raises asyncpg's own)."""


@dataclass
class FaultPlan:
    """What `fail_nth` watches for, and what it saw."""

    n: int
    on: Literal["execute", "commit"]
    when: Literal["before", "after"]
    #: Matching calls seen so far (the `n`-th one failed).
    seen: int = 0
    #: The SQL of the call that was made to fail, once it happened.
    failed_sql: str | None = None
    #: Every matching call's SQL, in order.
    statements: list[str] = field(default_factory=list)

    @property
    def fired(self) -> bool:
        """Whether the fault happened."""
        return self.failed_sql is not None

    def matches(self, sql: str) -> bool:
        """Whether a call sending `sql` counts towards `n`."""
        if self.on == "commit":
            return bool(_COMMIT.match(sql))
        return not _CONTROL.match(sql)


def _lost(driver: Any) -> BaseException:
    """Abort `driver`'s connection and return the error a lost connection raises."""
    if type(driver).__module__.startswith("aiosqlite"):
        return InjectedFault("connection lost (injected fault)")
    import asyncpg

    driver.terminate()
    return asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation (injected fault)"
    )


def _patch_targets() -> list[tuple[Any, str, Callable[[Any, tuple[Any, ...]], Any]]]:
    """(class, method, how to find (driver connection, sql) from self and args)."""
    targets: list[tuple[Any, str, Callable[[Any, tuple[Any, ...]], Any]]] = []
    with contextlib.suppress(ImportError):
        import asyncpg
        from asyncpg.prepared_stmt import PreparedStatement

        def conn_sql(conn: Any, args: tuple[Any, ...]) -> tuple[Any, str]:
            return conn, str(args[0]) if args else ""

        def stmt_sql(stmt: Any, _args: tuple[Any, ...]) -> tuple[Any, str]:
            return stmt._connection, stmt.get_query()

        names = ("execute", "executemany", "fetch", "fetchrow", "fetchval")
        targets += [(asyncpg.Connection, name, conn_sql) for name in names]
        names = ("fetch", "fetchrow", "fetchval", "executemany")
        targets += [(PreparedStatement, name, stmt_sql) for name in names]
    with contextlib.suppress(ImportError):
        import aiosqlite

        def lite_sql(conn: Any, args: tuple[Any, ...]) -> tuple[Any, str]:
            return conn, str(args[0]) if args else ""

        def cursor_sql(cursor: Any, args: tuple[Any, ...]) -> tuple[Any, str]:
            return cursor._conn, str(args[0]) if args else ""

        def commit_sql(conn: Any, _args: tuple[Any, ...]) -> tuple[Any, str]:
            return conn, "COMMIT"

        names = ("execute", "execute_fetchall", "executemany")
        targets += [(aiosqlite.Connection, name, lite_sql) for name in names]
        targets.append((aiosqlite.Connection, "commit", commit_sql))
        names = ("execute", "executemany")
        targets += [(aiosqlite.Cursor, name, cursor_sql) for name in names]
    return targets


@contextlib.contextmanager
def fail_nth(
    db: Database,
    n: int,
    *,
    on: Literal["execute", "commit"] = "execute",
    when: Literal["before", "after"] = "before",
) -> Iterator[FaultPlan]:
    """Make the `n`-th statement (or commit) on `db`'s connections fail.

    Counted are the statements sent on connections checked out of `db`'s
    pool while the block runs, on either path (the driver path and
    SQLAlchemy's session): `on="execute"` counts every statement except
    transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE) and
    liveness pings; `on="commit"` counts COMMITs. The failing call behaves as
    a lost connection: on PostgreSQL the connection is terminated and asyncpg's
    `ConnectionDoesNotExistError` raised, on SQLite `InjectedFault` (a
    `ConnectionResetError`) raised. With `when="before"` nothing was sent;
    with `when="after"` the call ran on the server (a commit committed) and
    only its reply was lost. One fault per block.

    Yields:
        The `FaultPlan`, whose `seen`, `fired` and `statements` tell what
        happened.
    """
    if n < 1:
        msg = f"n counts from 1, got {n}"
        raise ValueError(msg)
    plan = FaultPlan(n=n, on=on, when=when)
    ours: weakref.WeakSet[Any] = weakref.WeakSet()
    pool = db.engine.sync_engine.pool

    def track(dbapi: Any, _record: Any, _proxy: Any) -> None:
        ours.add(dbapi.driver_connection)

    event.listen(pool, "checkout", track)
    originals: list[tuple[Any, str, Any]] = []

    def wrap(
        original: Callable[..., Awaitable[Any]],
        locate: Callable[[Any, tuple[Any, ...]], Any],
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            driver, sql = locate(self, args)
            if plan.fired or driver not in ours or not plan.matches(sql):
                return await original(self, *args, **kwargs)
            plan.seen += 1
            plan.statements.append(sql)
            if plan.seen != plan.n:
                return await original(self, *args, **kwargs)
            plan.failed_sql = sql
            if when == "after":
                await original(self, *args, **kwargs)
            raise _lost(driver)

        return wrapper

    for cls, name, locate in _patch_targets():
        original = cls.__dict__[name]
        originals.append((cls, name, original))
        setattr(cls, name, wrap(original, locate))
    try:
        yield plan
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
        event.remove(pool, "checkout", track)
