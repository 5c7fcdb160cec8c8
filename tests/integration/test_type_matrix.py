"""Type matrix: AsyncRepository returns and stores what plain SQLAlchemy does.

Differential tests for spec points 1-4, 9 and 10. For every column type of
`tests/type_models.py`, every repository method, every route (`route`:
driver, session, transaction) and both backends, what a repository call
returns, and the row it stores, is compared attribute by attribute (`type`
and `repr`) with what a plain `sqlalchemy.ext.asyncio.AsyncSession` on a
plain `create_async_engine(db.url)` returns and stores for the same row or
the same input.

A test runs one step per (method, column) and reports every mismatch and
every error of its steps together, one line each, so one run lists every
difference. Tables are parametrised per backend: the PostgreSQL-only table
(JSONB, ARRAY) exists, and is tested, on PostgreSQL only.
"""

from __future__ import annotations

import traceback
import types
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Enum,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Time,
    TypeDecorator,
    Uuid,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from dotmac_core import (
    AsyncRepository,
    Database,
    NotFoundError,
    PaginationParams,
    ValidationError,
)

from ..conftest import Route
from ..type_models import (
    Colour,
    Level,
    MatrixDefaults,
    MatrixHero,
    MatrixKeywords,
    MatrixNumber,
    MatrixPair,
    MatrixPg,
    MatrixRenamed,
    MatrixRow,
    Shade,
)

pytestmark = [
    pytest.mark.usefixtures("repo_db"),
    # SQLite stores NUMERIC as REAL: SQLAlchemy warns once for every Numeric
    # type it reads there, for plain SQLAlchemy exactly as for the toolkit.
    pytest.mark.filterwarnings(
        r"ignore:Dialect sqlite\+aiosqlite does \*not\* support Decimal objects"
        r":sqlalchemy.exc.SAWarning"
    ),
]

# --- sample inputs ---------------------------------------------------------------

PLUS_2 = timezone(timedelta(hours=2))
PLUS_530 = timezone(timedelta(hours=5, minutes=30))
MINUS_715 = timezone(-timedelta(hours=7, minutes=15))

#: Three inputs of the wide table: every type, edge values, None in row 1.
MATRIX_ROWS: tuple[dict[str, Any], ...] = (
    {
        "number": 0,
        "big": 9_223_372_036_854_775_807,
        "flag": True,
        "name": "plain",
        "body": "line one\nline two\ttab",
        "naive": datetime(2024, 2, 29, 13, 14, 15, 161718),
        "aware": datetime(2024, 2, 29, 13, 14, 15, 161718, tzinfo=PLUS_2),
        "stamp": datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=PLUS_530),
        "day": date(2024, 2, 29),
        "clock": time(13, 14, 15, 161718),
        "span": timedelta(days=1, seconds=2, microseconds=3),
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\xff\xfe",
        "colour": Colour.RED,
        "level": Level.LOW,
        "shade": Shade.LIGHT,
        "tone": Colour.GREEN,
        "doc": {"zeta": 1, "alpha": [1, 2.5, {"nested": True, "none": None}], "m": "ü"},
        "cents": Decimal("1.25"),
        "blank": "text",
        "opt_number": 7,
        "opt_big": -(2**40),
        "opt_flag": False,
        "opt_name": "optional",
        "opt_body": "",
        "opt_naive": datetime(2020, 5, 5, 5, 5, 5, 5),
        "opt_aware": datetime(2020, 5, 5, 5, 5, 5, 5, tzinfo=MINUS_715),
        "opt_day": date(2020, 5, 5),
        "opt_clock": time(5, 5, 5, 5),
        "opt_span": timedelta(seconds=5, microseconds=1),
        "opt_ref": uuid.UUID("00000000-0000-0000-0000-000000000001"),
        "opt_blob": b"\xff",
        "opt_colour": Colour.BLUE,
        "opt_level": Level.HIGH,
        "opt_doc": {"k": [1, {"j": None}], "a": "b"},
        "opt_cents": Decimal("0.5"),
    },
    {
        "number": -2_147_483_648,
        "big": -9_223_372_036_854_775_808,
        "flag": False,
        "name": "",
        "body": "",
        "naive": datetime(1999, 12, 31, 23, 59, 59, 999999),
        "aware": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=MINUS_715),
        "stamp": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=MINUS_715),
        "day": date(1970, 1, 1),
        "clock": time(0, 0),
        "span": timedelta(0),
        "ref": uuid.UUID(int=0),
        "blob": b"",
        "colour": Colour.GREEN,
        "level": Level.HIGH,
        "shade": Shade.DARK,
        "tone": Colour.BLUE,
        "doc": {},
        "cents": Decimal("-0.01"),
        "blank": None,
        **dict.fromkeys(
            (
                "opt_number",
                "opt_big",
                "opt_flag",
                "opt_name",
                "opt_body",
                "opt_naive",
                "opt_aware",
                "opt_day",
                "opt_clock",
                "opt_span",
                "opt_ref",
                "opt_blob",
                "opt_colour",
                "opt_level",
                "opt_doc",
                "opt_cents",
            )
        ),
    },
    {
        "number": 2_147_483_647,
        "big": 1,
        "flag": True,
        "name": "ünïcødé ✓ 漢字 🎉",
        "body": "é" * 500,
        "naive": datetime(2038, 1, 19, 3, 14, 8),
        "aware": datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
        "stamp": datetime(2038, 1, 19, 3, 14, 8, 500000, tzinfo=PLUS_2),
        "day": date(9999, 12, 31),
        "clock": time(23, 59, 59, 999999),
        "span": timedelta(days=-2, seconds=30),
        "ref": uuid.UUID(int=2**128 - 1),
        "blob": bytes(range(256)),
        "colour": Colour.BLUE,
        "level": Level.MID,
        "shade": Shade.LIGHT,
        "tone": Colour.RED,
        "doc": {"b": {"y": [], "x": -1.5}, "a": "s", "n": None},
        "cents": Decimal("99999.99"),
        "blank": "",
        "opt_number": -1,
        "opt_big": 2**53 + 1,
        "opt_flag": True,
        "opt_name": "Ω",
        "opt_body": "multi\nline",
        "opt_naive": datetime(1900, 1, 1, 0, 0, 0, 1),
        "opt_aware": datetime(2030, 6, 1, 12, 0, tzinfo=PLUS_530),
        "opt_day": date(1900, 1, 1),
        "opt_clock": time(12, 0, 0, 500000),
        "opt_span": timedelta(days=3650, microseconds=999999),
        "opt_ref": uuid.UUID("ffffffff-0000-4000-8000-000000000000"),
        "opt_blob": b"\x80\x81 not utf-8",
        "opt_colour": Colour.RED,
        "opt_level": Level.LOW,
        "opt_doc": {"z": {"y": {"x": [True, False, None]}}, "a": 0},
        "opt_cents": Decimal("-123.45"),
    },
)


