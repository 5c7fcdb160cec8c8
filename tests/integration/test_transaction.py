"""TransactionManager and @transactional on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import event
from sqlmodel import select

from dotmac_core import (
    AlreadyExistsError,
    AsyncRepository,
    ConcurrentSessionUseError,
    Database,
    DatabaseError,
    DotMacError,
    TenantError,
    TransactionManager,
    ValidationError,
    current_transaction,
    tenant_scope,
    transactional,
)

from ..models import Member, Tag

pytestmark = pytest.mark.usefixtures("repo_db", "executor")


class Tags(AsyncRepository[Tag]):
    """Tags."""


async def test_commit_and_rollback() -> None:
    """The block commits on success and rolls back on an exception."""
    async with TransactionManager() as tx:
        assert current_transaction() is tx
        tx.session.add(Tag(label="kept"))
    assert current_transaction() is None
    with pytest.raises(KeyError):
        async with TransactionManager() as tx:
            tx.session.add(Tag(label="lost"))
            await tx.session.flush()
            raise KeyError
    assert [t.label for t in await Tags().list()] == ["kept"]


async def test_nested_blocks_are_savepoints() -> None:
    """An inner failure rolls back only the inner block."""
    async with TransactionManager() as outer:
        await Tags().create({"label": "outer"})
        with pytest.raises(ValueError, match="inner"):
            async with TransactionManager() as inner:
                assert inner.is_nested
                assert inner.session is outer.session
                await Tags().create({"label": "inner"})
                raise ValueError("inner")
        async with TransactionManager():
            await Tags().create({"label": "second"})
    assert sorted(t.label for t in await Tags().list()) == ["outer", "second"]


async def test_on_commit_runs_only_after_commit() -> None:
    """Callbacks run after the outermost commit; never on rollback."""
    calls: list[str] = []

    async def async_callback() -> None:
        calls.append("async")

    async with TransactionManager() as tx:
        tx.on_commit(lambda: calls.append("sync"))
        tx.on_commit(async_callback)
        async with TransactionManager() as inner:
            inner.on_commit(lambda: calls.append("inner-kept"))
        with pytest.raises(RuntimeError):
            async with TransactionManager() as failed:
                failed.on_commit(lambda: calls.append("inner-dropped"))
                raise RuntimeError
        assert calls == []
    assert calls == ["sync", "async", "inner-kept"]
    calls.clear()
    with pytest.raises(RuntimeError):
        async with TransactionManager() as tx:
            tx.on_commit(lambda: calls.append("never"))
            raise RuntimeError
    assert calls == []


async def test_failing_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A failing callback is logged; the others still run."""
    calls: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback failed")

    with caplog.at_level(logging.ERROR, logger="dotmac_core.db"):
        async with TransactionManager() as tx:
            tx.on_commit(boom)
            tx.on_commit(lambda: calls.append("after"))
    assert calls == ["after"]
    assert "on_commit callback" in caplog.text


async def test_states_are_explicit() -> None:
    """A manager is entered once; its session is gone after the block."""
    tx = TransactionManager()
    async with tx:
        pass
    with pytest.raises(DotMacError, match="entered once"):
        async with tx:
            pass  # pragma: no cover - refused on entry
    with pytest.raises(DotMacError, match="not active"):
        _ = tx.session
    with pytest.raises(DotMacError, match="active transaction"):
        tx.on_commit(lambda: None)
    async with TransactionManager():
        with pytest.raises(ValidationError):
            async with TransactionManager(isolation_level="SERIALIZABLE"):
                pass  # pragma: no cover - refused on entry


async def test_read_only_refuses_writes() -> None:
    """A read-only transaction reads but cannot write."""
    await Tags().create({"label": "r"})
    with pytest.raises(DatabaseError):
        async with TransactionManager(read_only=True) as tx:
            assert len((await tx.session.exec(select(Tag))).all()) == 1
            tx.session.add(Tag(label="w"))
    async with TransactionManager() as tx:  # the connection is writable again
        tx.session.add(Tag(label="w2"))
    assert await Tags().count() == 2


