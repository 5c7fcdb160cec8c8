"""Generated hostile input: a query of bound parameters, or a dotmac_core error.

Filter keys and values, `order_by`, page numbers, limits, cursors, tenant and
user ids and written values are drawn by hypothesis. Each input either
becomes a statement over the model's columns whose every value is a bound
parameter (and the call returns normally, with the current tenant's rows
only), or raises the dotmac_core error documented for it; never a driver
error, a raw Python error, or another tenant's row.

Most examples stay on the checks that run before any SQL; a fraction run real
queries on SQLite and PostgreSQL, through each route. Every generated string
value holds SENTINEL, a character no statement text holds, so a value that
reached the SQL text would show.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from sqlalchemy import event, inspect
from sqlalchemy.dialects import postgresql, sqlite

from dotmac_core import (
    FILTER_OPERATORS,
    AlreadyExistsError,
    AsyncRepository,
    Database,
    IntegrityConstraintError,
    NotFoundError,
    TenantError,
    TransactionManager,
    ValidationError,
    tenant_scope,
)
from dotmac_core.db import _query
from dotmac_core.db._facts import Scoping, facts_of
from dotmac_core.db._validation import (
    check_bounds,
    total_order,
    validated_changes,
    validated_values,
)
from dotmac_core.db.filters import parse_filters
from dotmac_core.db.pagination import check_page
from dotmac_core.db.scoping import Scope, check_new_rows

from ..conftest import Route
from ..models import Member

# Hypothesis keeps caches (the constants it finds in the source) in
# `.hypothesis/` of the working directory: keep them out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dotmac-core-hypothesis")

SENTINEL = "\u2603"
TENANT, OTHER = "tenant-a", "tenant-b"
COLUMNS = sorted(inspect(Member).columns.keys())
FACTS = facts_of(Member)
DIALECTS = [postgresql.dialect(), sqlite.dialect()]


def _settings(examples: int) -> Any:
    """Settings of every test here: no example database, no deadline, quiet."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# --- strategies -------------------------------------------------------------------

texts = st.text(max_size=12).map(lambda text: SENTINEL + text)
names = st.one_of(
    st.sampled_from(
        [*COLUMNS, "team", "__class__", "_sa_instance_state", "metadata", "NAME"]
    ),
    st.text(max_size=10),
)
operators = st.one_of(
    st.sampled_from([*FILTER_OPERATORS, "or", "", "eq__eq", "IN", "contains"]),
    st.text(max_size=4),
)
keys = st.one_of(
    names,
    st.builds(lambda name, op: f"{name}__{op}", names, operators),
    st.integers(),
    st.none(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True, places=None),
    texts,
    st.sampled_from(["3", "-1", "true", "2026-01-01T00:00:00Z", "%", "_"]),
    st.binary(max_size=8),
    st.uuids().map(str),
    st.uuids(),
    st.datetimes(timezones=st.sampled_from([None, UTC])),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
filters = st.one_of(
    st.dictionaries(keys, values, max_size=4),
    st.lists(st.tuples(names, scalars), max_size=2),
    texts,
    st.integers(),
)
orders = st.one_of(
    st.none(),
    st.sampled_from(COLUMNS),
    st.sampled_from(COLUMNS).map(lambda name: "-" + name),
    st.text(max_size=12),
    st.lists(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=6)), max_size=3),
    st.integers(),
)
numbers = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=300),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.sampled_from(["1", "10", ""]),
)
ids = st.one_of(
    st.text(max_size=70),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=64),
    st.sampled_from(["a\x00b", "caf\udce9", "a\nb", " x", "x" * 65, TENANT]),
    st.binary(max_size=4),
    st.integers(),
    st.none(),
)
field_names = st.one_of(
    st.sampled_from([*Member.model_fields, "team", "nope"]), st.text(max_size=6)
)
written = st.dictionaries(field_names, values, max_size=5)
plausible_rows = st.fixed_dictionaries(
    {"email": texts, "name": texts},
    optional={
        "rank": scalars,
        "balance_cents": scalars,
        "team_id": scalars,
        "tenant_id": st.one_of(st.sampled_from([TENANT, OTHER]), ids),
        "deleted_at": scalars,
        "created_by": scalars,
    },
)


def _refused(exc: BaseException, fields: set[str] | None = None) -> None:
    """A refusal names what was wrong (one of `fields`, if given)."""
    field = getattr(exc, "field", None)
    assert field
    assert fields is None or field in fields, field


def _no_value_in_sql(sql: str) -> None:
    assert SENTINEL not in sql, sql


def _compiled(query: _query.Query, dialect: Any) -> None:
    """The statement compiles with every value a parameter of the builder's."""
    _no_value_in_sql(str(query.statement.compile(dialect=dialect)))
    assert all(name.startswith("dotmac_") for name in query.params)


# --- no SQL: the checks and the statement builder -----------------------------------