#: Three inputs of the number table: scale kept, scale free, float edges.
NUMBER_ROWS: tuple[dict[str, Any], ...] = (
    {
        "money": Decimal("1.5"),
        "ratio": Decimal("3.14159265358979323846"),
        "floating": 0.1,
        "opt_money": Decimal("0.1"),
        "opt_ratio": Decimal("-12.5000"),
        "opt_floating": 2.5,
    },
    {
        "money": Decimal("-9999999999.99"),
        "ratio": Decimal("-0.000001"),
        "floating": -2.5e-10,
        "opt_money": None,
        "opt_ratio": None,
        "opt_floating": None,
    },
    {
        "money": Decimal("1234567890.10"),
        "ratio": Decimal("123456789.123456789"),
        "floating": 1e300,
        "opt_money": Decimal("-0.05"),
        "opt_ratio": Decimal("1E+5"),
        "opt_floating": -0.0,
    },
)


def _without_keys(data: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """`data` without the primary-key fields `keys`."""
    return {name: value for name, value in data.items() if name not in keys}


def _new_uuid_twin(data: Mapping[str, Any]) -> dict[str, Any]:
    """The reference copy of an input: another key where the input gives one."""
    return {**data, "id": uuid.uuid4()} if "id" in data else dict(data)


def _hero_twin(data: Mapping[str, Any]) -> dict[str, Any]:
    """A hero's reference copy: an explicit id moves up by a million."""
    if data.get("id") is None:
        return dict(data)
    return {**data, "id": data["id"] + 1_000_000}


def _pair_twin(data: Mapping[str, Any]) -> dict[str, Any]:
    """A pair's reference copy: the same region, another number."""
    return {**data, "number": data["number"] + 1000}


@dataclass(frozen=True)
class Shape:
    """One table of the matrix and its sample inputs.

    Attributes:
        name: The id in test names.
        model: The table model.
        rows: Three inputs for creates and reads.
        changes: Two update payloads, applied one after the other.
        twin: The reference copy of an input (another key where one is given).
        new_key: An explicit key for the i-th insert of an upsert.
        postgres_only: Whether the table exists on PostgreSQL only.
        upserts: The rows whose values upsert writes over row 0, in order.
    """

    name: str
    model: type[Any]
    rows: tuple[dict[str, Any], ...]
    changes: tuple[dict[str, Any], ...]
    twin: Callable[[Mapping[str, Any]], dict[str, Any]]
    new_key: Callable[[int], dict[str, Any]]
    postgres_only: bool = False
    # Row 2 before row 1: the row shape's `blank` then goes '' -> NULL; the
    # other way round plain setattr ('' over a NULL that reads as '') writes
    # nothing, which is SQLAlchemy's change detection, not a stored value.
    upserts: tuple[int, ...] = (2, 1)


def _uuid_key(_i: int) -> dict[str, Any]:
    return {"id": uuid.uuid4()}


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            name="row",
            model=MatrixRow,
            rows=MATRIX_ROWS,
            changes=(MATRIX_ROWS[2], MATRIX_ROWS[1]),  # see `Shape.upserts`
            twin=_new_uuid_twin,
            new_key=_uuid_key,
        ),
        Shape(
            name="number",
            model=MatrixNumber,
            rows=NUMBER_ROWS,
            changes=(NUMBER_ROWS[1], NUMBER_ROWS[2]),
            twin=_new_uuid_twin,
            new_key=_uuid_key,
        ),
        Shape(
            name="defaults",
            model=MatrixDefaults,
            rows=(
                {"note": "omitted"},
                {"note": "given", "srv_null": "mine", "srv_req": "mine"},
                {"note": "none", "srv_null": None, "srv_req": None},
            ),
            changes=(
                {"note": "changed", "srv_null": None, "srv_req": "changed"},
                {"srv_null": "back"},
            ),
            twin=_new_uuid_twin,
            new_key=_uuid_key,
            # Row 2 sets srv_req to NULL, which an update refuses (NOT NULL).
            upserts=(1, 0),
        ),
        Shape(
            name="keywords",
            model=MatrixKeywords,
            rows=(
                {"order": 1, "select": "a", "user": "u1", "group": "g"},
                {"order": -5, "select": "", "user": "ü", "group": None},
                {"order": 3, "select": "z", "user": "root", "group": "wheel"},
            ),
            changes=(
                {"order": 2, "select": "b", "user": "u2", "group": None},
                {"group": "back"},
            ),
            twin=_new_uuid_twin,
            new_key=_uuid_key,
        ),
        Shape(
            name="renamed",
            model=MatrixRenamed,
            rows=(
                {"label": "b", "note": "x", "rank": 2},
                {"label": "a", "note": None, "rank": 1},
                {"label": "c", "note": "y", "rank": 3},
            ),
            changes=({"label": "changed", "note": None}, {"note": "back", "rank": 9}),
            twin=_new_uuid_twin,
            new_key=_uuid_key,
        ),
        Shape(
            name="hero",
            model=MatrixHero,
            rows=(
                {"name": "Deadpond", "power": 3, "born": date(1990, 1, 1)},
                {"name": "Spider-Boy", "power": -1, "born": None},
                {"name": "Rusty-Man", "power": 1_000_000, "born": date(1970, 5, 5)},
            ),
            changes=({"name": "Renamed", "born": None}, {"power": 7}),
            twin=_hero_twin,
            new_key=lambda i: {"id": 1_000_000 + i},
        ),
        Shape(
            name="pair",
            model=MatrixPair,
            rows=(
                {"region": "eu", "number": 1, "amount": 15, "note": "first"},
                {"region": "eu", "number": 2, "amount": -1, "note": None},
                {"region": "us", "number": 1, "amount": 100, "note": "ü"},
            ),
            changes=({"amount": 25, "note": None}, {"note": "back"}),
            twin=_pair_twin,
            new_key=lambda i: {"number": 500 + i},
        ),
        Shape(
            name="pg",
            model=MatrixPg,
            rows=(
                {
                    "doc": {"zeta": 1, "alpha": [1, {"b": 2, "a": 1}], "mid": None},
                    "opt_doc": {"k": "v", "a": [None]},
                    "numbers": [3, 1, 2],
                    "words": ["b", "a", "ü"],
                    "opt_words": ["x"],
                },
                {
                    "doc": {},
                    "opt_doc": None,
                    "numbers": [],
                    "words": [],
                    "opt_words": None,
                },
                {
                    "doc": {"bb": 1, "a": 2, "ccc": [True, False, 1.5]},
                    "opt_doc": {"nested": {"z": 1, "y": 2}},
                    "numbers": [-2_147_483_648, 2_147_483_647],
                    "words": [""],
                    "opt_words": [],
                },
            ),
            changes=(
                {"doc": {"new": [1, 2], "keys": "here"}, "opt_doc": None},
                {"numbers": [9], "words": ["z"], "opt_words": None},
            ),
            twin=_new_uuid_twin,
            new_key=_uuid_key,
            postgres_only=True,
        ),
    )
}

