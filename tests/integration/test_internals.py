"""What `docs/internals.md` says the data path relies on, checked one by one.

Each test pins one behaviour of SQLAlchemy, SQLModel, a driver or the
standard library that is not (or not plainly) public API. If an upgrade
changes it, the test fails and names what to revisit.
"""

from __future__ import annotations

import asyncio
import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncSession as PlainSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Field
from sqlmodel.main import default_registry

from dotmac_core import AsyncRepository, Database, DBBaseModel, TransactionManager
from dotmac_core.db import _executor, _pool, _query, _rows, _writes
from dotmac_core.db import session as session_module
from dotmac_core.db._driver import compile_query
from dotmac_core.db._facts import Scoping, facts_of
from dotmac_core.db._types import UTCDateTime, uuid7, uuid7_batch
from dotmac_core.db.filters import parse_filters

from ..models import Tag


class Shouted(DBBaseModel, table=True):
    """Defaults that read the statement's other values through the context."""

    __tablename__ = "internals_shouted"

    name: str = Field(max_length=20)
    loud: str | None = Field(
        default=None,
        max_length=30,
        sa_column_kwargs={
            "default": lambda ctx: ctx.get_current_parameters()["name"].upper(),
            "onupdate": lambda ctx: ctx.get_current_parameters()["name"] + "!",
        },
    )


class Shouts(AsyncRepository[Shouted]):
    """Rows of `Shouted`."""


class Tags(AsyncRepository[Tag]):
    """Tags."""


@pytest.fixture
async def shouted(repo_db: Database) -> None:
    """The `Shouted` table, created for this module (it is in the metadata)."""
    async with repo_db.engine.begin() as conn:
        await conn.run_sync(Shouted.__table__.create, checkfirst=True)  # type: ignore[attr-defined]


def test_sqlmodel_default_registry_maps_every_table_class() -> None:
    """`sqlmodel.main.default_registry` holds the mappers of every table class.

    `scoping._table_models` reads it to find the models behind a table named
    in a user's Core-style statement (SQLModel does not export it).
    """
    classes = {mapper.class_ for mapper in default_registry.mappers}
    assert {Tag, Shouted} <= classes


def test_compiled_statement_attributes_the_driver_reads(db: Database) -> None:
    """Positional names, binds, prefetch columns and post-compile markers exist.

    The driver executor reads `positiontup`, `binds`, `escaped_bind_names`,
    `insert_prefetch` / `update_prefetch`, `literal_execute_params` /
    `post_compile_params` and `BindParameter.required` / `effective_value`.
    """
    facts = facts_of(Tag)
    dialect = db.engine.dialect
    insert = _writes.insert(facts, {"label": "x", "id": uuid7()})
    compiled: Any = insert.statement.compile(
        dialect=dialect, column_keys=insert.column_keys
    )
    assert set(compiled.positiontup) >= {"label", "id"}
    assert {c.key for c in compiled.insert_prefetch} >= {"created_at", "updated_at"}
    assert all(name in compiled.binds for name in compiled.positiontup)
    assert isinstance(compiled.escaped_bind_names, dict)
    limited: Any = select(Tag.id).limit(7).compile(dialect=dialect)
    fixed = [limited.binds[n] for n in limited.positiontup]
    assert next(b.effective_value for b in fixed if not b.required) == 7
    many = _query.rows(
        facts, parse_filters(Tag, {"label__in": ["a"]}), Scoping(None, None), ()
    )
    expanding: Any = many.statement.compile(dialect=dialect)
    assert expanding.post_compile_params or expanding.literal_execute_params
    assert compile_query(many, dialect) is None  # runs the SQLAlchemy way


@pytest.mark.usefixtures("repo_db")
async def test_materialised_objects_match_loaded_ones(db: Database) -> None:
    """Driver-built objects have the state of objects a closed session loaded.

    `_rows` writes the values into the instance dict of `new_instance()` and
    sets `InstanceState.key` from `identity_key_from_primary_key`.
    """
    made = await Tags().create({"label": "state"})
    engine = create_async_engine(db.url)
    try:
        async with PlainSession(engine) as plain:
            loaded = await plain.get(Tag, made.id)
        assert loaded is not None
    finally:
        await engine.dispose()
    facts = facts_of(Tag)
    (built,) = _rows.detached(facts, [[getattr(loaded, k) for k in facts.keys]])
    for state in (inspect(loaded), inspect(built)):
        assert state.detached
        assert state.key == inspect(loaded).key
        assert not state.expired_attributes
        assert not state.modified
        assert all(not state.attrs[k].history.has_changes() for k in facts.keys)
    assert inspect(built).unloaded == inspect(loaded).unloaded
    assert built.__pydantic_fields_set__ == loaded.__pydantic_fields_set__
    assert built.__pydantic_extra__ == loaded.__pydantic_extra__
    assert built.__pydantic_private__ == loaded.__pydantic_private__
    assert built.model_dump() == loaded.model_dump()


