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
        [{"email": "h1@x.io", "name": "ok"}, {"email": "h2@x.io", "name": text}]
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
