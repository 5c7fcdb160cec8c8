"""`Database`: the async engine, its session factory, and the default registry."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import anyio
from pydantic import SecretStr
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool

from .._registry import Default
from ..config import DatabaseConfig
from ..exceptions import ConfigurationError, translate_errors
from ..guards import require_database
from ._driver import DriverExecutor, driver_for, register_driver
from ._pool import (
    connect_hook_supported,
    connect_to_the_end,
    install_cancel_safe_terminate,
    install_liveness_check,
    install_sqlite_reset,
    install_sync_checkout,
)
from ._replicas import ReplicaSet
from .models import DBBaseModel, check_metadata_links
from .session import AsyncSession

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from types import TracebackType

    from sqlalchemy import Connection, MetaData
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["Database", "configure_database", "get_database"]

logger = logging.getLogger("dotmac_core.db")

#: Execution option: open the SQLite transaction with BEGIN IMMEDIATE (write lock).
SQLITE_IMMEDIATE = "dotmac_sqlite_immediate"
#: Execution option: make the SQLite transaction read-only (PRAGMA query_only).
SQLITE_READ_ONLY = "dotmac_sqlite_read_only"


class Database:
    """An async engine plus a session factory, built from a URL or a `DatabaseConfig`.

    Sessions do not expire objects on commit, so attributes stay readable
    after a commit without implicit I/O. Use as `async with Database(url) as db:`
    to dispose of the pool on exit.

    Args:
        config: A URL (str or `sqlalchemy.URL`) or a `DatabaseConfig`; `None`
            reads `DatabaseConfig()` from the environment.
        replicas: URLs of PostgreSQL hot standbys, over the config's
            `replicas`: reads outside a write transaction go to them (see
            `docs/scaling.md`).
        **engine_options: Passed to `create_async_engine`, over the defaults
            (for the replicas' engines too).

    Raises:
        ConfigurationError: the URL or a setting is invalid.
        MissingDependencyError: the database's driver extra is not installed.
    """

    def __init__(
        self,
        config: str | URL | DatabaseConfig | None = None,
        *,
        replicas: Sequence[str | URL] | None = None,
        **engine_options: Any,
    ) -> None:
        if config is None:
            config = DatabaseConfig()
        elif isinstance(config, URL):
            config = DatabaseConfig(url=config.render_as_string(hide_password=False))
        elif isinstance(config, str):
            config = DatabaseConfig(url=config)
        if replicas is not None:
            config = _with_replicas(config, replicas)
        self.config: DatabaseConfig = config
        given_options = dict(engine_options)
        self.url: URL = config.sqlalchemy_url()
        self.dialect: str = config.dialect
        require_database("sqlite" if self.dialect == "sqlite" else "postgresql")
        if self.dialect == "sqlite":
            engine_url, options = _check_sqlite_url(self.url), _sqlite_options(config)
        else:
            engine_url, url_args = _pg_url_options(self.url)
            options = _pg_options(config)
            _merge_connect_args(options["connect_args"], url_args)
        connect_args = engine_options.pop("connect_args", None)
        options.update(engine_options)
        if connect_args is not None:
            # Added to the computed driver arguments (server settings, timeouts),
            # not instead of them.
            computed = options.get("connect_args", {})
            options["connect_args"] = {**computed, **connect_args}
        self.engine: AsyncEngine = create_async_engine(engine_url, **options)
        # Calls outside a transaction run on the driver (see `_driver.py`),
        # on PostgreSQL and SQLite files. A memory database is one connection
        # shared by every session (StaticPool): no call may run beside a
        # transaction there.
        driver = True
        if self.dialect == "sqlite":
            _install_sqlite_hooks(self.engine, config)
            driver = not _is_memory(config)
            if driver:
                install_sqlite_reset(self.engine)
        else:
            install_liveness_check(self.engine, ping=config.pool_pre_ping)
            install_cancel_safe_terminate(self.engine)
            if config.tcp_keepalive_timeout is not None:
                _install_tcp_keepalive(self.engine, config.tcp_keepalive_timeout)
        if driver:
            install_sync_checkout(self.engine)
            register_driver(
                self.engine.sync_engine,
                DriverExecutor(
                    self.engine,
                    sync_checkout=not options.get("pool_pre_ping"),
                    max_overflow=options.get("max_overflow"),
                ),
            )
        self.session_factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, class_=AsyncSession, expire_on_commit=False
        )
        # One-statement reads need no transaction: on PostgreSQL they run in
        # autocommit, one round trip instead of BEGIN + statement + ROLLBACK.
        # (Not on SQLite: leaving autocommit resets the driver's transaction
        # handling that the savepoint workaround turned off.)
        reads = self.engine
        if self.dialect == "postgresql":
            reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._read_factory = async_sessionmaker(
            reads, class_=AsyncSession, expire_on_commit=False
        )
        #: The hot standbys reads may go to, one `Database` each (docs/scaling.md).
        self.replicas: tuple[Database, ...] = ()
        self._replica_set: ReplicaSet | None = None
        if config.replicas:
            self._start_replicas(config, given_options)

    def _start_replicas(
        self, config: DatabaseConfig, engine_options: dict[str, Any]
    ) -> None:
        if self.dialect != "postgresql":
            msg = "replicas are PostgreSQL hot standbys: the primary must be PostgreSQL"
            raise ConfigurationError(msg, field="replicas")
        self.replicas = tuple(
            Database(
                config.model_copy(
                    update={
                        "url": SecretStr(url.render_as_string(hide_password=False)),
                        "replicas": [],
                    }
                ),
                **engine_options,
            )
            for url in config.replica_urls()
        )
        self._replica_set = ReplicaSet(self, self.replicas, config)
        driver = driver_for(self.engine.sync_engine)
        if driver is not None:
            driver.after_write = self._replica_set.after_pooled_write

    def __repr__(self) -> str:
        # URL's repr masks the password
        if self.replicas:
            replicas = [replica.url for replica in self.replicas]
            return f"Database({self.url!r}, replicas={replicas!r})"
        return f"Database({self.url!r})"

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[AsyncSession]:
        """A session for reads outside any transaction, closed on exit.

        On PostgreSQL it runs in autocommit (each statement its own snapshot,
        as READ COMMITTED gives anyway); on SQLite in a plain deferred
        transaction that is rolled back on exit. Do not write through it.
        """
        session = self._read_factory()
        try:
            yield session
        finally:
            # Shielded: a cancelled reader must still give the connection back.
            with anyio.CancelScope(shield=True):
                await session.close()

    def session(self) -> AsyncSession:
        """Return a new `AsyncSession` (close it, or use it with `async with`)."""
        return self.session_factory()

    async def create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of `metadata` (default: `DBBaseModel.metadata`).

        The default holds every `DBBaseModel` and `PlainModel` table (one
        `MetaData`); tables of classes based on `SQLModel` itself are on
        `SQLModel.metadata`: pass it to create those.

        Raises:
            ConfigurationError: a foreign key links a table of
                `SQLModel.metadata` with one of `DBBaseModel.metadata`.
        """
        check_metadata_links()
        target = DBBaseModel.metadata if metadata is None else metadata
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.run_sync(target.create_all)

    async def drop_all(self, metadata: MetaData | None = None) -> None:
        """Drop the tables of `metadata` (default: `DBBaseModel.metadata`'s)."""
        check_metadata_links()
        target = DBBaseModel.metadata if metadata is None else metadata
        with translate_errors():
            async with self.engine.begin() as conn:
                await conn.run_sync(target.drop_all)

    async def ping(self) -> None:
        """Run `SELECT 1`; raise a `DotMacError` if the database does not answer."""
        with translate_errors():
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")

    async def dispose(self) -> None:
        """Close every pooled connection (replicas' too); used again, it reconnects."""
        if self._replica_set is not None:
            await self._replica_set.aclose()
        for replica in self.replicas:
            await replica.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()


def _with_replicas(
    config: DatabaseConfig, replicas: Sequence[str | URL]
) -> DatabaseConfig:
    """`config` with `replicas` for its replicas, checked as the config checks them."""
    urls = [
        r.render_as_string(hide_password=False) if isinstance(r, URL) else r
        for r in replicas
    ]
    values = {
        name: getattr(config, name)
        for name in config.model_fields_set
        if name != "replicas"
    }
    return DatabaseConfig(**values, replicas=urls)


def _pool_options(config: DatabaseConfig) -> dict[str, Any]:
    return {
        "echo": config.echo,
        "pool_pre_ping": config.pool_pre_ping,
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.pool_timeout,
        "pool_recycle": -1 if config.pool_recycle is None else config.pool_recycle,
    }


def _pg_options(config: DatabaseConfig) -> dict[str, Any]:
    # `pool_pre_ping` is done by `install_liveness_check`, at a fraction of
    # the cost of SQLAlchemy's BEGIN + statement + ROLLBACK per checkout.
    server_settings: dict[str, str] = {}
    if config.application_name:
        server_settings["application_name"] = config.application_name
    if config.statement_timeout is not None:
        server_settings["statement_timeout"] = str(int(config.statement_timeout * 1000))
    # Three bounds, so that no call waits forever on a database that stopped
    # answering, each for a failure the others cannot see:
    # - `timeout` (connect_timeout): asyncpg waits 60 s by default for a
    #   server that accepts the TCP connection and then says nothing.
    # - TCP keepalive and TCP_USER_TIMEOUT (`_install_tcp_keepalive`): a
    #   network path that drops packets. A live server's kernel answers the
    #   probes even while a query runs for hours, so this never ends a long
    #   query; it ends a statement whose server is gone within
    #   `tcp_keepalive_timeout`. asyncpg has no keepalive options (libpq's
    #   `keepalives_*` and `tcp_user_timeout`), and `server_settings` reach
    #   the server, not the client's socket: they are set on the socket.
    # - `command_timeout`: a peer that keeps the connection alive and never
    #   replies (a hung server, a stalled proxy) looks like a long query to
    #   every TCP mechanism; only a client-side limit ends it. Its default
    #   is long (300 s) so that it is a last resort, not a query limit.
    connect_args: dict[str, Any] = {
        "server_settings": server_settings,
        "timeout": config.connect_timeout,
    }
    if config.command_timeout is not None:
        connect_args["command_timeout"] = config.command_timeout
    if connect_hook_supported():
        # A connect cut off by a cancellation finishes in the background
        # (asyncpg leaves an unretrieved future otherwise; see _pool.py).
        connect_args["async_creator_fn"] = connect_to_the_end
    if config.pgbouncer:
        # Transaction-mode poolers hand each transaction, and each statement
        # outside one, to any server connection: a statement prepared in one
        # round trip may be missing in the next. With both caches off and the
        # name "" (PostgreSQL's unnamed statement) nothing is prepared by
        # name: asyncpg, its cache off, sends an unnamed statement's Parse
        # again with its Bind, so each round trip stands alone. (Unique
        # names, SQLAlchemy's recipe, still fail in autocommit, where the
        # name is looked up on another server connection, and leave each
        # statement behind on the server.)
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: ""
    return {
        **_pool_options(config),
        "pool_pre_ping": False,
        "connect_args": connect_args,
    }


#: libpq's TLS options, which asyncpg reads from a connection string only:
#: they reach it as one (`dsn=`), beside the arguments SQLAlchemy passes.
_PG_DSN_OPTIONS = frozenset(
    {"sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword"}
    | {"sslnegotiation", "ssl_min_protocol_version", "ssl_max_protocol_version"}
)
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: Options SQLAlchemy's asyncpg dialect or `asyncpg.connect` take as they are.
_PG_PASSED_OPTIONS = frozenset(
    {"host", "port", "prepared_statement_cache_size", "target_session_attrs"}
    | {"passfile", "service", "servicefile", "krbsrvname", "gsslib", "ssl"}
)
#: `asyncpg.connect` arguments given in the URL as text, and their types.
_PG_TYPED_OPTIONS: dict[str, type[int] | type[float]] = {
    "command_timeout": float,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
}
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _pg_url_options(url: URL) -> tuple[URL, dict[str, Any]]:
    """Split a PostgreSQL URL's query into what asyncpg takes and the URL's rest.

    asyncpg takes keyword arguments, not libpq's connection-string options,
    and SQLAlchemy passes the query on as keywords, so `?sslmode=disable`
    would fail at connect. Read here: libpq's TLS options (through `dsn=`),
    `application_name` and `options=-c name=value` (server settings),
    `connect_timeout` (seconds), and asyncpg's own numeric arguments.

    Raises:
        ConfigurationError: an option asyncpg cannot use, or a bad value.
    """
    args: dict[str, Any] = {}
    settings: dict[str, str] = {}
    dsn: dict[str, str] = {}
    kept: dict[str, Any] = {}
    for key, given in url.query.items():
        value = given if isinstance(given, str) else given[-1]
        if key in _PG_PASSED_OPTIONS:
            kept[key] = given
        elif key in _PG_DSN_OPTIONS:
            if key == "sslmode" and value not in _SSL_MODES:
                msg = f"sslmode must be one of {', '.join(_SSL_MODES)}"
                raise ConfigurationError(msg, field="url")
            dsn[key] = value
        elif key == "application_name":
            settings["application_name"] = value
        elif key == "options":
            settings.update(_server_options(value))
        elif key == "connect_timeout":
            args["timeout"] = _number(key, value, float)
        elif key in _PG_TYPED_OPTIONS:
            args[key] = _number(key, value, _PG_TYPED_OPTIONS[key])
        else:
            msg = (
                f"PostgreSQL URL option {key!r} is not one asyncpg takes: write "
                "server settings as options=-c%20name%3Dvalue (or "
                "connect_args={'server_settings': {...}}), other driver "
                "arguments as connect_args={...}"
            )
            raise ConfigurationError(msg, field="url")
    if dsn:
        args["dsn"] = URL.create("postgresql", query=dsn).render_as_string()
    if settings:
        args["server_settings"] = settings
    return url.set(query=kept), args


def _number(key: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if number < 0 or (key.endswith("timeout") and number == 0):
        msg = f"PostgreSQL URL option {key}={value!r}: give a positive number"
        raise ConfigurationError(msg, field="url")
    return number


def _server_options(value: str) -> dict[str, str]:
    """The server settings in libpq's `options`: `-c name=value`, `--name=value`."""
    settings: dict[str, str] = {}
    words = iter(value.split())
    for word in words:
        pair = next(words, "") if word == "-c" else ""
        if word.startswith(("--", "-c")) and word != "-c":
            pair = word[2:]
        name, equals, setting = pair.partition("=")
        name = name.replace("-", "_")
        if not equals or not _SETTING.fullmatch(name):
            msg = (
                "PostgreSQL URL option options= takes server settings as "
                "-c name=value, separated by spaces"
            )
            raise ConfigurationError(msg, field="url")
        settings[name] = setting
    return settings


def _merge_connect_args(connect_args: dict[str, Any], url_args: dict[str, Any]) -> None:
    """Put the URL's driver arguments over the config's (server settings merged)."""
    settings = url_args.pop("server_settings", None)
    connect_args.update(url_args)
    if settings:
        connect_args["server_settings"] = {
            **connect_args.get("server_settings", {}),
            **settings,
        }


def keepalive_options(seconds: float) -> list[tuple[int, int, int]]:
    """The socket options that declare a connection dead after `seconds` of silence.

    Probes start after half of it, then every sixth, three of them; sent
    data unacknowledged for `seconds` also ends the connection (Linux's
    `TCP_USER_TIMEOUT`, which bounds the probes as well). Options the
    platform lacks are left out (`TCP_KEEPALIVE` is macOS's `TCP_KEEPIDLE`).
    """
    idle = max(1, int(seconds / 2))
    interval = max(1, int((seconds - idle) / 3))
    idle_name = "TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE"
    wanted = {
        idle_name: idle,
        "TCP_KEEPINTVL": interval,
        "TCP_KEEPCNT": 3,
        "TCP_USER_TIMEOUT": int(seconds * 1000),
    }
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    options.extend(
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in wanted.items()
        if hasattr(socket, name)
    )
    return options


def _install_tcp_keepalive(engine: AsyncEngine, seconds: float) -> None:
    """Set `keepalive_options(seconds)` on each new PostgreSQL TCP connection."""
    options = keepalive_options(seconds)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # asyncpg keeps its asyncio transport in `_transport` (no public
        # accessor); test_faults.py checks the options reach the socket.
        transport = getattr(dbapi_conn.driver_connection, "_transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: no network path to lose
        for level, name, value in options:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, name, value)


def _is_memory(config: DatabaseConfig) -> bool:
    """Whether the SQLite URL names an in-memory database.

    `sqlite://`, `sqlite:///:memory:`, and the URI filenames `file::memory:`
    and `file:name?mode=memory` (with `uri=true`).
    """
    url = config.sqlalchemy_url()
    database = url.database
    if database in (None, "", ":memory:"):
        return True
    if url.query.get("uri") not in _TRUE or not str(database).startswith("file:"):
        return False
    path = str(database)[len("file:") :].partition("?")[0]
    return path == ":memory:" or url.query.get("mode") == "memory"


_TRUE = ("1", "true", "True", "yes", "on")
#: The query options SQLite URLs take without `uri=true`: the sqlite3 module's.
_SQLITE_DRIVER_OPTIONS = frozenset(
    {"uri", "timeout", "isolation_level", "detect_types", "check_same_thread"}
    | {"cached_statements"}
)


def _check_sqlite_url(url: URL) -> URL:
    """Refuse a SQLite URL whose options SQLAlchemy would drop or misread."""
    database = url.database or ""
    if url.query.get("uri") in _TRUE:
        return url
    if database.startswith("file:"):
        msg = (
            f"SQLite URL names the URI filename {database!r} without uri=true, "
            "so it would be a file of that name: add uri=true, as in "
            "sqlite+aiosqlite:///file:name?mode=memory&cache=shared&uri=true"
        )
        raise ConfigurationError(msg, field="url")
    unknown = sorted(set(url.query) - _SQLITE_DRIVER_OPTIONS)
    if unknown:
        msg = (
            f"SQLite URL options {unknown} would be ignored: SQLite URI "
            "parameters (mode, cache, ...) need a file: filename and uri=true, "
            "as in sqlite+aiosqlite:///file:app.db?mode=ro&uri=true"
        )
        raise ConfigurationError(msg, field="url")
    return url


def _sqlite_options(config: DatabaseConfig) -> dict[str, Any]:
    if _is_memory(config):
        # One shared connection (StaticPool) for a memory database, named
        # here: SQLAlchemy deprecates choosing it from `mode=memory`. Pool
        # sizing does not apply. (A shared-cache database behind a pool of
        # several connections would fail its readers and writers at once
        # with "database table is locked": SQLite's busy timeout does not
        # apply to shared-cache table locks.)
        options: dict[str, Any] = {"echo": config.echo, "poolclass": StaticPool}
    else:
        options = _pool_options(config)
        # A local file has no server to restart: no ping. The reset on return
        # is `install_sqlite_reset`'s, which rolls back only an open
        # transaction instead of sending ROLLBACK through aiosqlite's thread.
        options["pool_pre_ping"] = False
        options["pool_reset_on_return"] = None
    # sqlite3's own busy handler (`timeout`, 5 s by default) would otherwise
    # outlast a shorter PRAGMA busy_timeout.
    options["connect_args"] = {"timeout": config.sqlite_busy_timeout}
    return options


def _install_sqlite_hooks(engine: AsyncEngine, config: DatabaseConfig) -> None:
    """WAL, foreign keys, busy timeout, and SQLAlchemy's BEGIN workaround.

    The sqlite3 module opens transactions lazily and never before SAVEPOINT,
    so a savepoint taken first would survive its outer rollback. Turning the
    driver's transaction handling off and emitting BEGIN ourselves fixes that.
    """
    busy_ms = int(config.sqlite_busy_timeout * 1000)
    memory = _is_memory(config)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                # Durable at each checkpoint; with WAL this loses no committed
                # transaction on a process crash, only on power loss.
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if options.get(SQLITE_IMMEDIATE) else "BEGIN"
        )
        if options.get(SQLITE_READ_ONLY):
            conn.exec_driver_sql("PRAGMA query_only=ON")
            conn.info[SQLITE_READ_ONLY] = True

    @event.listens_for(engine.sync_engine, "commit")
    @event.listens_for(engine.sync_engine, "rollback")
    def _on_end(conn: Connection) -> None:
        if conn.invalidated:
            return  # discarded, not reused: nothing to switch back
        if conn.info.pop(SQLITE_READ_ONLY, False):
            conn.exec_driver_sql("PRAGMA query_only=OFF")


_default: Default[Database] = Default("database", "configure_database")


def configure_database(
    database: Database | DatabaseConfig | str | URL | None = None,
    **engine_options: Any,
) -> Database:
    """Register the default `Database`, built from the argument or the environment.

    Returns:
        The registered database, used wherever no database is passed.
    """
    if isinstance(database, Database):
        if engine_options:
            msg = (
                "engine options apply only when configure_database builds the database"
            )
            raise ConfigurationError(msg)
        return _default.set(database)
    return _default.set(Database(database, **engine_options))


def get_database() -> Database:
    """Return the default `Database`.

    Raises:
        ConfigurationError: `configure_database()` has not been called.
    """
    return _default.get()


_reset_default_database = _default.reset
