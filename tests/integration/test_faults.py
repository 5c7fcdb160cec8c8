"""Fault scenarios on real servers: killed backends, black holes, timeouts, conflicts.

The faults come from `tests/faults.py`: a TCP proxy switched between
pass-through, delay, black hole, reset and cut; `kill_backends`; and
`fail_nth`. Redis outages under the cache's failure policy are also covered
by `test_cache_failures.py`; killed pooled connections on the driver path by
`test_driver_connections.py`; the error classes of single driver errors by
`test_errors.py`. This module adds what those do not: the library's
behaviour (repository, TransactionManager, @transactional, the rate limiter)
when the fault strikes it, and bounds on what an outage costs.

Figures quoted in docs/reliability.md come from these tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import pytest
from sqlmodel import select

from dotmac_core import (
    AsyncRepository,
    CacheConfig,
    Database,
    DatabaseConfig,
    DatabaseConnectionError,
    DatabaseError,
    OperationTimeoutError,
    ServiceError,
    TransactionManager,
    current_transaction,
    rate_limit,
    rate_limit_fail_opens,
    transactional,
)
from dotmac_core.cache import create_cache_service
from dotmac_core.db.database import keepalive_options
from dotmac_core.ratelimit import close_rate_limiters

from ..conftest import PG_URL, REDIS_URL
from ..faults import FaultProxy, fail_nth, kill_backends
from ..models import Tag

PgFactory = Callable[..., Awaitable[Database]]

POSTGRES = pytest.mark.parametrize(
    "db", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


class Tags(AsyncRepository[Tag]):
    """Tags."""


def _checked_out(db: Database) -> int:
    pool: Any = db.engine.sync_engine.pool
    return int(pool.checkedout())


def _bound(timeout: float) -> float:
    """A generous upper bound for "fails within `timeout`" on a loaded machine."""
    return timeout * 3 + 2


@pytest.fixture
async def pg_proxy() -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the test PostgreSQL server, passing through."""
    parts = urlsplit(PG_URL)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy


# --- killed backends ----------------------------------------------------------------


@POSTGRES
@pytest.mark.usefixtures("repo_db")
async def test_backends_killed_between_requests_cost_no_error() -> None:
    """After every backend is killed, the next repository calls simply work."""
    tag = await Tags().create({"label": "before"})
    async with TransactionManager():  # a session's connection in the pool too
        assert await Tags().count() == 1
    assert await kill_backends(PG_URL) >= 1
    assert await Tags().create({"label": "after"})  # a write, first
    assert (await Tags().get_by_id(tag.id)) is not None
    async with TransactionManager():
        assert await Tags().count() == 2


@POSTGRES
async def test_backends_killed_inside_a_transaction(repo_db: Database) -> None:
    """A kill inside a block: a DatabaseConnectionError, nothing written, no leak."""
    with pytest.raises(DatabaseConnectionError) as info:
        async with TransactionManager():
            await Tags().create({"label": "half"})
            assert await kill_backends(PG_URL) >= 1
            await Tags().create({"label": "written"})
    assert info.value.transient
    assert _checked_out(repo_db) == 0
    assert await Tags().count() == 0
    assert await Tags().create({"label": "next"})


@POSTGRES
async def test_backend_killed_mid_statement(repo_db: Database) -> None:
    """A statement whose backend is killed fails clearly; the next call is fine."""

    async def sleeper() -> None:
        async with TransactionManager() as tx:
            conn = await tx.session.connection()
            await conn.exec_driver_sql("SELECT pg_sleep(30)")

    task = asyncio.create_task(sleeper())
    watching = repo_db.engine.execution_options(isolation_level="AUTOCOMMIT")
    async with watching.connect() as watcher:  # autocommit: a fresh view each time
        with anyio.fail_after(20):
            while not (  # noqa: ASYNC110 - polls the server; no event exists
                await watcher.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                    "'SELECT pg_sleep(30)%' AND state = 'active'"
                )
            ).scalar():
                await asyncio.sleep(0.02)
    assert await kill_backends(PG_URL) >= 1
    with anyio.fail_after(10), pytest.raises(DatabaseConnectionError):
        await task
    assert _checked_out(repo_db) == 0
    assert await Tags().count() == 0


# --- a black-holed database ---------------------------------------------------------


