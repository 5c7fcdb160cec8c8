"""Text no database stores is refused before any SQL, on every write and route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event

from dotmac_core import AsyncRepository, Database, ValidationError

from ..models import Member

pytestmark = pytest.mark.usefixtures("repo_db", "executor", "acme")


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


HOSTILE = {"nul": "a\x00b", "surrogate": "caf\udce9"}

WRITES: dict[str, Callable[[str, Any], Awaitable[object]]] = {
    "create": lambda text, _: Members().create({"email": "h@x.io", "name": text}),
    "create_many": lambda text, _: Members().create_many(
        [{"email": "h1@x.io", "name": "café"}, {"email": "h2@x.io", "name": text}]
    ),
    "update": lambda text, made: Members().update(made.id, {"name": text}),
    "upsert": lambda text, made: Members().upsert(
        {"id": made.id, "email": made.email, "name": text}
    ),
    "update_many": lambda text, _: Members().update_many({}, {"name": text}),
    "list": lambda text, _: Members().list({"name": text}),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("call", sorted(WRITES))
async def test_hostile_text_is_refused_before_sql(
    db: Database, call: str, kind: str
) -> None:
    """NUL characters and lone surrogates: a ValidationError naming the field."""
    made = await Members().create({"email": "keep@x.io", "name": "kept"})
    sent: list[str] = []

    def spy(*args: Any) -> None:
        sent.append(str(args[2]))

    event.listen(db.engine.sync_engine, "before_cursor_execute", spy)
    try:
        with pytest.raises(ValidationError) as caught:
            await WRITES[call](HOSTILE[kind], made)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", spy)
    assert caught.value.field == "name"
    assert sent == []
    rows = await Members().list()
    assert [(m.email, m.name) for m in rows] == [("keep@x.io", "kept")]


@pytest.mark.parametrize(
    "call",
    [
        lambda: Members().create({"email": "r@x.io", "name": "r", "rank": 2**31}),
        lambda: Members().create_many(
            [{"email": "r@x.io", "name": "r", "rank": -(2**31) - 1}]
        ),
        lambda: Members().update_many({}, {"rank": 2**40}),
    ],
    ids=["create", "create_many", "update_many"],
)
async def test_ints_outside_the_column_range_are_refused(
    call: Callable[[], Awaitable[object]],
) -> None:
    """An int a 32-bit column cannot hold is a ValidationError on both databases."""
    with pytest.raises(ValidationError) as caught:
        await call()
    assert caught.value.field == "rank"
    assert await Members().count() == 0
    made = await Members().create({"email": "e@x.io", "name": "e", "rank": 2**31 - 1})
    assert made.rank == 2**31 - 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: Members().list(limit=2**63),
        lambda: Members().list(offset=2**64),
        lambda: Members().list_paginated(page=2**62, size=10),
    ],
    ids=["limit", "offset", "page"],
)
async def test_limits_beyond_the_database_range_are_refused(
    call: Callable[[], Awaitable[object]],
) -> None:
    """limit, offset and page numbers past a 64-bit offset: ValidationError."""
    with pytest.raises(ValidationError) as caught:
        await call()
    assert caught.value.field in {"limit", "offset", "page"}