async def test_tenant_is_fixed_for_the_transaction() -> None:
    """Switching tenant inside a transaction raises TenantError."""
    with tenant_scope("a"):
        async with TransactionManager():
            await AsyncRepositoryMembers().create({"email": "a@x", "name": "A"})
            with tenant_scope("b"), pytest.raises(TenantError):
                await AsyncRepositoryMembers().count()


class AsyncRepositoryMembers(AsyncRepository[Member]):
    """Members."""


async def test_two_tasks_on_one_session_is_an_error() -> None:
    """Two tasks using one transaction's session at once get a clear error."""
    async with TransactionManager():
        results = await asyncio.gather(
            Tags().count(), Tags().count(), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], ConcurrentSessionUseError)
    async with TransactionManager():  # sequential use from tasks is fine
        assert await asyncio.create_task(Tags().count()) == 0
        assert await asyncio.create_task(Tags().count()) == 0


async def test_cancelled_transactions_leak_nothing(db: Database) -> None:
    """30 transactions cancelled mid-flight return every connection, write nothing."""
    started = anyio.Event()
    flushed = 0

    async def worker(i: int) -> None:
        nonlocal flushed
        async with TransactionManager() as tx:
            tx.session.add(Tag(label=f"cancel-{i}"))
            await tx.session.flush()
            flushed += 1
            started.set()
            if db.dialect == "postgresql" and i % 2:
                # Cancelled inside a statement: the connection is terminated.
                # (The server notices the lost client when the sleep ends.)
                conn = await tx.session.connection()
                await conn.exec_driver_sql("SELECT pg_sleep(1)")
            await anyio.sleep(10)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(worker, i)
            await started.wait()
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    assert flushed >= 1
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await Tags().count() == 0


