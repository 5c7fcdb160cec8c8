"""The raw-driver baselines: asyncpg on PostgreSQL, aiosqlite on SQLite.

Both classes offer the same small method set, so an operation is written once
with `$1`-style SQL. Each keeps one connection held for the single-connection
operations and a pool for the concurrent one, and converts values the way the
driver needs them (on SQLite: UUIDs as 32-character hex, timestamps as naive
UTC text, which is how SQLAlchemy stores them there).
"""

from __future__ import annotations

import asyncio
import re
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import uuid
    from collections.abc import AsyncIterator, Sequence

__all__ = ["AiosqliteDriver", "AsyncpgDriver", "RawDriver"]


class RawDriver(Protocol):
    """What an operation needs from a raw driver."""

    name: str
    """The driver's package name, shown in the tables."""

    def sql(self, text: str) -> str:
        """Return `text` (written with `$1` placeholders) in the driver's style."""

    def key(self, value: uuid.UUID) -> Any:
        """Return a primary key as the driver sends it."""

    def stamp(self, value: datetime) -> Any:
        """Return an aware timestamp as the driver sends it."""

    def now(self) -> Any:
        """Return the current UTC time as the driver sends it."""

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """Run a query on the held connection; return its first row or `None`."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Run a query on the held connection; return all rows."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Run a query on the held connection; return the first column of row 1."""

    async def execute(self, sql: str, *args: Any) -> None:
        """Run a statement on the held connection in autocommit."""

    async def pooled_fetchrow(self, sql: str, *args: Any) -> Any:
        """Take a pooled connection, run a query, give the connection back."""

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """Return a transaction on the held connection: committed on exit."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Insert `rows` with one executemany inside one transaction."""

    async def empty(self, table: str) -> None:
        """Delete every row of `table` (untimed housekeeping)."""

    async def server_version(self) -> str:
        """Return the database server's version."""

    async def settings(self) -> dict[str, str]:
        """Return the server settings worth recording with the results."""

    async def close(self) -> None:
        """Close the held connection and the pool."""


