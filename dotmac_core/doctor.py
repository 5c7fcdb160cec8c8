"""`python -m dotmac_core doctor`: check the services the environment configures.

Reads `DatabaseConfig`, `CacheConfig` and `SecurityConfig` from the
environment (`DOTMAC_DB_*`, `DOTMAC_CACHE_*`, `DOTMAC_SECURITY_*`), connects
to each configured service and prints one table: reachable or not, server
version, round-trip latency, pool settings, PgBouncer mode, Redis mode, and
whether the cursor secret is set. It exits 1 when a check fails (2 with
`--strict` when one only warns), 0 otherwise. Passwords in URLs are masked
and secret values are never printed; every line is scrubbed of them once more
before it is written.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

from .config import CacheConfig, DatabaseConfig, SecurityConfig
from .exceptions import DotMacError, translate_error

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .db.database import Database

__all__ = ["Check", "main", "run_checks"]

Status = Literal["ok", "warn", "fail"]
#: Seconds one service's check may take before it counts as unreachable.
CHECK_TIMEOUT = 10.0
#: Round trips measured per service; the median is shown.
ROUND_TRIPS = 5
_MASK = "***"


@dataclass
class Check:
    """The outcome of one service's check: a status and lines of detail."""

    name: str
    status: Status = "ok"
    details: list[str] = field(default_factory=list)

    def warn(self, line: str) -> None:
        """Add a detail line and lower the status to `warn` (unless it failed)."""
        self.details.append(line)
        if self.status == "ok":
            self.status = "warn"

    def fail(self, line: str) -> None:
        """Add a detail line and mark the check failed."""
        self.details.append(line)
        self.status = "fail"


def mask_url(url: str) -> str:
    """Return `url` with its password (and any `password=` query value) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{_MASK}@{host}" if has_password else f"{userinfo}@{host}"
    query = "&".join(
        f"{key}={_MASK}" if key.lower() == "password" else pair
        for pair in parts.query.split("&")
        if pair
        for key in [pair.partition("=")[0]]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def _median_round_trip(ping: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        await ping()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CHECK_TIMEOUT:g} s"
    text = exc.message if isinstance(exc, DotMacError) else str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return f"{type(exc).__name__}: {text}".strip()


# --- the database ---------------------------------------------------------------


def _pool_line(config: DatabaseConfig) -> str:
    recycle = "never" if config.pool_recycle is None else f"{config.pool_recycle:g} s"
    return (
        f"pool: size {config.pool_size}, overflow {config.max_overflow}, "
        f"timeout {config.pool_timeout:g} s, recycle {recycle}, "
        f"pre-ping {'on' if config.pool_pre_ping else 'off'}"
    )


async def _check_database(config: DatabaseConfig, check: Check) -> None:
    from .db.database import Database

    url = config.sqlalchemy_url()
    check.details.append(url.render_as_string(hide_password=True))
    if config.dialect == "sqlite":
        path = url.database or ""
        if path in ("", ":memory:"):
            check.details.append("SQLite in memory: gone when the process ends")
            return
        if not await asyncio.to_thread(Path(path).exists):
            # Connecting would create the file: say so instead.
            check.warn(f"SQLite file {path} does not exist yet (made on first use)")
            return
    database = Database(config)
    try:
        async with database.engine.connect() as conn:
            if config.dialect == "sqlite":
                query = "SELECT 'SQLite ' || sqlite_version()"
            else:
                query = "SELECT 'PostgreSQL ' || current_setting('server_version')"
            version = (await conn.exec_driver_sql(query)).scalar()
            latency = await _median_round_trip(lambda: conn.exec_driver_sql("SELECT 1"))
            written = None
            if database.replicas:
                written = (await conn.exec_driver_sql(_WAL_WRITTEN)).scalar()
        for replica in database.replicas:
            await _check_replica(replica, written, check)
    finally:
        await database.dispose()
    check.details.append(f"server: {version}")
    check.details.append(f"round trip: {_ms(latency)} (median of {ROUND_TRIPS})")
    if config.dialect == "postgresql":
        check.details.append(_pool_line(config))
        timeouts = (
            f"statement_timeout {config.statement_timeout or 'off'}, "
            "command_timeout "
            + (f"{config.command_timeout:g} s" if config.command_timeout else "off")
        )
        check.details.append(f"timeouts: {timeouts}")
        check.details.append(
            "pgbouncer mode: on (no prepared statement reuse)"
            if config.pgbouncer
            else "pgbouncer mode: off (set DOTMAC_DB_PGBOUNCER=true behind "
            "a transaction-mode pooler)"
        )


_WAL_WRITTEN = "SELECT pg_current_wal_insert_lsn()::text"
_REPLAY = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
)


async def _check_replica(replica: Database, written: str | None, check: Check) -> None:
    """A replica's line: reachable, in recovery, and how far behind the primary."""
    from .db._replicas import parse_lsn

    shown = replica.url.render_as_string(hide_password=True)

    async def read() -> Any:
        async with replica.engine.connect() as conn:
            return (await conn.exec_driver_sql(_REPLAY)).one()

    try:
        recovering, replayed, age = await asyncio.wait_for(read(), CHECK_TIMEOUT / 2)
    except Exception as exc:  # noqa: BLE001 - reported: reads fall back to the primary
        check.warn(f"replica {shown}: unreachable ({_error(translate_error(exc))})")
        return
    if not recovering:
        check.warn(f"replica {shown}: not in recovery (not a hot standby)")
        return
    behind = ""
    if written is not None and replayed is not None:
        behind = f", {max(0, parse_lsn(written) - parse_lsn(replayed)):,} bytes behind"
    last = "" if age is None else f", last replayed commit {float(age):.1f} s ago"
    check.details.append(f"replica {shown}: hot standby{behind}{last}")