@POSTGRES
@pytest.mark.usefixtures("repo_db")
async def test_black_holed_database_fails_within_its_timeouts(
    pg_proxy: FaultProxy,
) -> None:
    """Through a black hole, connects and statements fail in time; none hangs.

    `connect_timeout` bounds opening a connection (`pool_timeout` keeps its
    30 s default: it is not what bounds a connect), `command_timeout` a
    statement on an open one: the defaults' 10 s and 300 s, scaled down.
    Once the path is back, calls work again.
    """
    config = DatabaseConfig(
        url=pg_proxy.url(PG_URL),
        connect_timeout=1.0,
        command_timeout=1.0,
        pool_size=2,
        max_overflow=0,
    )
    assert config.pool_timeout == 30.0
    async with Database(config) as db:
        tag = await Tags(db=db).create({"label": "reachable"})
        pg_proxy.black_hole()
        for call in (
            lambda: Tags(db=db).get_by_id(tag.id),  # a pooled connection
            lambda: Tags(db=db).create({"label": "lost"}),
        ):
            started = time.monotonic()
            with pytest.raises((OperationTimeoutError, DatabaseConnectionError)):
                with anyio.fail_after(_bound(1.0) + 5):
                    await call()
            assert time.monotonic() - started < _bound(1.0)
        await pg_proxy.drop_connections()  # every connection so far is dead
        started = time.monotonic()
        with pytest.raises((OperationTimeoutError, DatabaseConnectionError)):
            with anyio.fail_after(_bound(1.0) + 5):
                await db.ping()  # a new connection into the black hole
        assert time.monotonic() - started < _bound(1.0)
        pg_proxy.pass_through()
        await pg_proxy.drop_connections()
        assert (await Tags(db=db).get_by_id(tag.id)) is not None
        async with TransactionManager(db):
            assert await Tags().count() >= 1
        assert _checked_out(db) == 0


@pytest.mark.postgres
@pytest.mark.skipif(sys.platform != "linux", reason="Linux's TCP option names")
@pytest.mark.parametrize("seconds", [30.0, 4.0, None])
async def test_tcp_keepalive_reaches_every_connection(
    pg_factory: PgFactory, seconds: float | None
) -> None:
    """Pooled connections carry the keepalive options; `None` leaves them off.

    A black hole that drops packets cannot be made on loopback without
    firewall rules (the proxy's kernel acknowledges everything), so this
    shows the part the kernel then enforces: the options are on the socket.
    """
    db = await pg_factory(tcp_keepalive_timeout=seconds, pool_size=2)
    async with db.engine.connect() as one, db.engine.connect() as two:
        for conn in (one, two):
            await conn.exec_driver_sql("SELECT 1")
            raw: Any = (await conn.get_raw_connection()).driver_connection
            sock = raw._transport.get_extra_info("socket")
            on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            if seconds is None:
                assert on == 0
                continue
            assert on == 1
            expected = {n: v for _level, n, v in keepalive_options(seconds)[1:]}
            assert expected[socket.TCP_KEEPIDLE] == int(seconds / 2)
            assert expected[socket.TCP_USER_TIMEOUT] == seconds * 1000
            for name, value in expected.items():
                assert sock.getsockopt(socket.IPPROTO_TCP, name) == value


# --- connections reset or cut mid-message -------------------------------------------


async def _proxied(proxy: FaultProxy) -> Database:
    """A small pool reaching the test database through `proxy`."""
    config = DatabaseConfig(
        url=proxy.url(PG_URL),
        connect_timeout=5.0,
        command_timeout=5.0,
        pool_size=2,
        max_overflow=0,
    )
    return Database(config)


@POSTGRES
@pytest.mark.usefixtures("repo_db")
@pytest.mark.parametrize("side", ["request", "reply"])
@pytest.mark.parametrize("n_bytes", [0, 40])
async def test_connection_cut_mid_message(
    pg_proxy: FaultProxy, side: Literal["request", "reply"], n_bytes: int
) -> None:
    """A connection reset part-way through a request or its reply.

    A one-statement read is sent again on a new connection and returns every
    row; a write, alone or in a transaction, raises DatabaseConnectionError
    (transient) and is not resent, so it is written at most once. The pool
    holds nothing afterwards and the next calls work.
    """
    async with await _proxied(pg_proxy) as db:
        await Tags(db=db).create_many([{"label": f"t{i}"} for i in range(200)])
        cuts = pg_proxy.cuts
        pg_proxy.cut_after(n_bytes, of=side)
        assert len(await Tags(db=db).list(limit=500)) == 200
        assert pg_proxy.cuts == cuts + 1
        pg_proxy.cut_after(n_bytes, of=side)
        with pytest.raises(DatabaseConnectionError) as info:
            await Tags(db=db).create({"label": "cut"})
        assert info.value.transient
        assert pg_proxy.cuts == cuts + 2
        assert await Tags(db=db).count({"label": "cut"}) <= 1
        with pytest.raises(DatabaseConnectionError):
            async with TransactionManager(db):
                await Tags().create({"label": "in block"})
                pg_proxy.cut_after(n_bytes, of=side)
                await Tags().create({"label": "cut in block"})
        assert await Tags(db=db).count({"label__like": "%in block"}) == 0
        assert _checked_out(db) == 0
        assert await Tags(db=db).create({"label": "after"})
        assert await Tags(db=db).count() >= 201


