"""Read replicas on a real streaming hot standby: routing, read-your-writes, failure.

Where each statement ran is counted on the servers themselves
(`pg_stat_statements` on the primary and on the standby), not by the
library. The pair is the session's throwaway one (`tests/pg_standby.py`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from dotmac_core import (
    AsyncRepository,
    ConfigurationError,
    Database,
    DatabaseConfig,
    TransactionManager,
    tenant_scope,
)

from ..models import Member, Tag
from ..pg_standby import Replication, pg_replication_fixture  # noqa: F401

pytestmark = pytest.mark.postgres

TRIES = 1_000
#: pg_stat_statements' text of the repositories' reads of each table.
TAG_READS = "SELECT%FROM tag%WHERE%"
MEMBER_READS = "SELECT%FROM member%WHERE%"


class TagRepository(AsyncRepository[Tag]):
    """Tags, no tenant."""


class MemberRepository(AsyncRepository[Member]):
    """Members, per tenant."""


@pytest.fixture
async def routed(pg_replication: Replication) -> AsyncIterator[Database]:
    """The pair's primary with the standby as its replica, tables created."""
    database = Database(
        DatabaseConfig(
            url=pg_replication.primary.url,
            replicas=[pg_replication.standby.url],
            replica_retry_after=0.2,
        )
    )
    await database.create_all()
    await pg_replication.replayed()
    yield database
    await database.dispose()