#: Plain `SQLModel` tables: not in `DBBaseModel.metadata`, created by this module.
PLAIN_MODELS = (MatrixHero, MatrixPair, MatrixPg)
#: The `DBBaseModel` tables: `db` creates them (collection registers them first);
#: created here too if missing, emptied by `repo_db`, dropped with the others.
BASE_MODELS = (MatrixRow, MatrixNumber, MatrixDefaults, MatrixKeywords, MatrixRenamed)


def _plain_tables(dialect: str) -> list[Any]:
    """The plain tables that exist on `dialect` (JSONB / ARRAY: PostgreSQL only)."""
    return [
        model.__table__
        for model in PLAIN_MODELS
        if dialect == "postgresql" or model is not MatrixPg
    ]


def _shape_params(*, soft_only: bool = False) -> list[Any]:
    """`(db, shape)` pairs: every shape on each backend that has its table."""
    params = []
    for backend in ("sqlite", "postgres"):
        marks = [pytest.mark.postgres] if backend == "postgres" else []
        for shape in SHAPES.values():
            if shape.postgres_only and backend != "postgres":
                continue
            if soft_only and "deleted_at" not in shape.model.__table__.c:
                continue
            params.append(
                pytest.param(
                    backend, shape.name, id=f"{backend}-{shape.name}", marks=marks
                )
            )
    return params


def over_shapes(*, soft_only: bool = False) -> pytest.MarkDecorator:
    """Parametrise a test over the backends and the shapes each one has."""
    return pytest.mark.parametrize(
        ("db", "shape_name"),
        _shape_params(soft_only=soft_only),
        indirect=["db"],
        scope="session",
    )


# --- fixtures --------------------------------------------------------------------


