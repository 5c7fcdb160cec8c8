"""Settings from the environment: `DOTMAC_DB_*`, `DOTMAC_CACHE_*`, `DOTMAC_SECURITY_*`.

Keyword arguments win over environment variables, which win over defaults.
The defaults give the embedded setup: a SQLite file and an in-memory cache.
Secrets are `SecretStr`: they never appear in a repr, a log line or an error.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Literal
from urllib.parse import quote

import pydantic
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .exceptions import ConfigurationError

__all__ = ["CacheConfig", "DatabaseConfig", "SecurityConfig"]

logger = logging.getLogger("dotmac_core.config")

Driver = Literal["sqlite", "postgresql"]

#: The async driver dotmac_core runs each database on.
_ASYNC_DRIVERS: dict[str, str] = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
}
#: Schemes users paste from elsewhere, and the async driver each means.
_SCHEME_ALIASES: dict[str, str] = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class _Settings(BaseSettings):
    """Base of the config classes: errors become `ConfigurationError`, secret-free."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                for err in exc.errors(include_input=False, include_url=False)
            )
            fields = [".".join(str(p) for p in err["loc"]) for err in exc.errors()]
            # `from None`: pydantic's error embeds the input values, which may be
            # secrets; the message above names every field and problem instead.
            msg = f"invalid {type(self).__name__}: {problems}"
            raise ConfigurationError(
                msg,
                field=fields[0] if fields else None,
                details={"fields": fields},
            ) from None