def test_sqlmodel_new_only_sets_the_pydantic_slots() -> None:
    """SQLModel's `__new__` leaves the three pydantic slots empty, nothing more.

    `_rows` then makes instances without it (checked per class the same way);
    a class whose `__new__` does more keeps its `__new__`.
    """
    assert _rows._plain_new(Tag)
    blank = Tag.__new__(Tag)
    assert blank.__dict__ == {}
    assert blank.__pydantic_fields_set__ == set()
    assert blank.__pydantic_extra__ is None
    assert blank.__pydantic_private__ is None

    class Stamped(Tag):
        def __new__(cls, *args: object, **kwargs: object) -> Stamped:
            made = super().__new__(cls)
            object.__setattr__(made, "__pydantic_extra__", {"stamp": 1})
            return made

    assert not _rows._plain_new(Stamped)


def test_transient_to_detached_keeps_the_instance() -> None:
    """`make_transient_to_detached` turns a new object into a keyed, clean one.

    `_rows.adopt` uses it so `create(instance)` returns that instance.
    """
    tag = Tag(label="adopt")
    make_transient_to_detached(tag)
    state = inspect(tag)
    assert state.detached
    assert state.key == inspect(Tag).identity_key_from_primary_key((tag.id,))


@pytest.mark.usefixtures("repo_db", "shouted")
async def test_context_defaults_agree_on_every_route(db: Database) -> None:
    """Defaults reading `get_current_parameters()` give one value either way.

    The driver evaluates `default` / `onupdate` callables with a context of
    its own offering what SQLAlchemy documents for them.
    """
    on_driver = await Shouts().create({"name": "ada"})
    async with TransactionManager():
        in_session = await Shouts().create({"name": "bob"})
    assert (on_driver.loud, in_session.loud) == ("ADA", "BOB")
    changed = await Shouts().update(on_driver.id, {"name": "cy"})
    async with TransactionManager():
        changed_too = await Shouts().update(in_session.id, {"name": "di"})
    assert (changed.loud, changed_too.loud) == ("cy!", "di!")


def test_listener_collections_tell_when_someone_observes(db: Database) -> None:
    """Engine, dialect, mapper and session listener collections are truthy when set.

    `_executor._observed` reads them to send observed calls through SQLAlchemy.
    """
    engine = db.engine.sync_engine
    facts = facts_of(Tag)
    assert not _executor._observed(engine, facts, None)

    def listener(*_args: Any, **_kw: Any) -> None:
        return None

    for target, name in [
        (engine, "before_cursor_execute"),
        (engine, "after_execute"),
        (engine, "handle_error"),
        (Tag, "load"),
        (Tag, "refresh"),
        (_executor.ScopedSession, "do_orm_execute"),
    ]:
        event.listen(target, name, listener)
        try:
            assert _executor._observed(engine, facts, None), name
        finally:
            event.remove(target, name, listener)
        assert not _executor._observed(engine, facts, None), name


@pytest.mark.postgres
async def test_pool_hands_out_a_waiting_connection_without_a_greenlet(
    pg_factory: Any,
) -> None:
    """`Pool.connect()` outside a greenlet takes a waiting connection, no I/O.

    Undocumented: `AsyncAdaptedQueue.get` tries `get_nowait` first, and only
    opening a connection awaits. `_pool.checkout` relies on it and stops the
    pool (before any I/O) when it would have to connect.
    """
    db = await pg_factory()
    await db.ping()  # one connection now waits in the pool
    pool: Any = db.engine.sync_engine.pool
    assert pool.checkedin() == 1
    fairy = await _pool.checkout(db.engine, sync=True)
    assert pool.checkedout() == 1
    assert await fairy.driver_connection.fetchval("SELECT 1") == 1  # type: ignore[union-attr]
    second = await _pool.checkout(db.engine, sync=True)  # none waits: a greenlet
    fairy.close()
    second.close()
    assert pool.checkedout() == 0


def test_uuid7_values_are_real_uuids() -> None:
    """uuid7 values, built through `UUID`'s slots, behave as `UUID(int=...)`.

    `uuid7_batch` sets the `int` and `is_safe` slots of `uuid.UUID` directly
    (a third of the cost of its constructor's checks).
    """
    for value in uuid7_batch(50):
        twin = uuid.UUID(int=value.int)
        assert value == twin
        assert hash(value) == hash(twin)
        assert (str(value), value.hex, value.version, value.variant) == (
            str(twin),
            twin.hex,
            7,
            uuid.RFC_4122,
        )
        assert value.is_safe is twin.is_safe
        assert pickle.loads(pickle.dumps(value)) == value  # noqa: S301 - our own bytes