@_settings(2500)
@given(
    filters=filters,
    order_by=orders,
    limit=numbers,
    offset=numbers,
    dialect=st.sampled_from(DIALECTS),
)
def test_filters_and_order_become_bound_parameters(
    filters: Any, order_by: Any, limit: Any, offset: Any, dialect: Any
) -> None:
    """Random filters, orders, limits: bound values over columns, or ValidationError."""
    try:
        check_bounds(limit=limit, offset=offset)
        terms = parse_filters(Member, filters)
        order = total_order(FACTS, order_by)
    except ValidationError as exc:
        _refused(exc)
        return
    assert {term.name for term in terms} <= set(COLUMNS)
    assert {spec.name for spec in order} <= set(COLUMNS)
    scoping = Scoping(TENANT, "live")
    query = _query.rows(FACTS, terms, scoping, order, limit=limit, offset=offset)
    _compiled(query, dialect)


@_settings(2500)
@given(page=numbers, size=numbers)
def test_page_numbers_are_ints_in_range_or_refused(page: Any, size: Any) -> None:
    """A page and size are accepted only as ints in range, else ValidationError."""
    try:
        check_page(page, size)
    except ValidationError as exc:
        _refused(exc, {"page", "size"})
        return
    assert type(page) is int
    assert type(size) is int
    assert page >= 1
    assert 1 <= size <= 100


@_settings(2500)
@given(tenant=ids, user=ids)
def test_tenant_and_user_ids_are_valid_or_refused(tenant: Any, user: Any) -> None:
    """An id is a plain, printable str of 1..64 characters, else ValidationError."""
    try:
        with tenant_scope(tenant, user_id=user) as context:
            pairs = [] if context is None else [(tenant, context.tenant_id)]
            if context is not None and user is not None:
                pairs.append((user, context.user_id))
    except ValidationError as exc:
        _refused(exc, {"tenant_id", "user_id"})
        return
    assert context is not None or (tenant is None and user is None)
    for given_id, kept in pairs:
        assert type(kept) is str
        assert kept == given_id
        assert 1 <= len(kept) <= 64
        assert kept.isprintable()
        assert kept == kept.strip()
        kept.encode("utf-8")


@_settings(1200)
@given(data=st.one_of(written, plausible_rows))
def test_written_values_are_checked_before_sql(data: dict[Any, Any]) -> None:
    """Create and update data: checked values of known fields, or a dotmac error."""
    scope = Scope(TENANT, bypass=False)
    with tenant_scope(TENANT):
        try:
            values = validated_values(Member, data)
            check_new_rows(Member, [values], scope)
        except (ValidationError, TenantError):
            pass
        else:
            assert set(values) <= set(Member.model_fields)
            assert values["tenant_id"] == TENANT
        try:
            changes = validated_changes(FACTS, data)
        except (ValidationError, TenantError):
            return
        assert set(changes) <= set(Member.model_fields) - {"tenant_id", "id"}


# --- real queries on both databases --------------------------------------------------


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


@pytest.fixture
async def seeded(repo_db: Database) -> dict[str, Any]:
    """Rows of two tenants: three of tenant-a, two of tenant-b."""
    with tenant_scope(OTHER):
        theirs = await Members().create_many(
            [{"email": f"b{i}@x", "name": f"B{i}", "rank": i} for i in range(2)]
        )
    with tenant_scope(TENANT):
        mine = await Members().create_many(
            [{"email": f"a{i}@x", "name": f"A{i}", "rank": i} for i in range(3)]
        )
        first = await Members().list_after(size=1)
    return {"mine": mine, "theirs": theirs, "cursor": first.next_cursor}


@pytest.fixture
def statements(repo_db: Database, route: Route) -> Iterator[list[str]]:
    """Statement texts sent, on the `session` route (watching is what it does)."""
    sent: list[str] = []
    if route.name != "session":
        yield sent
        return

    def spy(*args: Any) -> None:
        sent.append(str(args[2]))

    engine = repo_db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", spy)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", spy)


READS = ["list", "count", "exists", "list_paginated", "get_by_field"]


@_settings(120)
@given(
    read=st.sampled_from(READS),
    filters=st.one_of(
        st.dictionaries(
            st.one_of(
                st.sampled_from(COLUMNS),
                st.builds(
                    lambda name, op: f"{name}__{op}",
                    st.sampled_from(COLUMNS),
                    st.sampled_from(FILTER_OPERATORS),
                ),
            ),
            values,
            max_size=3,
        ),
        filters,
    ),
    order_by=orders,
    limit=numbers,
    offset=numbers,
)
async def test_reads_return_this_tenants_rows_or_refuse(
    seeded: dict[str, Any],
    route: Route,
    statements: list[str],
    read: str,
    filters: Any,
    order_by: Any,
    limit: Any,
    offset: Any,
) -> None:
    """Generated reads run on every route: tenant-a's rows only, or a dotmac error."""
    repo = Members()
    mine = {member.id for member in seeded["mine"]}
    with tenant_scope(TENANT):
        try:
            async with route.scope():
                if read == "list":
                    rows = await repo.list(
                        filters, order_by=order_by, limit=limit, offset=offset
                    )
                elif read == "count":
                    assert 0 <= await repo.count(filters) <= len(mine)
                    rows = []
                elif read == "exists":
                    await repo.exists(filters)
                    rows = []
                elif read == "list_paginated":
                    page = await repo.list_paginated(
                        limit, offset, filters=filters, order_by=order_by
                    )
                    assert page.total is not None
                    assert page.total <= len(mine)
                    rows = page.items
                else:
                    name = filters if isinstance(filters, str) else "rank"
                    found = await repo.get_by_field(name, limit)
                    rows = [] if found is None else [found]
        except ValidationError as exc:
            _refused(exc)
            rows = []
    assert {row.id for row in rows} <= mine
    assert all(row.tenant_id == TENANT for row in rows)
    for sql in statements:
        _no_value_in_sql(sql)
    statements.clear()