async def in_new_context(work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` in a context of its own, as a new request would."""
    return await asyncio.create_task(work(), context=contextvars.Context())


async def test_reads_outside_a_transaction_are_served_by_the_replica(
    routed: Database, pg_replication: Replication
) -> None:
    """Reads of contexts that wrote nothing run on the standby, counted there."""
    tags = TagRepository(db=routed)
    made = await in_new_context(lambda: tags.create({"label": uuid.uuid4().hex[:20]}))
    await pg_replication.replayed()
    on_replica = await pg_replication.calls(pg_replication.standby, TAG_READS)
    on_primary = await pg_replication.calls(pg_replication.primary, TAG_READS)

    async def read() -> None:
        found = await tags.get_by_id(made.id)
        assert found is not None
        assert found.label == made.label
        assert await tags.count({"id": made.id}) == 1

    for _ in range(100):
        await in_new_context(read)
    assert await pg_replication.calls(pg_replication.standby, TAG_READS) >= (
        on_replica + 200
    )
    assert await pg_replication.calls(pg_replication.primary, TAG_READS) == on_primary


async def test_a_write_then_a_read_in_one_context_never_reads_stale(
    routed: Database, pg_replication: Replication
) -> None:
    """1,000 write-then-read contexts see their writes; other contexts use the replica.

    Every other try writes through a `TransactionManager` (the commit's WAL
    position is read on its connection), the rest through the pooled
    driver path; all read at once after the write, on the driver path and
    through the session. Meanwhile a reader that never writes keeps reading,
    and its reads are served by the standby.
    """
    tags = TagRepository(db=routed)
    seed = await in_new_context(lambda: tags.create({"label": uuid.uuid4().hex[:20]}))
    await pg_replication.replayed()
    stale: list[int] = []

    async def write_then_read(i: int) -> None:
        label = f"ryw-{i}-{uuid.uuid4().hex[:12]}"
        if i % 2:
            async with TransactionManager(routed):
                made = await tags.create({"label": label, "weight": i})
        else:
            made = await tags.create({"label": label, "weight": i})
        found = await tags.get_by_id(made.id)
        if found is None or found.weight != i:
            stale.append(i)
            return
        await tags.update(made.id, {"weight": i + 1})
        again = await tags.get_by_field("label", label)
        if again is None or again.weight != i + 1:
            stale.append(i)
            return
        # An `in` list runs through SQLAlchemy's session: routed the same way.
        listed = await tags.list({"id__in": [made.id]})
        if [tag.weight for tag in listed] != [i + 1]:
            stale.append(i)

    others = 0
    done = anyio.Event()

    async def other_reader() -> None:
        nonlocal others
        while not done.is_set():
            assert await tags.get_by_id(seed.id) is not None
            others += 1
            await asyncio.sleep(0)

    replica_before = await pg_replication.calls(pg_replication.standby, TAG_READS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(in_new_context, other_reader)
        for i in range(TRIES):
            await in_new_context(lambda i=i: write_then_read(i))
        done.set()
    assert stale == []
    served = await pg_replication.calls(pg_replication.standby, TAG_READS)
    # The other reader's reads, at the least, ran on the standby.
    assert others > 0
    assert served - replica_before >= others


async def test_without_read_your_writes_the_replica_reads_stale(
    routed: Database, pg_replication: Replication
) -> None:
    """The control: reading the standby itself right after a commit misses rows.

    The fixture's standby replays commits 50 ms late, so a test reading
    stale data would see it; the tests above would fail the same way.
    """
    tags = TagRepository(db=routed)
    on_replica = TagRepository(db=routed.replicas[0])
    tries = 50
    missed = 0
    for i in range(tries):
        made = await tags.create({"label": f"stale-{i}-{uuid.uuid4().hex[:12]}"})
        if await on_replica.get_by_id(made.id) is None:
            missed += 1
    assert missed > tries // 2


async def test_tenant_reads_on_the_replica_stay_in_their_tenant(
    routed: Database, pg_replication: Replication
) -> None:
    """Scoping applies on the replica as on the primary (driver and session paths)."""
    members = MemberRepository(db=routed)
    tenants = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    ids: dict[str, uuid.UUID] = {}
    for tenant in tenants:
        with tenant_scope(tenant):
            made = await members.create(
                {"email": f"{tenant}@example.com", "name": tenant}
            )
            ids[tenant] = made.id
    await pg_replication.replayed()
    before = await pg_replication.calls(pg_replication.standby, MEMBER_READS)

    async def look(tenant: str) -> None:
        with tenant_scope(tenant):
            mine = await members.get_by_id(ids[tenant])
            assert mine is not None
            assert mine.tenant_id == tenant
            other = next(t for t in tenants if t != tenant)
            assert await members.get_by_id(ids[other]) is None
            # An `in` list takes the session path.
            found = await members.list({"id__in": list(ids.values())})
            assert [m.tenant_id for m in found] == [tenant]

    for tenant in tenants:
        await in_new_context(lambda tenant=tenant: look(tenant))
    assert await pg_replication.calls(pg_replication.standby, MEMBER_READS) >= (
        before + 6
    )


async def test_read_only_transactions_use_the_replica_unless_the_context_wrote(
    routed: Database,
) -> None:
    """A read-only `TransactionManager` begins on the standby; after a write, not."""

    async def where() -> bool:
        async with TransactionManager(routed, read_only=True) as tx:
            result = await tx.session.exec(text("SELECT pg_is_in_recovery()"))
            return bool(result.scalar())

    assert await in_new_context(where) is True

    async def write_then_where() -> bool:
        await TagRepository(db=routed).create({"label": uuid.uuid4().hex[:20]})
        return await where()

    assert await in_new_context(write_then_where) is False

    async def write_in_transaction() -> bool:
        async with TransactionManager(routed) as tx:
            result = await tx.session.exec(text("SELECT pg_is_in_recovery()"))
            return bool(result.scalar())

    assert await in_new_context(write_in_transaction) is False


async def test_window_mode_keeps_reads_on_the_primary_for_the_window(
    pg_replication: Replication,
) -> None:
    """`read_your_writes="window"`: after a write, the window; then the replica."""
    database = Database(
        DatabaseConfig(
            url=pg_replication.primary.url,
            replicas=[pg_replication.standby.url],
            read_your_writes="window",
            read_your_writes_window=0.3,
        )
    )
    tags = TagRepository(db=database)

    async def recovering() -> bool:
        async with TransactionManager(database, read_only=True) as tx:
            result = await tx.session.exec(text("SELECT pg_is_in_recovery()"))
            return bool(result.scalar())

    async def scenario() -> tuple[bool, bool]:
        made = await tags.create({"label": uuid.uuid4().hex[:20]})
        assert await tags.get_by_id(made.id) is not None
        soon = await recovering()
        await asyncio.sleep(0.4)
        return soon, await recovering()

    try:
        assert await in_new_context(scenario) == (False, True)
    finally:
        await database.dispose()


async def test_a_killed_replica_leaves_reads_on_the_primary_without_errors(
    routed: Database, pg_replication: Replication, caplog: pytest.LogCaptureFixture
) -> None:
    """Kill the standby mid-run: every read answers; restarted, it serves again.

    Reads outside a transaction (driver and session paths) and read-only
    transactions begun after the kill never fail. A read-only block that was
    running on the standby when it died loses its connection like any
    other, and is not counted here.
    """
    tags = TagRepository(db=routed)
    made = await in_new_context(lambda: tags.create({"label": uuid.uuid4().hex[:20]}))
    await pg_replication.replayed()
    errors: list[BaseException] = []
    reads = 0
    stop = anyio.Event()
    killed = anyio.Event()

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                assert await tags.get_by_id(made.id) is not None
                assert len(await tags.list({"id__in": [made.id]})) == 1
            except Exception as exc:  # noqa: BLE001 - counted, then asserted
                errors.append(exc)
            reads += 1
            await asyncio.sleep(0.001)

    async def read_only_blocks() -> None:
        await killed.wait()
        while not stop.is_set():
            try:
                async with TransactionManager(routed, read_only=True) as tx:
                    result = await tx.session.exec(text("SELECT pg_is_in_recovery()"))
                    assert result.scalar() is False  # on the primary
            except Exception as exc:  # noqa: BLE001 - counted, then asserted
                errors.append(exc)
            await asyncio.sleep(0.001)

    with caplog.at_level(logging.WARNING, logger="dotmac_core.db"):
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(in_new_context, reader)
                tg.start_soon(in_new_context, read_only_blocks)
                await asyncio.sleep(0.2)
                before_kill = reads
                await asyncio.to_thread(pg_replication.standby.kill)
                killed.set()
                await asyncio.sleep(0.5)
                stop.set()
        finally:
            await asyncio.to_thread(pg_replication.standby.start)
            await pg_replication.wait_streaming()
    assert errors == []
    assert reads > before_kill
    assert any("cannot serve reads" in r.getMessage() for r in caplog.records)

    # Back: once its retry time has passed, a probe readmits it.
    await pg_replication.replayed()
    with anyio.fail_after(30):
        while True:
            before = await pg_replication.calls(pg_replication.standby, TAG_READS)
            await in_new_context(lambda: tags.get_by_id(made.id))
            if await pg_replication.calls(pg_replication.standby, TAG_READS) > before:
                break
            await asyncio.sleep(0.05)


def test_replicas_need_a_postgresql_primary(tmp_path: Any) -> None:
    """A SQLite database with replicas is refused, naming the setting."""
    with pytest.raises(ConfigurationError) as raised:
        Database(
            f"sqlite+aiosqlite:///{tmp_path}/x.db",
            replicas=["postgresql://u@127.0.0.1/x"],
        )
    assert raised.value.field == "replicas"


def test_replicas_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DOTMAC_DB_REPLICAS` is comma-separated; the replicas' URLs stay secret."""
    monkeypatch.setenv(
        "DOTMAC_DB_REPLICAS", "postgresql://u:pw@r1/app, postgres://u:pw@r2/app"
    )
    config = DatabaseConfig(url="postgresql://u:pw@p/app")
    assert [str(url) for url in config.replica_urls()] == [
        "postgresql+asyncpg://u:***@r1/app",
        "postgresql+asyncpg://u:***@r2/app",
    ]
    assert "pw" not in repr(config)
    database = Database(config)
    assert len(database.replicas) == 2
    assert "pw" not in repr(database)
    with pytest.raises(ConfigurationError):
        DatabaseConfig(url="postgresql://u@p/app", replicas=["mysql://u@r/app"])


async def test_doctor_reports_each_replica(
    pg_replication: Replication, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`doctor` names the standby, how far behind it is, and a dead replica."""
    from dotmac_core.doctor import run_checks

    from ..faults import dead_port

    for name in ("DOTMAC_DB_URL", "DOTMAC_DB_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    dead = f"postgresql://postgres@127.0.0.1:{dead_port()}/dotmac"
    monkeypatch.setenv("DOTMAC_DB_URL", pg_replication.primary.url)
    monkeypatch.setenv("DOTMAC_DB_REPLICAS", f"{pg_replication.standby.url},{dead}")
    found, _ = await run_checks()
    checks = {check.name: check for check in found}
    database = checks["database"]
    lines = "\n".join(database.details)
    assert f"127.0.0.1:{pg_replication.standby.port}/dotmac: hot standby, " in lines
    assert "bytes behind" in lines
    assert database.status == "warn"
    assert "unreachable" in lines


async def test_a_replica_set_up_wrong_is_left_out(
    pg_replication: Replication, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica lacking the database (3D000) warns; reads run on the primary."""
    wrong = pg_replication.standby.url.rsplit("/", 1)[0] + "/no_such_database"
    database = Database(pg_replication.primary.url, replicas=[wrong])
    tags = TagRepository(db=database)
    try:
        await database.create_all()
        made = await tags.create({"label": uuid.uuid4().hex[:20]})
        with caplog.at_level(logging.WARNING, logger="dotmac_core.db"):
            for _ in range(3):
                assert await in_new_context(lambda: tags.get_by_id(made.id))
        warnings = [r for r in caplog.records if "cannot serve" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await database.dispose()


async def test_a_write_whose_position_cannot_be_read_stays_on_the_primary(
    routed: Database,
) -> None:
    """The WAL position query failing after a write: the window covers the context."""
    replicas = routed._replica_set
    assert replicas is not None

    class Gone:
        """A connection that fails the position query (fault injection)."""

        async def fetchval(self, sql: str) -> str:
            raise ConnectionResetError(sql)

    async def wrote_then_choice() -> object:
        await replicas.after_pooled_write(Gone())
        return replicas._choose()

    assert await in_new_context(wrote_then_choice) is None  # the primary

    async def choice() -> object:
        return replicas._choose()

    assert await in_new_context(choice) is not None  # others: the replica


async def test_cancelled_read_only_blocks_on_the_replica_leave_nothing_open(
    routed: Database, pg_replication: Replication
) -> None:
    """Read-only blocks cut off at any point (BEGIN included) leak no connection."""
    import random

    import asyncpg

    replica = routed.replicas[0]

    async def block(delay: float) -> None:
        with anyio.move_on_after(delay):
            async with TransactionManager(routed, read_only=True) as tx:
                await tx.session.exec(text("SELECT pg_sleep(0.002)"))

    rng = random.Random(14)  # noqa: S311 - cut-off points, not secrets
    for _ in range(5):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(in_new_context, lambda: block(rng.uniform(0, 0.004)))
    assert replica.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    conn = await asyncpg.connect(pg_replication.standby.dsn)
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
    )
    try:
        for _ in range(100):  # a rollback under way may take a moment
            open_transactions = await conn.fetchval(query)
            if not open_transactions:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert open_transactions == 0


async def test_a_bulk_write_then_a_read_never_reads_stale(routed: Database) -> None:
    """`create_many` (COPY, sent from a task of its own) notes its write too."""
    tags = TagRepository(db=routed)

    async def bulk_then_read(i: int) -> bool:
        made = await tags.create_many(
            [{"label": f"bulk-{i}-{n}-{uuid.uuid4().hex[:8]}"} for n in range(50)]
        )
        found = await tags.list({"id__in": [tag.id for tag in made]})
        return len(found) == len(made) and await tags.get_by_id(made[-1].id) is not None

    results = [await in_new_context(lambda i=i: bulk_then_read(i)) for i in range(20)]
    assert all(results)


async def test_every_kind_of_write_is_read_back_at_once(routed: Database) -> None:
    """upsert, update_many, soft delete, restore and hard delete: each read at once."""
    members = MemberRepository(db=routed)
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        with tenant_scope(tenant):
            made = await members.create({"email": f"{tenant}@x.com", "name": "a"})
            await members.upsert({"id": made.id, "email": made.email, "name": "b"})
            assert (await members.get_one(id=made.id)).name == "b"
            assert await members.update_many({"id": made.id}, {"rank": 7}) == 1
            assert (await members.get_one(id=made.id)).rank == 7
            assert await members.delete(made.id)
            assert await members.get_by_id(made.id) is None
            await members.restore(made.id)
            assert await members.count({"id": made.id}) == 1
            assert await members.delete(made.id, hard=True)
            assert not await members.exists({"id": made.id})

    for _ in range(10):
        await in_new_context(scenario)