class DatabaseConfig(_Settings):
    """Where and how to connect to the database (`DOTMAC_DB_*`).

    Give either `url` or the parts (`driver`, `host`, `port`, `database`,
    `user`, `password`). `postgresql://` and `postgres://` URLs run on asyncpg,
    `sqlite://` on aiosqlite; other drivers are refused (dotmac_core is async-only).
    """

    model_config = SettingsConfigDict(
        env_prefix="DOTMAC_DB_",
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
    )

    url: SecretStr | None = None
    """Full database URL; wins over the parts below. Secret: it may hold a password."""
    driver: Driver | None = None
    """`sqlite` or `postgresql` when `url` is not given; unset, a config naming a
    host, port, user or password means PostgreSQL, anything else SQLite."""
    host: str = "127.0.0.1"
    """Server host (PostgreSQL)."""
    port: int = Field(default=5432, ge=1, le=65535)
    """Server port (PostgreSQL)."""
    database: str = "dotmac.db"
    """Database name (PostgreSQL) or file path (SQLite; `:memory:` for memory)."""
    user: str | None = None
    """User name (PostgreSQL)."""
    password: SecretStr | None = None
    """Password (PostgreSQL)."""
    pool_size: int = Field(default=10, ge=1)
    """Connections kept open in the pool."""
    max_overflow: int = Field(default=10, ge=0)
    """Extra connections allowed above `pool_size` under load."""
    pool_timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for a free connection before `OperationTimeoutError`."""
    connect_timeout: float = Field(default=10.0, gt=0)
    """Seconds to open a PostgreSQL connection (TCP, TLS, startup, login)."""
    pool_recycle: float | None = Field(default=1800.0, gt=0)
    """Seconds after which a pooled connection is replaced; `None` never."""
    pool_pre_ping: bool = True
    """Ping a pooled PostgreSQL connection idle for over 2 s before use."""
    statement_timeout: float | None = Field(default=None, gt=0)
    """Server-side limit per statement in seconds (PostgreSQL `statement_timeout`)."""
    command_timeout: float | None = Field(default=300.0, gt=0)
    """Client-side limit per command in seconds (asyncpg); `None`: no limit.

    The last resort against a peer that keeps the connection open and never
    answers (a hung server or middlebox), which no TCP setting can detect. It
    is long so that reports and bulk writes do not meet it; set it per
    `Database` (or `None`) for longer work, and prefer `statement_timeout`
    for limiting queries."""
    tcp_keepalive_timeout: float | None = Field(default=30.0, ge=2)
    """Seconds of network silence after which a PostgreSQL connection is dead.

    TCP keepalive probes start after half of it and are answered by a live
    server's kernel even during a long query; when they, or data sent, go
    unacknowledged for this long (`TCP_USER_TIMEOUT` on Linux), the kernel
    closes the connection and its statement fails. `None`: the operating
    system's settings (on Linux, no keepalive for 2 hours)."""
    sqlite_busy_timeout: float = Field(default=5.0, ge=0)
    """Seconds SQLite waits on a locked database before giving up."""
    echo: bool = False
    """Log every SQL statement (development only)."""
    pgbouncer: bool = False
    """Behind a transaction-mode pooler: no server-side prepared statement reuse."""
    application_name: str | None = "dotmac_core"
    """Name shown in `pg_stat_activity` (PostgreSQL)."""
    replicas: list[SecretStr] | str = Field(default_factory=list)
    """URLs of PostgreSQL hot standbys for reads; the environment gives them
    comma-separated (`DOTMAC_DB_REPLICAS`). Secret: they may hold passwords."""
    read_your_writes: Literal["lsn", "window"] = "lsn"
    """After a write, how long its context reads from the primary: `lsn` until
    a replica has replayed the write's WAL position, `window` for
    `read_your_writes_window` seconds (no position asked of the server)."""
    read_your_writes_window: float = Field(default=5.0, gt=0)
    """Seconds reads stay on the primary after a write in `window` mode, or
    when a write's WAL position could not be read."""
    replica_retry_after: float = Field(default=5.0, gt=0)
    """Seconds an unreachable replica is skipped before it is checked again."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _normalise_url(value.get_secret_value())
        return value

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_list(cls, value: Any) -> Any:
        # The environment gives one string; a list keeps its items.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("replicas")
    @classmethod
    def _replica_schemes(cls, value: list[SecretStr] | str) -> list[SecretStr]:
        if isinstance(value, str):  # not reached: the before-validator splits it
            value = [SecretStr(value)]
        for replica in value:
            if _normalise_url(replica.get_secret_value()).get_backend_name() != (
                "postgresql"
            ):
                msg = "replicas must be PostgreSQL URLs (hot standbys)"
                raise ValueError(msg)
        return value

    def replica_urls(self) -> list[URL]:
        """Return the replicas' async SQLAlchemy URLs (their reprs mask passwords)."""
        # A list once validated; the `str` of the annotation is the
        # environment's comma-separated form, split by `_replica_list`.
        replicas = [] if isinstance(self.replicas, str) else self.replicas
        return [_normalise_url(replica.get_secret_value()) for replica in replicas]

    def sqlalchemy_url(self) -> URL:
        """Return the async SQLAlchemy URL (its repr masks the password)."""
        if self.url is not None:
            return _normalise_url(self.url.get_secret_value())
        if self._driver() == "sqlite":
            return URL.create(_ASYNC_DRIVERS["sqlite"], database=self.database)
        return URL.create(
            _ASYNC_DRIVERS["postgresql"],
            username=self.user,
            password=_reveal(self.password),
            host=self.host,
            port=self.port,
            database=self.database,
        )

    def _driver(self) -> Driver:
        if self.driver is not None:
            return self.driver
        server_fields = {"host", "port", "user", "password"}
        return "postgresql" if server_fields & self.model_fields_set else "sqlite"

    @property
    def dialect(self) -> Driver:
        """Return `sqlite` or `postgresql`, whichever this config connects to."""
        name = self.sqlalchemy_url().get_backend_name()
        return "sqlite" if name == "sqlite" else "postgresql"


def _normalise_url(raw: str) -> URL:
    """Parse `raw` and move it onto the async driver dotmac_core uses."""
    try:
        url = make_url(raw)
    except ArgumentError:
        # ArgumentError's text repeats the URL, password included: say less.
        msg = "url is not a valid database URL (expected scheme://...)"
        raise ValueError(msg) from None
    target = _SCHEME_ALIASES.get(url.drivername)
    if target is None:
        msg = (
            f"unsupported database driver {url.drivername!r}: dotmac_core runs "
            "PostgreSQL on asyncpg and SQLite on aiosqlite"
        )
        raise ValueError(msg)
    return url.set(drivername=target)


