"""`create_many`: many validated rows in one bulk write (private).

Two ways, one result. On PostgreSQL, when every row's values are known on
the client and nobody observes the engine, the rows go through one `COPY`
(the driver's binary copy), each value converted by its column type's bind
processor as an INSERT would convert it, and the Python defaults of columns a
row leaves out evaluated as SQLAlchemy evaluates them. Otherwise (SQLite, a
column the database fills, such as a serial key or a `server_default`, or
someone listening) SQLAlchemy writes them in one executemany (Core's, or the
ORM's when rows name different columns) and returns what the database
generated, in input order.

Either way the objects returned hold the rows as written: the validated
values, plus the defaults and generated values of the columns a row left
out, as `session.add_all()` leaves objects after a flush.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from sqlalchemy import insert as sa_insert

from ..exceptions import translate_errors
from . import _executor, _replicas, _rows
from ._driver import evaluate_default
from ._rows import batch_allocation
from ._validation import per_call_fields
from ._writes import by_column
from .scoping import SCOPED
from .transaction import TransactionManager

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._driver import DriverExecutor
    from ._facts import Facts
    from .database import Database
    from .session import AsyncSession

__all__ = ["write"]


def _generated(facts: Facts) -> frozenset[str]:
    """Attribute keys of the columns whose value the database makes when left out."""
    table = facts.table
    auto = table.autoincrement_column
    return frozenset(
        key
        for key, column in facts.column.items()
        if column is auto
        or column.server_default is not None
        or column.identity is not None
        or (column.default is not None and column.default.is_sequence)
    )


async def write(
    facts: Facts,
    rows: Sequence[dict[str, Any]],
    *,
    session: AsyncSession | None,
    db: Database,
) -> list[Any]:
    """Insert validated `rows` (fresh dicts, every field); the detached objects."""
    target = _executor.session_of(session)
    generated = _generated(facts)
    exact = db.dialect == "postgresql" and not any(
        row[key] is None for key in generated for row in rows
    )
    if exact:
        done = await _copy(facts, rows, target, db)
        if done is not None:
            return done
    # Python defaults computed here as for the COPY: each `None` they give
    # is written as NULL (`render_nulls`), as SQLAlchemy writes a default's
    # `None`, so no row leaves them out and only server-made values need
    # `RETURNING`. Every other `None` follows SQLAlchemy's rule.
    _fill_defaults(facts, rows)
    keep = facts.none_is_value | (_python_defaulted(facts) - generated)
    given = [
        {key: value for key, value in row.items() if value is not None or key in keep}
        for row in rows
    ]
    with translate_errors():
        if target is not None:
            return await _orm_insert(facts, given, target)
        async with TransactionManager(db) as tx:
            return await _orm_insert(facts, given, tx.session)


def _python_defaulted(facts: Facts) -> frozenset[str]:
    """Attribute keys of the columns with a Python default (scalar or callable)."""
    return frozenset(
        key
        for key, column in facts.column.items()
        if column.default is not None and not column.default.is_sequence
    )


def _fill_defaults(facts: Facts, rows: Sequence[dict[str, Any]]) -> None:
    """Give each `None` the column's Python default, as an INSERT would (in place).

    SQLAlchemy treats `None` as "not given" (unless the type stores `None`
    as a value) and computes the column's default for the row instead. A
    default that depends on the call only (the clock, the acting user, the
    tenant: see `_validation`) is computed once for the batch.
    """
    defaulted = _python_defaulted(facts) - facts.none_is_value
    fill = [
        (key, facts.column[key], facts.column[key].default)
        for key in facts.keys
        if key in defaulted
    ]
    if not fill:
        return
    once = per_call_fields(facts.model)
    by_attribute = all(facts.attribute[key] == key for key in facts.attribute)
    for key, column, default in fill:
        shared: list[Any] = []
        per_call = facts.attribute[key] in once
        for row in rows:
            if row[key] is None:
                if shared:
                    row[key] = shared[0]
                    continue
                parameters = row if by_attribute else by_column(facts, row)
                row[key] = evaluate_default(default, column, parameters)
                if per_call:
                    shared.append(row[key])


async def _copy(
    facts: Facts,
    rows: Sequence[dict[str, Any]],
    session: AsyncSession | None,
    db: Database,
) -> list[Any] | None:
    """COPY the rows on the driver; `None` when the driver may not run here."""
    if session is None:
        driver = _executor.pooled_driver(db, facts)
        found = None
    else:
        found = await _executor.session_driver(session, facts)
        driver = None if found is None else found[0]
    if driver is None or not driver.copy:
        return None
    _fill_defaults(facts, rows)
    records = _records(facts, driver, rows)
    table = facts.table
    columns = [column.name for column in facts.columns]

    async def copy(connection: Any) -> None:
        await connection.copy_records_to_table(
            table.name, schema_name=table.schema, columns=columns, records=records
        )

    failed: list[Exception] = []
    noted: list[Any] = []

    async def send() -> None:
        try:
            if found is None:
                await driver.use(copy, write=True)
                # The write's note for read-your-writes lives in this task's
                # context: the caller's context takes it over below.
                noted.append(_replicas.written_here())
            else:
                _, connected, connection = found
                assert session is not None  # noqa: S101 - found came from it
                await _executor.on_connection(
                    session, connection, driver, connected, copy
                )
        except Exception as exc:  # noqa: BLE001 - re-raised below, unwrapped
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        # The objects are built while the server ingests the rows: the COPY
        # task has sent its data by the time this goes on (its first wait).
        await anyio.lowlevel.checkpoint()
        with batch_allocation():
            made = _rows.from_values(facts, rows)
    for marks in noted:
        _replicas.carry(marks)
    if failed:
        with translate_errors():
            raise failed[0]
    return made


def _records(
    facts: Facts, driver: DriverExecutor, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[Any, ...]]:
    """The rows as COPY records: each value bind-processed by its column type.

    Column by column: a value that is the very object of the row before
    (a batch's shared timestamp, `None`) reuses that row's processed value.
    """
    dialect = driver.dialect
    columns: list[list[Any]] = []
    for key, column in zip(facts.keys, facts.columns, strict=True):
        values = [row[key] for row in rows]
        process = column.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            values = _processed(values, process)
        columns.append(values)
    return list(zip(*columns, strict=True))


_NOTHING = object()


def _processed(values: list[Any], process: Any) -> list[Any]:
    first = values[0] if values else None
    if values and all(value is first for value in values):  # one shared value (or None)
        return [process(first)] * len(values)
    done = []
    last_in: Any = _NOTHING
    last_out: Any = None
    for value in values:
        if value is not last_in:
            last_in, last_out = value, process(value)
        done.append(last_out)
    return done


async def _orm_insert(
    facts: Facts, given: Sequence[dict[str, Any]], session: AsyncSession
) -> list[Any]:
    """SQLAlchemy's bulk INSERT, returning what each row left to defaults.

    A left-out column without any default is NULL, as written: its value is
    `None` (not what its type would read NULL as), as `add_all()` leaves it.
    """
    defaulted = _generated(facts) | {
        key for key, column in facts.column.items() if column.default is not None
    }
    left_out = [
        key
        for key in facts.keys
        if key in defaulted and any(key not in row for row in given)
    ]
    names = set(given[0])
    if all(set(row) == names for row in given):
        # One key set: SQLAlchemy Core's executemany of `insert(table)`, the
        # same INSERT without the ORM's per-row bookkeeping.
        table = facts.table
        statement: Any = sa_insert(table)
        returned = [facts.column[key] for key in left_out]
        columns = all(facts.attribute[key] == key for key in facts.attribute)
        params = list(given) if columns else [by_column(facts, row) for row in given]
    else:  # rows name different columns: the ORM groups them
        statement = sa_insert(facts.model)
        returned = [getattr(facts.model, key) for key in left_out]
        params = list(given)
    if left_out:
        statement = statement.returning(*returned, sort_by_parameter_order=True)
    if facts.tenant:
        _executor.scope_session(session)
    result = await session.exec(
        statement,
        params=params,
        execution_options={SCOPED: True, "render_nulls": True},
    )
    written = [dict(row) for row in given]
    if left_out:
        for row, returned in zip(written, result.all(), strict=True):
            for key, value in zip(left_out, returned, strict=True):
                row.setdefault(key, value)
    for row in written:
        for key in facts.keys:
            row.setdefault(key, None)
    with batch_allocation():
        return _rows.from_values(facts, written)