class AsyncpgDriver:
    """asyncpg: one held connection plus `asyncpg.create_pool()` with defaults.

    The pool is asyncpg's own, as shipped: releasing a connection runs its
    reset query, one round trip per call.
    """

    name = "asyncpg"

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.conn: Any = None
        self.pool: Any = None

    async def open(self, pool_size: int) -> None:
        """Connect the held connection and fill the pool."""
        import asyncpg  # type: ignore[import-untyped]  # only PostgreSQL runs need it

        self.conn = await asyncpg.connect(self._dsn)
        self.pool = await asyncpg.create_pool(
            self._dsn, min_size=pool_size, max_size=pool_size
        )

    def sql(self, text: str) -> str:
        """Return `text` unchanged: asyncpg takes `$1` placeholders."""
        return text

    def key(self, value: uuid.UUID) -> Any:
        """Return the UUID itself (asyncpg encodes it)."""
        return value

    def stamp(self, value: datetime) -> Any:
        """Return the aware datetime itself (asyncpg encodes it)."""
        return value

    def now(self) -> Any:
        """Return `datetime.now(UTC)`."""
        return datetime.now(UTC)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """`Connection.fetchrow` on the held connection."""
        return await self.conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """`Connection.fetch` on the held connection."""
        rows: list[Any] = await self.conn.fetch(sql, *args)
        return rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """`Connection.fetchval` on the held connection."""
        return await self.conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> None:
        """`Connection.execute` on the held connection (autocommit)."""
        await self.conn.execute(sql, *args)

    async def pooled_fetchrow(self, sql: str, *args: Any) -> Any:
        """`Pool.fetchrow`: acquire, query, release (with asyncpg's reset)."""
        return await self.pool.fetchrow(sql, *args)

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """`Connection.transaction()` on the held connection."""
        transaction: AbstractAsyncContextManager[Any] = self.conn.transaction()
        return transaction

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """`Connection.executemany` inside `Connection.transaction()`."""
        async with self.conn.transaction():
            await self.conn.executemany(sql, rows)

    async def copy(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """`Connection.copy_records_to_table` inside one transaction."""
        async with self.conn.transaction():
            await self.conn.copy_records_to_table(
                table, records=rows, columns=list(columns)
            )

    async def empty(self, table: str) -> None:
        """`TRUNCATE` the table."""
        await self.conn.execute(f"TRUNCATE {table}")

    async def server_version(self) -> str:
        """Return PostgreSQL's `server_version`."""
        return str(await self.conn.fetchval("SHOW server_version"))

    async def settings(self) -> dict[str, str]:
        """Return the server settings that move write and noise numbers."""
        names = ("synchronous_commit", "fsync", "autovacuum", "shared_buffers")
        return {name: str(await self.conn.fetchval(f"SHOW {name}")) for name in names}

    async def close(self) -> None:
        """Close the held connection and the pool."""
        if self.pool is not None:
            await self.pool.close()
        if self.conn is not None:
            await self.conn.close()


_PLACEHOLDER = re.compile(r"\$\d+")


class AiosqliteDriver:
    """aiosqlite: one held autocommit connection plus a queue of 20 as a pool.

    Every connection gets the pragmas `Database` sets on its own (WAL,
    `synchronous=NORMAL`, foreign keys, busy timeout), so both write with the
    same durability. Each statement is one `execute_fetchall`: one hop to the
    connection's thread.
    """

    name = "aiosqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self.conn: Any = None
        self._pool: asyncio.Queue[Any] = asyncio.Queue()
        self._pooled: list[Any] = []

    async def _connect(self) -> Any:
        import aiosqlite  # imported here: only SQLite runs need it

        conn = await aiosqlite.connect(self._path, isolation_level=None)
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA busy_timeout=5000",
        ):
            await conn.execute_fetchall(pragma)
        return conn

    async def open(self, pool_size: int) -> None:
        """Connect the held connection and the pooled ones."""
        self.conn = await self._connect()
        for _ in range(pool_size):
            conn = await self._connect()
            self._pooled.append(conn)
            self._pool.put_nowait(conn)

    def sql(self, text: str) -> str:
        """Return `text` with `$n` placeholders turned into `?`."""
        return _PLACEHOLDER.sub("?", text)

    def key(self, value: uuid.UUID) -> Any:
        """Return the UUID as SQLAlchemy stores it on SQLite: 32 hex digits."""
        return value.hex

    def stamp(self, value: datetime) -> Any:
        """Return naive UTC text, SQLAlchemy's SQLite timestamp format."""
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    def now(self) -> Any:
        """Return the current UTC time as SQLite timestamp text."""
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """One `execute_fetchall` on the held connection; the first row."""
        rows = await self.conn.execute_fetchall(sql, args)
        return rows[0] if rows else None

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """One `execute_fetchall` on the held connection."""
        return list(await self.conn.execute_fetchall(sql, args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One `execute_fetchall` on the held connection; row 1, column 1."""
        rows = await self.conn.execute_fetchall(sql, args)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, *args: Any) -> None:
        """One `execute_fetchall` on the held connection (autocommit)."""
        await self.conn.execute_fetchall(sql, args)

    async def pooled_fetchrow(self, sql: str, *args: Any) -> Any:
        """Take a connection from the queue, query, put it back."""
        conn = await self._pool.get()
        try:
            rows = await conn.execute_fetchall(sql, args)
        finally:
            self._pool.put_nowait(conn)
        return rows[0] if rows else None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """`BEGIN IMMEDIATE` ... `COMMIT` (`ROLLBACK` on error), held connection."""
        await self.conn.execute_fetchall("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self.conn.execute_fetchall("ROLLBACK")
            raise
        await self.conn.execute_fetchall("COMMIT")

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """`BEGIN`, one `executemany`, `COMMIT` on the held connection."""
        await self.conn.execute_fetchall("BEGIN")
        try:
            await self.conn.executemany(sql, rows)
        except BaseException:
            await self.conn.execute_fetchall("ROLLBACK")
            raise
        await self.conn.execute_fetchall("COMMIT")

    async def empty(self, table: str) -> None:
        """`DELETE FROM` the table."""
        await self.conn.execute_fetchall(f"DELETE FROM {table}")  # noqa: S608 - our table

    async def server_version(self) -> str:
        """Return the SQLite library version."""
        return str(await self.fetchval("SELECT sqlite_version()"))

    async def settings(self) -> dict[str, str]:
        """Return the pragmas every connection of the run uses."""
        return {
            "journal_mode": str(await self.fetchval("PRAGMA journal_mode")),
            "synchronous": "NORMAL",
        }

    async def close(self) -> None:
        """Close every connection."""
        for conn in [self.conn, *self._pooled]:
            if conn is not None:
                await conn.close()