class CacheConfig(_Settings):
    """Which cache to use and how patiently to talk to it (`DOTMAC_CACHE_*`)."""

    model_config = SettingsConfigDict(
        env_prefix="DOTMAC_CACHE_",
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
    )

    backend: Literal["memory", "redis", "redis-cluster"] = "memory"
    """Cache backend: in-process `memory`, `redis` or `redis-cluster`. Unset,
    a config with a `url` means `redis`; `memory` with a `url` is refused."""
    url: SecretStr | None = None
    """Redis URL (`redis://`, `rediss://`); wins over host/port/db. Secret."""
    host: str = "127.0.0.1"
    """Redis host."""
    port: int = Field(default=6379, ge=1, le=65535)
    """Redis port."""
    db: int = Field(default=0, ge=0)
    """Redis logical database (not used by Redis Cluster)."""
    password: SecretStr | None = None
    """Redis password."""
    ttl_default: int = Field(default=300, ge=1)
    """Seconds an entry lives when a call gives no TTL."""
    key_prefix: str = "dotmac:"
    """Prefix of every key this service writes."""
    # 1 s, not less: with two CPU-bound processes on a 2-core machine, 50
    # concurrent GETs on loopback Redis took up to 258 ms (p99 33 ms), so the
    # former 0.25 s took a slow but alive Redis for a dead one, and a shared
    # rate limit failed open (58 of 60 calls admitted over a limit of 10).
    # A hung Redis then costs 1 s per call until the circuit opens
    # (`circuit_breaker_threshold` calls); a refused one costs nothing. See
    # docs/reliability.md.
    socket_timeout: float = Field(default=1.0, gt=0)
    """Seconds to wait for a Redis reply before treating Redis as down."""
    socket_connect_timeout: float = Field(default=1.0, gt=0)
    """Seconds to wait for a Redis connection (and for a free one in the pool)."""
    max_connections: int = Field(default=50, ge=1)
    """Size of the Redis connection pool."""
    max_entries: int = Field(default=10_000, ge=1)
    """Entries the memory backend keeps before evicting the least recently used."""
    fail_open: bool = True
    """When Redis is down: `True` behaves as a miss / no-op, `False` raises."""
    circuit_breaker_threshold: int = Field(default=5, ge=1)
    """Consecutive failures that open the circuit (calls skip Redis)."""
    circuit_breaker_reset: float = Field(default=5.0, gt=0)
    """Seconds the circuit stays open before one call probes Redis again."""
    invalidate_after_commit: bool = True
    """Inside a `TransactionManager`, delete / invalidate after it commits (and
    not at all if it rolls back), so readers never re-cache the old row."""

    @model_validator(mode="after")
    def _url_means_redis(self) -> CacheConfig:
        # A URL alone (say DOTMAC_CACHE_URL) asks for Redis: keeping the memory
        # default would leave every process with a cache of its own, silently.
        if self.url is not None:
            if "backend" not in self.model_fields_set:
                self.backend = "redis"
            elif self.backend == "memory":
                msg = (
                    "url is set but backend is 'memory', which takes no url: "
                    "set backend to 'redis' or 'redis-cluster', or unset url"
                )
                raise ValueError(msg)
        return self

    def redis_url(self) -> str:
        """Return the Redis URL built from `url` or host/port/db (password kept)."""
        if self.url is not None:
            return self.url.get_secret_value()
        password = _reveal(self.password)
        auth = "" if password is None else f":{quote(password, safe='')}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


_PROCESS_SECRET = secrets.token_urlsafe(32)
#: Whether the process-key warning has been logged (once per process).
_warned_process_secret = False


def _process_secret() -> SecretStr:
    """Return this process's random cursor key (`_note_key_use` warns on its use)."""
    return SecretStr(_PROCESS_SECRET)


def _note_key_use(key: str) -> None:
    """Log a WARNING, once per process, when `key` is the random process key.

    Called where a cursor is signed or verified, not where a `SecurityConfig`
    is made: one made only to read the header names has nothing to warn of.
    """
    global _warned_process_secret
    if not _warned_process_secret and key == _PROCESS_SECRET:
        _warned_process_secret = True
        logger.warning(
            "DOTMAC_SECURITY_SECRET_KEY is not set: this process signs pagination "
            "cursors with a random key of its own, so other processes (workers, "
            "replicas, restarts) reject its cursors; set the variable to share one"
        )


class SecurityConfig(_Settings):
    """Secrets and request conventions (`DOTMAC_SECURITY_*`).

    Without `DOTMAC_SECURITY_SECRET_KEY` a random key is made once per process
    (and a WARNING logged the first time it signs or verifies a cursor, not
    when a `SecurityConfig` is made): fine for one process, but
    each worker then rejects the cursors of the others, so set it whenever
    several processes (or a restart) must accept each other's cursors.
    """

    model_config = SettingsConfigDict(
        env_prefix="DOTMAC_SECURITY_",
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,
    )

    secret_key: SecretStr = Field(default_factory=_process_secret, min_length=16)
    """Key that signs pagination cursors; at least 16 characters. Secret."""
    tenant_header: str = "X-Tenant-ID"
    """HTTP header that carries the tenant id."""
    user_header: str = "X-User-ID"
    """HTTP header that carries the acting user's id."""
