"""Driver errors from real servers arrive as dotmac_core errors, cause chained."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy import insert, text
from sqlmodel.ext.asyncio.session import AsyncSession

from dotmac_core import (
    AlreadyExistsError,
    Database,
    DatabaseConfig,
    DatabaseConnectionError,
    IntegrityConstraintError,
    OperationTimeoutError,
    TransactionConflictError,
    ValidationError,
    translate_errors,
)

from ..models import Invoice, InvoiceLine

PgFactory = Callable[..., Awaitable[Database]]


async def test_unique_violation(session: AsyncSession) -> None:
    """A duplicate unique key is AlreadyExistsError naming the constraint."""
    session.add(Invoice(number="DUP-1", tenant_id="acme"))
    await session.commit()
    session.add(Invoice(number="DUP-1", tenant_id="acme"))
    with pytest.raises(AlreadyExistsError) as info, translate_errors():
        await session.commit()
    assert isinstance(info.value.__cause__, sa_exc.IntegrityError)
    assert info.value.constraint in ("uq_invoice_number", "invoice.number")
    assert info.value.details["constraint"] == info.value.constraint
    await session.rollback()
    session.add(Invoice(number="DUP-2", tenant_id="acme"))
    await session.commit()  # the session keeps working


async def test_foreign_key_violation(session: AsyncSession) -> None:
    """A dangling foreign key is an IntegrityConstraintError, not AlreadyExists."""
    session.add(InvoiceLine(invoice_id=uuid.uuid4(), quantity=1))
    with pytest.raises(IntegrityConstraintError) as info, translate_errors():
        await session.commit()
    assert not isinstance(info.value, AlreadyExistsError)
    assert info.value.http_status == 409
    await session.rollback()


async def test_not_null_violation(session: AsyncSession) -> None:
    """A missing NOT NULL value is an IntegrityConstraintError."""
    now = datetime.now(UTC)
    statement = insert(Invoice).values(
        id=uuid.uuid4(), created_at=now, updated_at=now, number="NN-1", tenant_id=None
    )
    with pytest.raises(IntegrityConstraintError), translate_errors():
        await session.exec(statement)  # type: ignore[call-overload]


async def test_naive_datetime_is_validation_error(session: AsyncSession) -> None:
    """A naive datetime never reaches the database: ValidationError."""
    invoice = Invoice(number="NAIVE-1", tenant_id="acme")
    invoice.created_at = invoice.created_at.replace(tzinfo=None)
    session.add(invoice)
    with pytest.raises(ValidationError, match="naive"), translate_errors():
        await session.flush()
    await session.rollback()


async def test_pool_exhaustion_is_timeout(db: Database) -> None:
    """Waiting too long for a pooled connection is an OperationTimeoutError."""
    tight = Database(
        db.config.model_copy(update={"pool_size": 1, "max_overflow": 0}),
        pool_timeout=0.2,
    )
    try:
        async with tight.engine.connect() as held:
            await held.exec_driver_sql("SELECT 1")
            with pytest.raises(OperationTimeoutError) as info, translate_errors():
                async with tight.engine.connect():
                    pass  # pragma: no cover - never reached
        assert isinstance(info.value.__cause__, sa_exc.TimeoutError)
    finally:
        await tight.dispose()


async def test_sqlite_locked_is_timeout(sqlite_path: Path) -> None:
    """A write blocked by another writer past the busy timeout is a timeout."""
    config = DatabaseConfig(url=f"sqlite:///{sqlite_path}", sqlite_busy_timeout=0)
    async with Database(config) as db:
        await db.create_all()
        async with db.engine.connect() as first, db.engine.connect() as second:
            await first.begin()
            await first.exec_driver_sql("DELETE FROM invoice")
            await second.begin()
            with (
                pytest.raises(OperationTimeoutError, match="locked"),
                translate_errors(),
            ):
                await second.exec_driver_sql("DELETE FROM invoice")
            await second.rollback()
            await first.rollback()


@pytest.mark.postgres
async def test_statement_timeout(pg_factory: PgFactory) -> None:
    """Server `statement_timeout` (SQLSTATE 57014) is an OperationTimeoutError."""
    db = await pg_factory(statement_timeout=0.1)
    with pytest.raises(OperationTimeoutError) as info, translate_errors():
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT pg_sleep(2)")
    assert info.value.details["sqlstate"] == "57014"


@pytest.mark.postgres
async def test_command_timeout(pg_factory: PgFactory) -> None:
    """The asyncpg client-side `command_timeout` is an OperationTimeoutError."""
    db = await pg_factory(command_timeout=0.1)
    with pytest.raises(OperationTimeoutError), translate_errors():
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT pg_sleep(2)")


@pytest.mark.postgres
async def test_refused_connection() -> None:
    """Nothing listening on the port: DatabaseConnectionError."""
    async with Database("postgresql://postgres@127.0.0.1:9/test") as db:
        with pytest.raises(DatabaseConnectionError) as info:
            await db.ping()
    assert info.value.transient
    assert info.value.__cause__ is not None


@pytest.mark.postgres
async def test_terminated_backend(pg_factory: PgFactory) -> None:
    """A server-side kill of the session is a DatabaseConnectionError."""
    db = await pg_factory(pool_pre_ping=False)
    async with db.engine.connect() as victim, db.engine.connect() as killer:
        pid = (await victim.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
        await killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(DatabaseConnectionError), translate_errors():
            await victim.exec_driver_sql("SELECT 1")


@pytest.mark.postgres
async def test_serialization_failure(pg_factory: PgFactory) -> None:
    """Write skew under SERIALIZABLE (SQLSTATE 40001) is a TransactionConflictError."""
    db = await pg_factory()
    table = f"skew_{uuid.uuid4().hex[:8]}"
    async with db.engine.begin() as setup:
        await setup.exec_driver_sql(f"CREATE TABLE {table} (k int, v int)")
        await setup.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    try:
        engine = db.engine.execution_options(isolation_level="SERIALIZABLE")
        async with engine.connect() as a, engine.connect() as b:
            await a.begin()
            await b.begin()
            await a.exec_driver_sql(f"SELECT sum(v) FROM {table}")
            await b.exec_driver_sql(f"SELECT sum(v) FROM {table}")
            await a.exec_driver_sql(f"UPDATE {table} SET v = 1 WHERE k = 1")
            await b.exec_driver_sql(f"UPDATE {table} SET v = 1 WHERE k = 2")
            await a.commit()
            with pytest.raises(TransactionConflictError) as info, translate_errors():
                await b.commit()
            assert info.value.sqlstate == "40001"
            assert info.value.transient
    finally:
        async with db.engine.begin() as cleanup:
            await cleanup.exec_driver_sql(f"DROP TABLE {table}")


@pytest.mark.postgres
async def test_deadlock(pg_factory: PgFactory) -> None:
    """Crossed row locks (SQLSTATE 40P01) are a TransactionConflictError."""
    db = await pg_factory()
    table = f"dead_{uuid.uuid4().hex[:8]}"
    async with db.engine.begin() as setup:
        await setup.exec_driver_sql(f"CREATE TABLE {table} (k int primary key)")
        await setup.exec_driver_sql(f"INSERT INTO {table} VALUES (1), (2)")
    try:
        async with db.engine.connect() as a, db.engine.connect() as b:
            await a.begin()
            await b.begin()
            await a.exec_driver_sql(f"SELECT * FROM {table} WHERE k = 1 FOR UPDATE")
            await b.exec_driver_sql(f"SELECT * FROM {table} WHERE k = 2 FOR UPDATE")

            async def lock(conn_key: int) -> None:
                conn = a if conn_key == 2 else b
                await conn.exec_driver_sql(
                    f"SELECT * FROM {table} WHERE k = {conn_key} FOR UPDATE"
                )

            results = await asyncio.gather(lock(2), lock(1), return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert len(failures) == 1
            with pytest.raises(TransactionConflictError) as info, translate_errors():
                raise failures[0]
            assert info.value.sqlstate == "40P01"
            await a.rollback()
            await b.rollback()
    finally:
        async with db.engine.begin() as cleanup:
            await cleanup.exec_driver_sql(f"DROP TABLE {table}")