class Plain:
    """Plain SQLAlchemy on the test database, no dotmac_core: the reference side.

    Writes use a session each; reads share one session per test (its
    identity map emptied before each read, so every read loads fresh objects).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reader: AsyncSession | None = None

    def session(self) -> AsyncSession:
        """A plain session that keeps its objects readable after commit."""
        return AsyncSession(self.engine, expire_on_commit=False)

    async def execute(self, statement: Any) -> Any:
        """Run a read on the test's read session, identity map emptied first."""
        if self._reader is None:
            self._reader = self.session()
        self._reader.expunge_all()
        return await self._reader.execute(statement)

    async def end_reads(self) -> None:
        """Close the test's read session (its transaction holds no writes)."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()


@pytest.fixture(scope="module")
async def plain(db: Database) -> AsyncIterator[Plain]:
    """Plain SQLAlchemy on `db`'s URL, with the plain SQLModel tables in place."""
    tables = _plain_tables(db.dialect)
    async with db.engine.begin() as conn:
        for table in [*(model.__table__ for model in BASE_MODELS), *tables]:
            await conn.run_sync(table.create, checkfirst=True)
    engine = create_async_engine(db.url)
    yield Plain(engine)
    await engine.dispose()
    async with db.engine.begin() as conn:
        for table in reversed(tables):
            await conn.run_sync(table.drop, checkfirst=True)


@pytest.fixture(autouse=True)
async def _empty_plain_tables(db: Database, plain: Plain) -> AsyncIterator[None]:
    """End the test's plain reads, then empty the plain tables (`repo_db`: the rest)."""
    yield
    await plain.end_reads()
    async with db.engine.begin() as conn:
        for table in _plain_tables(db.dialect):
            await conn.execute(table.delete())


# --- comparing -------------------------------------------------------------------