@POSTGRES
@pytest.mark.usefixtures("repo_db")
async def test_connections_reset(pg_proxy: FaultProxy) -> None:
    """Every connection reset, new ones too: a quick DatabaseConnectionError.

    Inside a transaction and outside it, calls fail at once (no timeout is
    waited for); once connections are accepted again the same pool works.
    """
    async with await _proxied(pg_proxy) as db:
        await Tags(db=db).create({"label": "before"})
        with anyio.fail_after(_bound(1.0)):
            with pytest.raises(DatabaseConnectionError):
                async with TransactionManager(db):
                    assert await Tags().count() == 1
                    pg_proxy.reset()
                    await Tags().create({"label": "lost"})
            for call in (
                lambda: Tags(db=db).count(),
                lambda: Tags(db=db).create({"label": "refused"}),
                db.ping,
            ):
                with pytest.raises(DatabaseConnectionError):
                    await call()
        assert _checked_out(db) == 0
        pg_proxy.pass_through()
        assert await Tags(db=db).count() == 1
        async with TransactionManager(db):
            assert await Tags().create({"label": "after"})
        assert await Tags(db=db).count() == 2


# --- timeouts ------------------------------------------------------------------------


@POSTGRES
@pytest.mark.parametrize("setting", ["statement_timeout", "command_timeout"])
async def test_timeouts_surface_and_the_pool_stays_usable(
    repo_db: Database, pg_factory: PgFactory, setting: str
) -> None:
    """A write stuck behind a row lock times out as OperationTimeoutError.

    The same database answers the next calls, on both paths, and its pool
    holds no connection afterwards.
    """
    tag = await Tags().create({"label": "locked"})
    db = await pg_factory(**{setting: 0.3})
    async with repo_db.engine.connect() as holder:
        await holder.begin()
        await holder.exec_driver_sql(
            "SELECT * FROM tag WHERE id = $1 FOR UPDATE", (tag.id,)
        )
        with anyio.fail_after(_bound(0.3)):
            with pytest.raises(OperationTimeoutError):
                await Tags(db=db).update(tag.id, {"weight": 1})
            with pytest.raises(OperationTimeoutError):
                async with TransactionManager(db):
                    await Tags().update(tag.id, {"weight": 2})
        await holder.rollback()
    assert (await Tags(db=db).update(tag.id, {"weight": 3})).weight == 3
    async with TransactionManager(db):
        assert (await Tags().get_by_id(tag.id)).weight == 3  # type: ignore[union-attr]
    assert _checked_out(db) == 0


# --- conflicts retried --------------------------------------------------------------


@POSTGRES
@pytest.mark.usefixtures("repo_db")
async def test_real_deadlock_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    """Two transactions locking two rows in opposite order: 40P01, retried, done.

    (SERIALIZABLE 40001 retries: `test_transaction.py`.)
    """
    first = await Tags().create({"label": "first"})
    second = await Tags().create({"label": "second"})
    holding = [asyncio.Event(), asyncio.Event()]
    attempts = [0, 0]

    def locker(me: int, ids: tuple[Any, Any]) -> Callable[[], Awaitable[None]]:
        @transactional(retries=5)
        async def lock_both() -> None:
            attempts[me] += 1
            tx = current_transaction()
            assert tx is not None
            for step, row_id in enumerate(ids):
                statement = select(Tag).where(Tag.id == row_id).with_for_update()
                row = (await tx.session.exec(statement)).one()
                row.weight += 1
                tx.session.add(row)
                await tx.session.flush()
                if step == 0 and attempts[me] == 1:
                    holding[me].set()  # the first try waits for the crossing
                    await holding[1 - me].wait()

        return lock_both

    with caplog.at_level(logging.INFO, logger="dotmac_core.db"):
        with anyio.fail_after(30):
            await asyncio.gather(
                locker(0, (first.id, second.id))(),
                locker(1, (second.id, first.id))(),
            )
    assert sorted(attempts) == [1, 2]  # one was the deadlock's victim
    assert "SQLSTATE 40P01" in caplog.text
    for tag_id in (first.id, second.id):
        assert (await Tags().get_by_id(tag_id)).weight == 2  # type: ignore[union-attr]