# --- the cache ------------------------------------------------------------------


async def _check_cache(config: CacheConfig, check: Check) -> None:
    if config.backend == "memory":
        check.details.append("backend: memory (in-process: each process has its own)")
        return
    from .guards import require_cache

    require_cache()
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    url = config.redis_url()
    check.details.append(f"backend: {config.backend}, {mask_url(url)}")
    options: dict[str, Any] = {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.socket_connect_timeout,
        # No retries: the doctor reports what one attempt sees.
        "retry": Retry(NoBackoff(), 0),
    }
    client: Any
    if config.backend == "redis-cluster":
        client = redis.RedisCluster.from_url(url, **options)
    else:
        client = redis.Redis.from_url(url, **options)
    try:
        if config.backend == "redis-cluster":
            await client.initialize()
        info = await client.info("server")
        latency = await _median_round_trip(client.ping)
    finally:
        await client.aclose()
    if config.backend == "redis-cluster":
        # One entry per node: report the first, and how many answered.
        nodes = info if isinstance(next(iter(info.values()), None), dict) else {}
        info = next(iter(nodes.values()), info)
        check.details.append(f"cluster nodes answering: {len(nodes) or 1}")
    version = info.get("redis_version", "?")
    mode = info.get("redis_mode", "standalone")
    check.details.append(f"server: Redis {version}, mode {mode}")
    check.details.append(f"round trip: {_ms(latency)} (median of {ROUND_TRIPS})")
    check.details.append(
        f"timeouts: socket {config.socket_timeout:g} s, connect "
        f"{config.socket_connect_timeout:g} s; fail open: "
        f"{'yes' if config.fail_open else 'no'}; pool {config.max_connections}"
    )
    if config.backend == "redis" and mode == "cluster":
        check.warn(
            "the server is a cluster node: set DOTMAC_CACHE_BACKEND=redis-cluster"
        )


# --- security -------------------------------------------------------------------


def _check_security(config: SecurityConfig, check: Check) -> None:
    if "secret_key" in config.model_fields_set:
        check.details.append("cursor secret key: set")
    else:
        check.warn(
            "cursor secret key: unset (a random key per process: workers "
            "reject each other's cursors; set DOTMAC_SECURITY_SECRET_KEY)"
        )
    check.details.append(
        f"headers: tenant {config.tenant_header}, user {config.user_header}"
    )