#: Columns the toolkit's clock fills: compared by type and UTC offset only
#: between two different rows.
CLOCK = frozenset({"created_at", "updated_at", "deleted_at"})
FAILED: Any = object()


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _short(value: Any, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _origin(exc: BaseException) -> str:
    """Where `exc` was raised: the innermost frame, as `file:line (function)`."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    path = "/".join(frame.filename.split("/")[-2:])
    return f" at {path}:{frame.lineno} ({frame.name})"


def _describe(exc: BaseException) -> str:
    """An exception as `Type: message`, where it was raised, and its cause."""
    text = f"raised {_type_name(exc)}: {_short(str(exc), 220)}{_origin(exc)}"
    cause = exc.__cause__
    if cause is not None:
        text += f" (from {_type_name(cause)}: {_short(str(cause), 160)}"
        text += f"{_origin(cause)})"
    return text


def _read(row: Any, attr: str) -> Any:
    return row[attr] if isinstance(row, Mapping) else getattr(row, attr)


def _offset(value: Any) -> Any:
    return value.utcoffset() if isinstance(value, datetime) else None


def assert_same(
    ours: Any,
    reference: Any,
    attrs: Sequence[str],
    *,
    by_type: Sequence[str] = (),
    by_offset: Sequence[str] = (),
) -> None:
    """Assert that `ours` and `reference` hold the same values in `attrs`.

    Same means `type(a) is type(b)` and `repr(a) == repr(b)`; attributes in
    `by_type` are compared by type only (keys of two different rows), those
    in `by_offset` by type and UTC offset (clock timestamps of two rows).
    Rows are objects or mappings.

    Raises:
        AssertionError: one line per differing attribute, with both types and reprs.
    """
    found = []
    for attr in attrs:
        try:
            a = _read(ours, attr)
        except Exception as exc:  # noqa: BLE001 - an unreadable value is a finding
            found.append(f"{attr}: ours unreadable, {_describe(exc)}")
            continue
        try:
            b = _read(reference, attr)
        except Exception as exc:  # noqa: BLE001 - same for the reference
            found.append(f"{attr}: reference unreadable, {_describe(exc)}")
            continue
        if attr in by_type:
            same = type(a) is type(b)
        elif attr in by_offset:
            same = type(a) is type(b) and _offset(a) == _offset(b)
        else:
            same = type(a) is type(b) and repr(a) == repr(b)
        if not same:
            found.append(
                f"{attr}: ours {_type_name(a)} {_short(a)} | "
                f"reference {_type_name(b)} {_short(b)}"
            )
    if found:
        raise AssertionError("; ".join(found))


_REPOSITORIES: dict[type[Any], type[AsyncRepository[Any]]] = {}


def _repository_class(model: type[Any]) -> type[AsyncRepository[Any]]:
    """`class <Model>Repository(AsyncRepository[<Model>])`, made once per model."""
    made = _REPOSITORIES.get(model)
    if made is None:
        made = types.new_class(
            f"{model.__name__}Repository",
            (AsyncRepository[model],),  # type: ignore[valid-type]
            exec_body=lambda body: body.update(__doc__=f"Rows of {model.__name__}."),
        )
        _REPOSITORIES[model] = made
    return made


def _orderable(column: Any) -> bool:
    """Whether lt / gt and ORDER BY make sense on the column's type."""
    kind = column.type
    if isinstance(kind, Enum | Boolean | JSON):
        return False
    if isinstance(kind, TypeDecorator) and not isinstance(kind, Interval):
        kind = kind.impl_instance
    return isinstance(
        kind,
        Numeric
        | Integer
        | String
        | DateTime
        | Date
        | Time
        | Interval
        | Uuid
        | LargeBinary,
    )


class Matrix:
    """One test's two sides: the repository under `route`, and plain SQLAlchemy.

    Steps run repository calls, each in `route.scope()`; mismatches and
    errors are collected and reported together by `check`.
    """

    def __init__(self, shape: Shape, route: Route, plain: Plain) -> None:
        self.shape = shape
        self.model = shape.model
        self.route = route
        self.plain = plain
        self.problems: list[str] = []
        mapper = inspect(self.model)
        self.columns = {prop.key: prop.columns[0] for prop in mapper.column_attrs}
        self.attrs = list(self.columns)
        self.keys = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
        self.clock = [attr for attr in self.attrs if attr in CLOCK]
        self.nullable = [a for a, c in self.columns.items() if c.nullable]
        self.flags = [f"{attr} IS NULL" for attr in self.nullable]
        self.orderable = [a for a, c in self.columns.items() if _orderable(c)]
        self.keyset = [a for a in self.orderable if not self.columns[a].nullable]
        # `=` on JSON is an error on PostgreSQL (JSONB has it).
        self.comparable = [
            a
            for a, c in self.columns.items()
            if not isinstance(c.type, JSON) or isinstance(c.type, JSONB)
        ]
        self.soft = "deleted_at" in self.columns
        self.repository: AsyncRepository[Any] | None = None

    @classmethod
    async def start(cls, shape_name: str, route: Route, plain: Plain) -> Matrix:
        """The matrix of one shape; fails the test if no repository can be made."""
        matrix = cls(SHAPES[shape_name], route, plain)
        try:
            matrix.repository = _repository_class(matrix.model)()
        except Exception as exc:  # noqa: BLE001 - reported as the test's failure
            matrix.problems.append(
                f"AsyncRepository[{matrix.model.__name__}]: {_describe(exc)}"
            )
        matrix.check()
        return matrix

    # --- the repository side ---

    async def attempt(
        self, method: str, *args: Any, **kwargs: Any
    ) -> tuple[Any, Exception | None]:
        """Run one repository call in the route's scope: (result, error)."""
        assert self.repository is not None
        try:
            async with self.route.scope():
                return await getattr(self.repository, method)(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - the caller judges the error
            return FAILED, exc

    async def call(self, label: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`attempt`, recording an error as a finding (then `FAILED`)."""
        result, error = await self.attempt(method, *args, **kwargs)
        if error is not None:
            self.problems.append(f"{label}: {_describe(error)}")
        return result

    # --- the plain SQLAlchemy side ---

    async def add(self, inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
        """`session.add_all([Model(**data), ...])` + commit; the objects after it."""
        objects = [self.model(**dict(data)) for data in inputs]
        async with self.plain.session() as session:
            session.add_all(objects)
            await session.commit()
        return objects

    async def set(self, key: tuple[Any, ...], changes: Mapping[str, Any]) -> None:
        """Plain update: `session.get` + setattr + commit."""
        async with self.plain.session() as session:
            row = await session.get(self.model, key)
            assert row is not None, f"reference row {key} is missing"
            for name, value in changes.items():
                setattr(row, name, value)
            await session.commit()

    def _where_key(self, key: Sequence[Any]) -> list[Any]:
        return [
            self.columns[attr] == value
            for attr, value in zip(self.keys, key, strict=True)
        ]

    def _order(self, attr: str | None) -> list[Any]:
        """ORDER BY `attr` then the key; `None`: the default page order."""
        keys = [self.columns[name] for name in self.keys]
        if attr is None:
            if "created_at" in self.columns:
                return [self.columns["created_at"], *keys]
            return keys
        return [self.columns[attr], *keys]

    async def rows(self, *criteria: Any, order: str | None = None) -> list[Any]:
        """Plain `select(Model).where(...)` in key order (or by `order`)."""
        statement = select(self.model).where(*criteria).order_by(*self._order(order))
        return list((await self.plain.execute(statement)).scalars())

    async def stored(self, key: Sequence[Any]) -> dict[str, Any] | None:
        """The stored row: its attributes plus `IS NULL` of each nullable column."""
        flags = [self.columns[attr].is_(None) for attr in self.nullable]
        statement = select(self.model, *flags).where(*self._where_key(key))
        found = (await self.plain.execute(statement)).first()
        if found is None:
            return None
        row, *nulls = found
        values = {attr: getattr(row, attr) for attr in self.attrs}
        values.update(
            {flag: bool(null) for flag, null in zip(self.flags, nulls, strict=True)}
        )
        return values

    # --- keys ---

    def key(self, row: Any) -> tuple[Any, ...]:
        """The primary key of a row (object or mapping), in column order."""
        return tuple(_read(row, attr) for attr in self.keys)

    def ident(self, key: Sequence[Any], *, as_dict: bool = False) -> Any:
        """The `id` argument for `key`: the value, a tuple, or a dict by name."""
        if len(self.keys) == 1:
            return key[0]
        if as_dict:
            return dict(zip(self.keys, key, strict=True))
        return tuple(key)

    # --- findings ---

    def same(
        self,
        label: str,
        ours: Any,
        reference: Any,
        *,
        other_row: bool = False,
        flags: bool = False,
    ) -> None:
        """Record the attributes that differ; `other_row`: keys, clock loosely."""
        attrs = [*self.attrs, *(self.flags if flags else ())]
        try:
            assert_same(
                ours,
                reference,
                attrs,
                by_type=self.keys if other_row else (),
                by_offset=self.clock if other_row else (),
            )
        except AssertionError as exc:
            self.problems.append(f"{label}: {exc}")

    def same_rows(self, label: str, ours: Any, reference: Sequence[Any]) -> None:
        """Record differences between a list of returned rows and plain ones."""
        if ours is FAILED:
            return
        try:
            ours = list(ours)
            our_keys = [self.key(row) for row in ours]
        except Exception as exc:  # noqa: BLE001 - unreadable rows are a finding
            self.problems.append(f"{label}: rows unreadable, {_describe(exc)}")
            return
        ref_keys = [self.key(row) for row in reference]
        if our_keys != ref_keys:
            self.problems.append(
                f"{label}: rows {_short(our_keys, 200)} | "
                f"reference {_short(ref_keys, 200)}"
            )
            return
        for i, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
            self.same(f"{label} row {i}", mine, theirs)

    def expect(self, label: str, ours: Any, wanted: Any) -> None:
        """Record `ours` unless it equals `wanted` (and has its type)."""
        if ours is FAILED:
            return
        if type(ours) is not type(wanted) or ours != wanted:
            self.problems.append(f"{label}: got {_short(ours)}, expected {wanted!r}")

    async def written(
        self, label: str, ours: Any, reference_key: Sequence[Any]
    ) -> None:
        """Compare a write's returned row with its stored row, and that with plain's.

        The returned row must equal a plain read of it right afterwards; the
        stored row must equal the row plain SQLAlchemy stored for the same
        input (`reference_key`), keys and clock columns aside.
        """
        if ours is FAILED:
            return
        reference = await self.stored(reference_key)
        assert reference is not None, f"{label}: reference row is missing"
        try:
            key = self.key(ours)
        except Exception as exc:  # noqa: BLE001 - an unreadable key is a finding
            self.problems.append(f"{label}: returned key unreadable, {_describe(exc)}")
            return
        stored = await self.stored(key)
        if stored is None:
            self.problems.append(f"{label}: no stored row has the returned key {key}")
            return
        self.same(f"{label} returned vs stored", ours, stored)
        self.same(
            f"{label} stored vs plain", stored, reference, other_row=True, flags=True
        )

    def check(self) -> None:
        """Fail the test with every finding, one per line."""
        if self.problems:
            lines = "\n".join(f"  - {problem}" for problem in self.problems)
            pytest.fail(
                f"{self.model.__name__} on route {self.route.name}: "
                f"{len(self.problems)} finding(s)\n{lines}",
                pytrace=False,
            )

    # --- filters ---

    def filters(self, rows: Sequence[Any]) -> list[tuple[str, str, Any]]:
        """The (attr, op, value) filters of the shape's columns.

        eq on every comparable column (row 0's value), lt / gt on orderable
        ones (pivot: a stored value), is_null true and false on nullable ones.
        """
        found = [(attr, "eq", getattr(rows[0], attr)) for attr in self.comparable]
        for attr in self.orderable:
            pivot = next(
                (
                    value
                    for row in (rows[1], rows[2], rows[0])
                    if (value := getattr(row, attr)) is not None
                ),
                None,
            )
            if pivot is not None:
                found += [(attr, "lt", pivot), (attr, "gt", pivot)]
        for attr in self.nullable:
            found += [(attr, "is_null", True), (attr, "is_null", False)]
        return found

    def criterion(self, attr: str, op: str, value: Any) -> Any:
        """The plain SQLAlchemy criterion for one filter."""
        column = self.columns[attr]
        if op == "is_null":
            return column.is_(None) if value else column.is_not(None)
        if op == "lt":
            return column < value
        if op == "gt":
            return column > value
        return column.is_(None) if value is None else column == value


async def _stored_rows(matrix: Matrix) -> list[Any]:
    """Insert the shape's three rows the plain way; their plain reads, in order."""
    added = await matrix.add(matrix.shape.rows)
    keys = [matrix.key(row) for row in added]
    by_key = {matrix.key(row): row for row in await matrix.rows()}
    return [by_key[key] for key in keys]


# --- reads -----------------------------------------------------------------------


@over_shapes()
async def test_get_by_id(shape_name: str, route: Route, plain: Plain) -> None:
    """get_by_id returns, for each row, exactly what a plain session reads."""
    m = await Matrix.start(shape_name, route, plain)
    for i, row in enumerate(await _stored_rows(m)):
        key = m.key(row)
        forms = [False, True] if len(m.keys) > 1 else [False]
        for as_dict in forms:
            ident = m.ident(key, as_dict=as_dict)
            form = "" if len(m.keys) == 1 else " as dict" if as_dict else " as tuple"
            label = f"get_by_id(row {i}{form})"
            ours = await m.call(label, "get_by_id", ident)
            if ours is FAILED:
                continue
            if ours is None:
                m.problems.append(f"{label}: returned None")
                continue
            m.same(label, ours, row)
    m.check()


@over_shapes()
async def test_get_by_field_and_get_one(
    shape_name: str, route: Route, plain: Plain
) -> None:
    """get_by_field and get_one by each column return what a plain select returns."""
    m = await Matrix.start(shape_name, route, plain)
    rows = await _stored_rows(m)
    for attr in m.comparable:
        value = getattr(rows[0], attr)
        label = f"get_by_field({attr!r}, {_short(value, 40)})"
        expected = await m.rows(m.criterion(attr, "eq", value))
        ours = await m.call(label, "get_by_field", attr, value)
        if ours is not FAILED:
            m.same_rows(label, [] if ours is None else [ours], expected[:1])
        value = getattr(rows[1], attr)
        label = f"get_one({attr}={_short(value, 40)})"
        expected = await m.rows(m.criterion(attr, "eq", value))
        ours, error = await m.attempt("get_one", **{attr: value})
        if len(expected) == 1:
            if error is not None:
                m.problems.append(f"{label}: {_describe(error)}")
            else:
                m.same_rows(label, [ours], expected)
            continue
        wanted = NotFoundError if not expected else ValidationError
        if not isinstance(error, wanted):
            got = "a row" if error is None else _describe(error)
            m.problems.append(f"{label}: {got}, expected {wanted.__name__}")
    m.check()


@over_shapes()
async def test_list_count_exists_filters(
    shape_name: str, route: Route, plain: Plain
) -> None:
    """list, count and exists with eq / lt / gt / is_null on each column match plain."""
    m = await Matrix.start(shape_name, route, plain)
    rows = await _stored_rows(m)
    for attr, op, value in m.filters(rows):
        name = attr if op == "eq" else f"{attr}__{op}"
        filters = {name: value}
        label = f"{name}={_short(value, 40)}"
        expected = await m.rows(m.criterion(attr, op, value))
        m.same_rows(
            f"list({label})", await m.call(f"list({label})", "list", filters), expected
        )
        if op == "gt" or (op == "is_null" and not value):
            continue  # count and exists: eq, lt and is_null=True suffice
        count = await m.call(f"count({label})", "count", filters)
        m.expect(f"count({label})", count, len(expected))
        exists = await m.call(f"exists({label})", "exists", filters)
        m.expect(f"exists({label})", exists, bool(expected))
    m.check()


@over_shapes()
async def test_list_paginated(shape_name: str, route: Route, plain: Plain) -> None:
    """list_paginated by each orderable column, and by default, pages as plain does.

    Every order reads page 1 (size 2) with its total; the default order also
    reads page 2.
    """
    m = await Matrix.start(shape_name, route, plain)
    await _stored_rows(m)
    for attr in [None, *m.orderable]:
        expected = await m.rows(order=attr)
        order = {} if attr is None else {"order_by": attr}
        for page in (1, 2) if attr is None else (1,):
            label = f"list_paginated(page={page}, size=2, order_by={attr!r})"
            ours = await m.call(label, "list_paginated", page, 2, **order)
            if ours is FAILED:
                break
            m.same_rows(label, ours.items, expected[(page - 1) * 2 : page * 2])
            m.expect(f"{label}.total", ours.total, len(expected))
    label = "paginate(PaginationParams(page=2, size=2))"
    ours = await m.call(label, "paginate", PaginationParams(page=2, size=2))
    if ours is not FAILED:
        m.same_rows(label, ours.items, (await m.rows(order=None))[2:4])
    m.check()


@over_shapes()
async def test_list_after(shape_name: str, route: Route, plain: Plain) -> None:
    """list_after by each NOT NULL orderable column walks every page as plain orders."""
    m = await Matrix.start(shape_name, route, plain)
    await _stored_rows(m)
    for attr in [None, *m.keyset]:
        expected = await m.rows(order=attr)
        order = {} if attr is None else {"order_by": attr}
        cursor = None
        for page in range(len(expected)):
            label = f"list_after(page {page + 1}, size=1, order_by={attr!r})"
            ours = await m.call(label, "list_after", cursor, 1, **order)
            if ours is FAILED:
                break
            m.same_rows(label, ours.items, expected[page : page + 1])
            last = page == len(expected) - 1
            if last != (ours.next_cursor is None):
                m.problems.append(f"{label}: next_cursor {ours.next_cursor!r}")
                break
            cursor = ours.next_cursor
    m.check()


# --- writes ----------------------------------------------------------------------


@over_shapes()
async def test_create(shape_name: str, route: Route, plain: Plain) -> None:
    """A create returns the row as stored and stores what session.add stores."""
    m = await Matrix.start(shape_name, route, plain)
    for i, data in enumerate(m.shape.rows):
        ours = await m.call(f"create(row {i})", "create", dict(data))
        (reference,) = await m.add([m.shape.twin(data)])
        await m.written(f"create(row {i})", ours, m.key(reference))
    m.check()


@over_shapes()
async def test_create_many(shape_name: str, route: Route, plain: Plain) -> None:
    """create_many returns what add_all + commit leaves on objects, stores the same."""
    m = await Matrix.start(shape_name, route, plain)
    inputs = [dict(data) for data in m.shape.rows]
    ours = await m.call("create_many", "create_many", inputs)
    references = await m.add([m.shape.twin(data) for data in inputs])
    if ours is not FAILED:
        ours = list(ours)
        if len(ours) != len(references):
            m.problems.append(f"create_many: {len(ours)} rows returned")
        for i, (mine, theirs) in enumerate(zip(ours, references, strict=False)):
            label = f"create_many row {i}"
            m.same(f"{label} returned vs plain objects", mine, theirs, other_row=True)
            stored = await m.stored(m.key(mine))
            if stored is None:
                m.problems.append(f"{label}: no stored row has the returned key")
                continue
            reference = await m.stored(m.key(theirs))
            m.same(
                f"{label} stored vs plain",
                stored,
                reference,
                other_row=True,
                flags=True,
            )
    m.check()


@over_shapes()
async def test_update(shape_name: str, route: Route, plain: Plain) -> None:
    """An update returns the row as stored, stores what get + setattr + commit does."""
    m = await Matrix.start(shape_name, route, plain)
    rows = m.shape.rows
    target, twin = await m.add([rows[0], m.shape.twin(rows[0])])
    for j, payload in enumerate(m.shape.changes):
        changes = _without_keys(payload, m.keys)
        label = f"update(changes {j})"
        ours = await m.call(label, "update", m.ident(m.key(target)), changes)
        await m.set(m.key(twin), changes)
        await m.written(label, ours, m.key(twin))
    m.check()


@over_shapes()
async def test_update_many(shape_name: str, route: Route, plain: Plain) -> None:
    """update_many by key stores what get + setattr + commit stores."""
    m = await Matrix.start(shape_name, route, plain)
    rows = m.shape.rows
    target, twin = await m.add([rows[0], m.shape.twin(rows[0])])
    changes = _without_keys(m.shape.changes[0], m.keys)
    by_key = dict(zip(m.keys, m.key(target), strict=True))
    count = await m.call("update_many", "update_many", by_key, changes)
    m.expect("update_many count", count, 1)
    await m.set(m.key(twin), changes)
    stored = await m.stored(m.key(target))
    reference = await m.stored(m.key(twin))
    m.same("update_many stored vs plain", stored, reference, other_row=True, flags=True)
    m.check()


@over_shapes()
async def test_upsert_inserts(shape_name: str, route: Route, plain: Plain) -> None:
    """Upserting a new key returns the row as stored, stores what session.add does."""
    m = await Matrix.start(shape_name, route, plain)
    for i, row in enumerate(m.shape.rows):
        data = {**row, **m.shape.new_key(i)}
        label = f"upsert(insert row {i})"
        ours = await m.call(label, "upsert", data, conflict_on=list(m.keys))
        (reference,) = await m.add([m.shape.twin(data)])
        await m.written(label, ours, m.key(reference))
    m.check()


@over_shapes()
async def test_upsert_updates(shape_name: str, route: Route, plain: Plain) -> None:
    """An upsert of a known key returns the row as stored, stores what setattr does."""
    m = await Matrix.start(shape_name, route, plain)
    rows = m.shape.rows
    target, twin = await m.add([rows[0], m.shape.twin(rows[0])])
    key = dict(zip(m.keys, m.key(target), strict=True))
    for j in m.shape.upserts:
        changes = _without_keys(rows[j], m.keys)
        label = f"upsert(update with row {j})"
        ours = await m.call(
            label, "upsert", {**changes, **key}, conflict_on=list(m.keys)
        )
        await m.set(m.key(twin), changes)
        await m.written(label, ours, m.key(twin))
    m.check()


@over_shapes()
async def test_delete(shape_name: str, route: Route, plain: Plain) -> None:
    """A delete sets deleted_at as plain setattr does (soft models); hard removes."""
    m = await Matrix.start(shape_name, route, plain)
    rows = m.shape.rows
    first, twin, second = await m.add([rows[0], m.shape.twin(rows[0]), rows[1]])
    label = "delete(soft)" if m.soft else "delete"
    done = await m.call(label, "delete", m.ident(m.key(first)))
    m.expect(label, done, True)
    stored = await m.stored(m.key(first))
    if m.soft:
        await m.set(m.key(twin), {"deleted_at": datetime.now(UTC)})
        reference = await m.stored(m.key(twin))
        if stored is None:
            m.problems.append(f"{label}: the row is gone")
        else:
            m.same(f"{label} stored vs plain", stored, reference, other_row=True)
    elif stored is not None:
        m.problems.append(f"{label}: the row is still stored")
    label = "delete(hard=True)"
    done = await m.call(
        label, "delete", m.ident(m.key(second), as_dict=True), hard=True
    )
    m.expect(label, done, True)
    if await m.stored(m.key(second)) is not None:
        m.problems.append(f"{label}: the row is still stored")
    m.check()


@over_shapes(soft_only=True)
async def test_restore(shape_name: str, route: Route, plain: Plain) -> None:
    """A restore returns the row as stored and stores what clearing deleted_at does."""
    m = await Matrix.start(shape_name, route, plain)
    gone = {**m.shape.rows[0], "deleted_at": datetime.now(UTC)}
    target, twin = await m.add([gone, m.shape.twin(gone)])
    ours = await m.call("restore", "restore", m.ident(m.key(target), as_dict=True))
    await m.set(m.key(twin), {"deleted_at": None})
    await m.written("restore", ours, m.key(twin))
    m.check()