# --- the n-th statement or commit fails ---------------------------------------------


async def test_failed_commit_writes_nothing(repo_db: Database) -> None:
    """A commit lost before it reached the server: an error, nothing written."""
    with fail_nth(repo_db, 1, on="commit") as plan, pytest.raises(DatabaseError):
        async with TransactionManager():
            await Tags().create({"label": "never"})
    assert plan.fired
    assert _checked_out(repo_db) == 0
    assert await Tags().count() == 0
    assert await Tags().create({"label": "next"})


async def test_commit_whose_reply_is_lost_is_not_retried(repo_db: Database) -> None:
    """A commit that ran but whose reply was lost raises; it is never rerun.

    The outcome is unknown to the client (here: committed), so `@transactional`
    must not rerun the function, or the write would happen twice.
    """
    calls = 0

    @transactional(retries=3)
    async def make() -> None:
        nonlocal calls
        calls += 1
        await Tags().create({"label": "once", "weight": calls})

    with (
        fail_nth(repo_db, 1, on="commit", when="after") as plan,
        pytest.raises(DatabaseError),
    ):
        await make()
    assert plan.fired
    assert calls == 1
    assert [t.weight for t in await Tags().list()] == [1]
    assert _checked_out(repo_db) == 0


async def test_lost_statement_on_the_driver_path(repo_db: Database) -> None:
    """A read whose connection is lost is resent; a write raises and is not resent."""
    tag = await Tags().create({"label": "kept"})
    with fail_nth(repo_db, 1) as plan:
        found = await Tags().get_by_id(tag.id)
    assert plan.fired
    if repo_db.dialect == "postgresql":
        assert found is not None  # resent on another connection
    with fail_nth(repo_db, 1) as plan, pytest.raises(DatabaseError):
        await Tags().create({"label": "lost"})
    assert plan.fired
    assert await Tags().count() == 1
    assert _checked_out(repo_db) == 0


async def test_third_statement_of_a_transaction_fails(repo_db: Database) -> None:
    """The n-th statement failing rolls the whole block back."""
    with fail_nth(repo_db, 3) as plan, pytest.raises(DatabaseError):
        async with TransactionManager():
            for i in range(5):
                await Tags().create({"label": f"t{i}"})
    assert plan.seen == 3
    assert await Tags().count() == 0
    assert _checked_out(repo_db) == 0


# --- Redis: the cache and the rate limiter ------------------------------------------

#: Timeouts short enough for tests, long enough for a loaded machine.
REDIS_FAST = {
    "socket_timeout": 0.5,
    "socket_connect_timeout": 0.5,
    "circuit_breaker_threshold": 3,
}


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the shared Redis server, passing through."""
    parts = urlsplit(redis_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


def _cache_config(prefix: str, **settings: Any) -> CacheConfig:
    return CacheConfig(key_prefix=prefix, **{**REDIS_FAST, **settings})


@pytest.mark.redis
async def test_black_holed_redis_costs_a_bounded_number_of_calls(
    redis_proxy: FaultProxy, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hung Redis: each call fails open in time; once open, none reaches it.

    Every fail-open decision is counted on the service; the outage is one
    warning. When Redis answers again, one probe closes the circuit.
    """
    config = _cache_config(redis_prefix, circuit_breaker_reset=1.0)
    cache = create_cache_service("redis", url=redis_proxy.url(REDIS_URL), config=config)
    await cache.set("k", "v")
    redis_proxy.black_hole()
    with caplog.at_level(logging.INFO, logger="dotmac_core.cache"):
        for _ in range(3):  # the threshold: each waits for its socket timeout
            started = time.monotonic()
            assert await cache.get("k", "miss") == "miss"
            assert time.monotonic() - started < _bound(0.5)
        reached, connections = redis_proxy.requests, redis_proxy.accepted
        with anyio.fail_after(_bound(0.5)):
            for _ in range(50):  # circuit open: answered without Redis
                assert await cache.get("k", "miss") == "miss"
        assert (redis_proxy.requests, redis_proxy.accepted) == (reached, connections)
        assert cache.fail_opens.count == 53
        assert cache.fail_opens.last_reason == "circuit open"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        redis_proxy.pass_through()
        await asyncio.sleep(1.1)  # the breaker's reset time: nothing to await
        assert await cache.get("k") == "v"  # the probe reaches Redis and closes it
    assert redis_proxy.requests > reached
    assert cache.fail_opens.count == 53
    await cache.aclose()