@pytest.mark.postgres
async def test_asyncpg_reads_timestamptz_as_utc(pg_factory: Any) -> None:
    """The asyncpg driver reads `timestamptz` as aware UTC, whatever the time zone.

    `UTCDateTime.result_processor` returns no processor for that type code
    on asyncpg: there is nothing to convert.
    """
    db = await pg_factory()
    raw = await db.engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        await driver.execute("SET TIME ZONE 'Asia/Kolkata'")
        prepared = await driver.prepare("SELECT '2026-01-01 10:00+02'::timestamptz")
        (attribute,) = prepared.get_attributes()
        value = await prepared.fetchval()
        await driver.execute("RESET TIME ZONE")
    finally:
        raw.close()
    assert attribute.type.oid == 1184
    assert value.tzinfo is UTC
    assert value == datetime(2026, 1, 1, 8, tzinfo=UTC)
    processor = (
        UTCDateTime()
        .dialect_impl(db.engine.dialect)
        .result_processor(db.engine.dialect, 1184)
    )
    assert processor is None


@pytest.mark.postgres
async def test_asyncpg_adapter_begins_its_transaction_when_asked(
    pg_factory: Any,
) -> None:
    """SQLAlchemy's asyncpg adapter sends its held-back BEGIN on `_start_transaction()`.

    `session_module.begin_now` calls that method (no public one exists) so that
    the first statement of a transaction can run on the driver, after the
    same BEGIN SQLAlchemy would send.
    """
    db = await pg_factory()
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        adapted: Any = raw.dbapi_connection
        driver = adapted.driver_connection
        assert adapted._transaction is None
        assert not driver.is_in_transaction()
        assert await session_module.begin_now(adapted)
        assert driver.is_in_transaction()
        assert not await session_module.begin_now(adapted)  # begun already
        raw.invalidate()  # not back to the pool inside that transaction


@pytest.mark.postgres
async def test_after_commit_runs_before_the_connection_goes_back(
    pg_factory: Any,
) -> None:
    """SQLAlchemy's `after_commit` fires after COMMIT, its connection still checked out.

    `_replicas` reads the WAL position there, on the connection that just
    committed (in the commit's greenlet, by `await_only`), before another
    task can take that connection from the pool.
    """
    from sqlalchemy.util import await_only

    db = await pg_factory()
    seen: list[tuple[int, bool, str]] = []
    async with TransactionManager(db) as tx:
        session = tx.session
        known = session.remembered_connection()
        assert known is not None
        pooled = known[1]
        pool: Any = db.engine.sync_engine.pool

        def after_commit(_session: Any) -> None:
            driver = pooled.driver_connection
            position = await_only(driver.fetchval("SELECT pg_current_wal_insert_lsn()"))
            seen.append((pool.checkedout(), driver.is_in_transaction(), str(position)))

        event.listen(session.sync_session, "after_commit", after_commit)
        await session.exec(text("SELECT 1"))
    assert seen
    assert seen[0][:2] == (1, False)  # committed, not yet returned
    assert pool.checkedout() == 0


@pytest.mark.postgres
async def test_asyncpg_keeps_its_cancel_requests_in_a_set(pg_factory: Any) -> None:
    """An asyncpg connection keeps its CancelRequest tasks in `_cancellations`, a set.

    `_pool.spare_cancel_requests` empties it before a connection is closed,
    so that closing does not cancel those tasks mid-handshake.
    """
    db = await pg_factory()
    raw = await db.engine.raw_connection()
    try:
        assert isinstance(raw.driver_connection._cancellations, set)  # type: ignore[union-attr]
    finally:
        raw.close()


async def test_only_started_cancel_requests_are_spared() -> None:
    """A CancelRequest task that has not started stays with its connection's close.

    Started, it would read the closed connection's protocol (an error on a
    future nobody awaits before asyncpg 0.32); the close cancels it first.
    """

    class Driver:
        def __init__(self) -> None:
            self._cancellations: set[asyncio.Task[None]] = set()

    async def request(started: asyncio.Event) -> None:
        started.set()
        await asyncio.sleep(10)

    driver, started = Driver(), asyncio.Event()
    running = asyncio.ensure_future(request(started))
    await started.wait()
    waiting = asyncio.ensure_future(request(asyncio.Event()))
    driver._cancellations |= {running, waiting}
    _pool.spare_cancel_requests(driver)
    assert driver._cancellations == {waiting}
    for task in (running, waiting):
        task.cancel()
    await asyncio.gather(running, waiting, return_exceptions=True)


@pytest.mark.postgres
async def test_asyncpg_connects_through_the_async_creator(
    pg_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's asyncpg adapter calls `async_creator_fn`: connects run to their end.

    `_pool.connect_hook_supported` finds the parameter in the adapter's
    `connect`; the `Database` then passes `connect_to_the_end`, which runs
    `asyncpg.connect` in a task of its own.
    """
    import asyncpg  # type: ignore[import-untyped]

    assert _pool.connect_hook_supported()
    real_connect = asyncpg.connect
    callers: list[Any] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        callers.append(asyncio.current_task())
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", connect)
    db = await pg_factory()
    await db.ping()
    assert len(callers) == 1
    assert callers[0] is not asyncio.current_task()