@pytest.mark.parametrize("style", ["task", "scope"])
async def test_cancelled_during_commit_commits_and_says_so(
    db: Database, style: str
) -> None:
    """A cancellation landing while COMMIT is on its way waits for it, then goes on.

    The block commits (and says so with `committed`), its callbacks run, no
    connection is left checked out, and the caller sees the cancellation.
    """
    engine = db.engine.sync_engine
    cancel: list[Callable[[], object]] = []
    ran: list[str] = []

    def on_commit(_conn: object) -> None:  # SQLAlchemy's, just before COMMIT
        if cancel:
            asyncio.get_running_loop().call_soon(cancel.pop())

    tx = TransactionManager()

    async def block() -> None:
        async with tx:
            await Tags().create({"label": f"commit-{style}"})
            tx.on_commit(lambda: ran.append("callback"))

    event.listen(engine, "commit", on_commit)
    try:
        if style == "task":
            task = asyncio.create_task(block())
            cancel.append(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with anyio.CancelScope() as scope:
                cancel.append(scope.cancel)
                await block()
                await (
                    anyio.lowlevel.checkpoint()
                )  # the scope's cancellation still stands
            assert scope.cancelled_caught
    finally:
        event.remove(engine, "commit", on_commit)
    assert not cancel  # the cancellation was delivered during the commit
    assert tx.committed
    assert ran == ["callback"]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await Tags().count({"label": f"commit-{style}"}) == 1


@pytest.mark.parametrize(
    "db", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_statement_cancelled_by_a_scope_closes_its_connection(
    db: Database,
) -> None:
    """A statement cancelled by a cancel scope leaves no connection half closed.

    SQLAlchemy terminates the connection of a cancelled statement with a close
    it awaits; an anyio scope cancels that await too. The connection must be
    closed at once all the same, not left to the garbage collector.
    """
    for _ in range(5):
        with anyio.move_on_after(0.05):
            async with db.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT pg_sleep(5)")
    pool = db.engine.pool
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    # A connection left half closed is found here: "unclosed transport".
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()


@pytest.mark.parametrize("read_only", [False, True])
async def test_rollback_of_an_invalidated_connection_is_clean(
    db: Database, read_only: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's own error comes out, and the rollback itself does not fail.

    The connection was invalidated inside the block (as a cancellation or a
    lost server does); ending the block must not touch it again.
    """
    caplog.set_level(logging.WARNING, logger="dotmac_core")
    with pytest.raises(KeyError, match="mine"):
        async with TransactionManager(db, read_only=read_only) as tx:
            conn = await tx.session.connection()
            await conn.invalidate()
            raise KeyError("mine")
    assert not [r for r in caplog.records if "rollback failed" in r.getMessage()]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with TransactionManager(db) as tx:  # the pool works on
        assert await Tags(tx.session).count() == 0


async def test_hundred_concurrent_transactions_commit(db: Database) -> None:
    """100 concurrent transactions all commit."""

    async def worker(i: int) -> None:
        async with TransactionManager():
            await Tags().create({"label": f"t{i}", "weight": i})

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(worker, i)
    assert await Tags().count() == 100
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_transactional_commits_and_retries_only_conflicts() -> None:
    """`@transactional` wraps a call in a transaction and never retries bad input."""
    attempts = 0

    @transactional(retries=3)
    async def make(label: str) -> Tag:
        nonlocal attempts
        attempts += 1
        return await Tags().create({"label": label})

    tag = await make("ok")
    assert tag.label == "ok"
    with pytest.raises(ValidationError):
        await make("x" * 50)
    assert attempts == 2
    async with TransactionManager():
        await make("nested")  # joins as a savepoint
    assert await Tags().count() == 2
    with pytest.raises(ValidationError):
        transactional(retries=-1)


@pytest.mark.parametrize(
    "db", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_serializable_increments_are_retried(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """8 concurrent SERIALIZABLE increments of one counter end at exactly 8 (PG).

    SQLite serialises writers, so only PostgreSQL raises the 40001 to retry.
    """
    assert db.dialect == "postgresql"
    counter = await Tags().create({"label": "counter", "weight": 0})
    attempts = 0

    @transactional(retries=20, isolation_level="SERIALIZABLE")
    async def increment() -> None:
        nonlocal attempts
        attempts += 1
        tx = current_transaction()
        assert tx is not None
        row = (await tx.session.exec(select(Tag).where(Tag.id == counter.id))).one()
        await anyio.sleep(0.01)  # widen the race window
        row.weight += 1
        tx.session.add(row)

    with caplog.at_level(logging.INFO, logger="dotmac_core.db"):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(increment)
    final = await Tags().get_by_id(counter.id)
    assert final is not None
    assert final.weight == 8
    assert attempts > 8
    assert "transaction conflict (SQLSTATE 40001)" in caplog.text


async def test_savepoint_recovers_from_a_failed_write() -> None:
    """A nested block around a failing create lets the outer transaction go on."""
    async with TransactionManager():
        await Tags().create({"label": "first"})
        with pytest.raises(AlreadyExistsError):
            async with TransactionManager():
                await Tags().create({"label": "first"})
        await Tags().create({"label": "second"})
    assert sorted(t.label for t in await Tags().list()) == ["first", "second"]


async def test_driver_errors_leave_the_block_translated(db: Database) -> None:
    """A raw statement failing inside the block leaves it as a DotMacError."""
    with pytest.raises(DatabaseError) as info:
        async with TransactionManager() as tx:
            conn = await tx.session.connection()
            await conn.exec_driver_sql("SELECT * FROM no_such_table")
    assert info.value.__cause__ is not None


async def test_child_task_gets_its_own_transaction() -> None:
    """A TransactionManager in a child task is independent of the parent's.

    The parent only reads: on SQLite a writing parent would hold the write
    lock that its children wait for.
    """
    async with TransactionManager(read_only=True) as parent:

        async def child() -> bool:
            async with TransactionManager() as own:
                await Tags().create({"label": "child"})
                return own.session is not parent.session and not own.is_nested

        results = await asyncio.gather(child(), child(), return_exceptions=True)
    assert sorted(map(repr, results))[0].startswith("AlreadyExistsError")
    assert True in results
    assert await Tags().count() == 1


async def test_unsupported_isolation_level_is_refused(db: Database) -> None:
    """An isolation level the database does not have is a ValidationError."""
    level = "READ UNCOMMITTED" if db.dialect == "postgresql" else "READ COMMITTED"
    with pytest.raises(ValidationError, match="isolation levels"):
        async with TransactionManager(isolation_level=level):  # type: ignore[arg-type]
            pass  # pragma: no cover - refused on entry