@pytest.mark.redis
async def test_refused_then_restarted_redis(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """Refused: misses at once; restarted (connections reset): no miss at all."""
    url = redis_proxy.url(REDIS_URL)
    cache = create_cache_service("redis", url=url, config=_cache_config(redis_prefix))
    await cache.set("k", "v")
    await redis_proxy.drop_connections()  # a restart: pooled connections die
    assert await cache.get("k") == "v"
    assert cache.fail_opens.count == 0
    await redis_proxy.stop()  # refused
    with anyio.fail_after(_bound(0.5)):
        for _ in range(10):
            assert await cache.get("k", "miss") == "miss"
    assert cache.fail_opens.count == 10
    await cache.aclose()


@pytest.mark.redis
async def test_cancelled_get_never_hands_its_reply_to_another(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """A GET cancelled after its request left: the next GET gets its own value."""
    url = redis_proxy.url(REDIS_URL)
    config = _cache_config(
        redis_prefix, socket_timeout=5, max_connections=1, fail_open=False
    )
    cache = create_cache_service("redis", url=url, config=config)
    await cache.set_many({"first": "one", "second": "two"})
    redis_proxy.delay(0.3)
    read = asyncio.create_task(cache.get("first"))
    await redis_proxy.wait_forwarded()  # the request is at Redis; its reply waits
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    redis_proxy.pass_through()
    assert await cache.get("second") == "two"
    assert await cache.get("first") == "one"
    await cache.aclose()


@pytest.mark.redis
async def test_poisoned_bytes_are_a_logged_miss(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are no entry of ours under a key: a miss, logged, not an error."""
    import redis.asyncio as redis

    cache = create_cache_service(
        "redis", url=redis_url, config=_cache_config(redis_prefix)
    )
    raw = redis.Redis.from_url(redis_url)
    await cache.set("k", {"a": 1})
    stored = await raw.get(f"{redis_prefix}k")
    assert stored is not None
    for poison in (b"\x80\x04garbage", stored[:-3], stored + b"}"):
        await raw.set(f"{redis_prefix}k", poison)
        with caplog.at_level(logging.DEBUG, logger="dotmac_core.cache"):
            caplog.clear()
            assert await cache.get("k", "miss") == "miss"
        assert "does not decode" in caplog.text or poison == b"\x80\x04garbage"
    assert cache.fail_opens.count == 0  # Redis answered: not a fail-open
    await raw.aclose()
    await cache.aclose()


@pytest.mark.redis
async def test_black_holed_rate_limiter_fails_open_logged_and_counted(
    redis_proxy: FaultProxy, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hung Redis under a shared limit: bounded calls, each let through is counted.

    Each call let through is a warning and counts in `rate_limit_fail_opens()`;
    after the threshold, no call reaches Redis. `fail_open=False` raises.
    """
    config = _cache_config(
        redis_prefix,
        backend="redis",
        url=redis_proxy.url(REDIS_URL),
        circuit_breaker_reset=60,
    )
    calls = 0

    @rate_limit(10, 60, key="faults", backend=config)
    async def limited() -> None:
        nonlocal calls
        calls += 1

    @rate_limit(10, 60, key="faults-closed", backend=config, fail_open=False)
    async def strict() -> None:
        raise AssertionError  # pragma: no cover - never admitted

    try:
        await limited()  # connected and counted on Redis
        redis_proxy.black_hole()
        before = rate_limit_fail_opens().count
        with caplog.at_level(logging.WARNING, logger="dotmac_core.ratelimit"):
            for _ in range(3):
                started = time.monotonic()
                await limited()
                assert time.monotonic() - started < _bound(0.5)
            reached = redis_proxy.requests
            with anyio.fail_after(_bound(0.5)):
                for _ in range(20):
                    await limited()
                with pytest.raises(ServiceError):
                    await strict()
        assert redis_proxy.requests == reached
        assert calls == 24
        assert rate_limit_fail_opens().count - before == 23
        let_through = [r for r in caplog.records if "let through" in r.getMessage()]
        assert len(let_through) == 23
        assert all(r.levelno == logging.WARNING for r in let_through)
    finally:
        await close_rate_limiters()
