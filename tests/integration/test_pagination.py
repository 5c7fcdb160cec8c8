"""Offset and keyset pages against real databases."""

from __future__ import annotations

import pytest

from dotmac_core import (
    AsyncRepository,
    PaginationParams,
    SecurityConfig,
    ValidationError,
    tenant_scope,
)

from ..models import Member

pytestmark = pytest.mark.usefixtures("repo_db", "executor")


class Members(AsyncRepository[Member]):
    """Members."""


async def _members(count: int, ranks: int = 3) -> None:
    await Members().create_many(
        {"email": f"p{i}@x", "name": f"P{i:03d}", "rank": i % ranks}
        for i in range(count)
    )


async def test_offset_pages_cover_every_row_once() -> None:
    """Pages of 7 over 50 rows, ordered by a column with ties, see each row once."""
    with tenant_scope("acme"):
        await _members(50)
        seen: list[str] = []
        page_no = 1
        while True:
            page = await Members().list_paginated(page_no, 7, order_by="-rank")
            seen += [m.email for m in page.items]
            assert page.total == 50
            assert page.pages == 8
            assert page.has_prev == (page_no > 1)
            if not page.has_next:
                break
            page_no += 1
        assert len(seen) == len(set(seen)) == 50


async def test_pages_without_total() -> None:
    """`with_total=False` skips the count and still knows whether more follow."""
    with tenant_scope("acme"):
        await _members(10)
        first = await Members().list_paginated(1, 4, with_total=False)
        assert first.total is None
        assert first.has_next
        last = await Members().list_paginated(3, 4, with_total=False)
        assert len(last.items) == 2
        assert not last.has_next
        via_params = await Members().paginate(
            PaginationParams.model_validate({"page": 2, "per_page": 4})
        )
        assert via_params.size == 4
        assert via_params.total == 10
        alias = await Members().list_paginated(1, per_page=3)
        assert alias.size == 3


@pytest.mark.parametrize(("page", "size"), [(0, 10), (1, 0), (1, 101)])
async def test_bad_pages_are_refused(page: int, size: int) -> None:
    """Page below 1 or size outside 1..100 is a ValidationError, not clamped."""
    with tenant_scope("acme"), pytest.raises(ValidationError):
        await Members().list_paginated(page, size)


@pytest.mark.parametrize("order", ["rank", "-rank", ["rank", "-name"], "created_at"])
async def test_keyset_returns_every_row_exactly_once(order: str | list[str]) -> None:
    """Keyset pages over many equal sort values neither skip nor repeat rows."""
    with tenant_scope("acme"):
        await _members(101, ranks=2)
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = await Members().list_after(cursor, size=10, order_by=order)
            seen += [m.email for m in page.items]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert pages == 11
        assert len(seen) == len(set(seen)) == 101


async def test_keyset_cursor_is_bound_and_signed() -> None:
    """A cursor from another order, model or key, or tampered, is refused."""
    with tenant_scope("acme"):
        await _members(5)
        page = await Members().list_after(size=2, order_by="rank")
        assert page.next_cursor is not None
        with pytest.raises(ValidationError):
            await Members().list_after(page.next_cursor, size=2, order_by="-rank")
        with pytest.raises(ValidationError):
            await Members().list_after(page.next_cursor + "x", size=2, order_by="rank")
        other_key = Members(security=SecurityConfig(secret_key="z" * 32))
        with pytest.raises(ValidationError):
            await other_key.list_after(page.next_cursor, size=2, order_by="rank")
        with pytest.raises(ValidationError, match="nullable"):
            await Members().list_after(size=2, order_by="team_id")


async def test_pages_work_on_an_in_memory_database() -> None:
    """A page and its count share one session (an in-memory SQLite has one)."""
    from dotmac_core import Database, configure_database

    async with Database("sqlite+aiosqlite://") as memory:
        await memory.create_all()
        configure_database(memory)
        with tenant_scope("acme"):
            await _members(3)
            page = await Members().list_paginated(1, 2)
        assert (page.total, len(page.items)) == (3, 2)