# --- running and printing ---------------------------------------------------------


class _Quiet:
    """Silence one logger for a block."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._was = self._logger.disabled

    def __enter__(self) -> None:
        self._logger.disabled = True

    def __exit__(self, *exc: object) -> None:
        self._logger.disabled = self._was


def _secrets(*configs: Any) -> set[str]:
    """Every secret value the configs hold; for a URL, the password inside it."""
    found: set[str] = set()
    for config in configs:
        for name in type(config).model_fields:
            value = getattr(config, name)
            if not hasattr(value, "get_secret_value"):
                continue
            secret = value.get_secret_value()
            if "://" in secret:
                # The URL is shown masked; its password is what must not appear.
                secret = urlsplit(secret).password or ""
            found.add(secret)
    return {value for value in found if len(value) >= 3}


async def _guarded(
    check: Check, run: Callable[[], Awaitable[None]], seconds: float
) -> None:
    try:
        await asyncio.wait_for(run(), seconds)
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        check.fail(f"unreachable: {_error(exc)}")


async def run_checks(
    seconds: float = CHECK_TIMEOUT,
) -> tuple[list[Check], set[str]]:
    """Check every configured service; return the checks and the secrets to scrub.

    Args:
        seconds: How long each service's check may take.
    """
    checks: list[Check] = []
    configs: list[Any] = []
    plans: list[tuple[str, type[Any], Callable[[Any, Check], Awaitable[None]]]] = [
        ("database", DatabaseConfig, _check_database),
        ("cache", CacheConfig, _check_cache),
    ]
    for name, config_class, checker in plans:
        check = Check(name)
        checks.append(check)
        try:
            config = config_class()
        except DotMacError as exc:
            check.fail(f"configuration: {exc.message}")
            continue
        configs.append(config)
        await _guarded(check, functools.partial(checker, config, check), seconds)
    security = Check("security")
    checks.append(security)
    try:
        # The table says whether the key is set; the config's own warning
        # about a per-process key would only repeat it on stderr.
        with _Quiet("dotmac_core.config"):
            security_config = SecurityConfig()
    except DotMacError as exc:
        security.fail(f"configuration: {exc.message}")
    else:
        configs.append(security_config)
        _check_security(security_config, security)
    return checks, _secrets(*configs)


def render(checks: Sequence[Check], secrets: set[str]) -> str:
    """Return the table of `checks`, with every value in `secrets` masked."""
    width = max(len(check.name) for check in checks)
    lines = [f"{'service':<{width}}  status  details"]
    for check in checks:
        details = check.details or [""]
        label = check.status.upper() if check.status != "ok" else "ok"
        lines.append(f"{check.name:<{width}}  {label:<6}  {details[0]}")
        lines.extend(f"{'':<{width}}  {'':<6}  {line}" for line in details[1:])
    text = "\n".join(lines)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run `doctor` from the command line; return the exit status.

    Args:
        argv: The arguments after `doctor` (default: `sys.argv`).
        out: Where the table goes (default: standard output).
    """
    parser = argparse.ArgumentParser(
        prog="python -m dotmac_core doctor",
        description="Check the database, cache and security settings "
        "from the environment.",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when a check only warns"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=CHECK_TIMEOUT,
        help=f"seconds per service check (default {CHECK_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    checks, secrets = asyncio.run(run_checks(args.timeout))
    stream = out or sys.stdout
    stream.write(render(checks, secrets) + "\n")
    if any(check.status == "fail" for check in checks):
        stream.write("doctor: a check failed\n")
        return 1
    if args.strict and any(check.status == "warn" for check in checks):
        stream.write("doctor: a check warned (--strict)\n")
        return 2
    env = sorted(name for name in os.environ if name.startswith("DOTMAC_"))
    stream.write(f"doctor: all checks passed ({len(env)} DOTMAC_* variables set)\n")
    return 0