def _tampered(cursor: str, edit: int, junk: str) -> str:
    body, _, signature = cursor.partition(".")
    choices = [
        cursor + junk,
        junk + cursor,
        cursor[: edit % len(cursor)] + junk + cursor[edit % len(cursor) + 1 :],
        base64.urlsafe_b64encode(b'["x",1]').decode().rstrip("=") + "." + signature,
        body + "." + base64.urlsafe_b64encode(junk.encode()).decode(),
        cursor.replace(".", junk, 1),
    ]
    return choices[edit % len(choices)]


@_settings(250)
@given(
    cursor=st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda edit, junk: (edit, junk),
            st.integers(min_value=0, max_value=500),
            st.text(min_size=1, max_size=4),
        ),
        st.just("genuine"),
    ),
    size=numbers,
)
async def test_cursors_are_genuine_or_refused(
    seeded: dict[str, Any], db: Database, cursor: Any, size: Any
) -> None:
    """Random and tampered cursors: ValidationError, or a page of this tenant."""
    given_cursor = seeded["cursor"]
    if isinstance(cursor, tuple):
        given_cursor = _tampered(given_cursor, *cursor)
    elif cursor != "genuine":
        given_cursor = cursor
    mine = {member.id for member in seeded["mine"]}
    with tenant_scope(TENANT):
        try:
            page = await Members().list_after(given_cursor, size)
        except ValidationError as exc:
            _refused(exc, {"cursor", "size", "page"})
            return
    assert {row.id for row in page.items} <= mine


@_settings(150)
@given(tenant=ids, run=st.integers(min_value=0, max_value=3))
async def test_any_accepted_tenant_id_reads_nothing_of_others(
    seeded: dict[str, Any], db: Database, tenant: Any, run: int
) -> None:
    """A generated tenant id is refused, or its queries run and see no other rows.

    No tenant at all (`None`) fails closed with TenantError.
    """
    try:
        scope = tenant_scope(tenant, user_id=None if tenant is None else tenant)
        scope.__enter__()
    except ValidationError as exc:
        _refused(exc, {"tenant_id", "user_id"})
        return
    try:
        expected = len(seeded["mine"]) if tenant == TENANT else 0
        if tenant is None:
            with pytest.raises(TenantError):
                await Members().count()
        elif run == 0:
            assert len(await Members().list()) == expected
        elif run == 1:
            assert await Members().count() == expected
        elif run == 2:
            assert await Members().exists() == bool(expected)
        else:
            assert await Members().update_many({"rank__gte": 100}, {"rank": 1}) == 0
    finally:
        scope.__exit__(None, None, None)


class _Rollback(Exception):
    """Raised to undo a generated write."""


@_settings(120)
@given(
    data=st.one_of(plausible_rows, written),
    action=st.sampled_from(["create", "update mine", "update theirs"]),
)
async def test_written_values_store_this_tenants_row_or_refuse(
    seeded: dict[str, Any], db: Database, data: dict[Any, Any], action: str
) -> None:
    """Generated create / update data: a row of tenant-a, or a dotmac error.

    Each write runs in a transaction that is rolled back, so the seeded rows
    stay as they are for the next example.
    """
    target = seeded["theirs" if action == "update theirs" else "mine"][0]

    async def write() -> None:
        async with TransactionManager():
            if action == "create":
                row = await Members().create(data)
            else:
                row = await Members().update(target.id, data)
            assert row.tenant_id == TENANT
            assert row.id != seeded["theirs"][0].id
            raise _Rollback

    with tenant_scope(TENANT, user_id="alice"):
        try:
            await write()
        except _Rollback:
            pass
        except (
            ValidationError,
            TenantError,
            NotFoundError,  # an update of the other tenant's row
            AlreadyExistsError,  # an email this tenant already has
            IntegrityConstraintError,  # a team_id no squad has
        ):
            pass
    with tenant_scope(OTHER):
        theirs = await Members().list(order_by="rank")
    assert [(m.name, m.rank) for m in theirs] == [("B0", 0), ("B1", 1)]
