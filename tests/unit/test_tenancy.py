"""Tenant context: setting, resetting, scoping and propagation."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import uuid
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread
import pytest

from dotmac_core import (
    TenantContext,
    TenantError,
    ValidationError,
    current_user_id,
    get_current_tenant,
    get_tenant_context,
    require_current_tenant,
    reset_current_tenant,
    set_current_tenant,
    tenant_scope,
)


def test_no_tenant_by_default() -> None:
    """Outside any scope there is no tenant, and requiring one fails closed."""
    assert get_current_tenant() is None
    assert get_tenant_context() is None
    assert current_user_id() is None
    with pytest.raises(TenantError, match="no tenant is set"):
        require_current_tenant()


def test_set_and_reset_with_token() -> None:
    """`set_current_tenant` returns a token that restores the previous tenant."""
    outer = set_current_tenant("t1")
    inner = set_current_tenant(TenantContext("t2", user_id="u", roles=["admin"]))
    assert require_current_tenant() == "t2"
    context = get_tenant_context()
    assert context is not None
    assert context.roles == ("admin",)
    assert context.has_role("admin")
    assert not context.has_role("owner")
    assert current_user_id() == "u"
    reset_current_tenant(inner)
    assert get_current_tenant() == "t1"
    reset_current_tenant(outer)
    assert get_current_tenant() is None


async def test_awaiting_the_token_is_allowed() -> None:
    """Handbook code `await set_current_tenant(...)` still works."""
    token = await set_current_tenant("tenant-123")
    assert get_current_tenant() == "tenant-123"
    reset_current_tenant(token)
    assert get_current_tenant() is None


def test_scope_nests_and_restores() -> None:
    """`tenant_scope` restores the outer tenant, also after an exception."""
    with tenant_scope("a", user_id="u1") as ctx:
        assert ctx == TenantContext("a", "u1")
        with pytest.raises(RuntimeError), tenant_scope("b"):
            assert get_current_tenant() == "b"
            raise RuntimeError
        assert get_current_tenant() == "a"
        with tenant_scope(None):
            assert get_current_tenant() is None
        assert current_user_id() == "u1"
    assert get_current_tenant() is None


@pytest.mark.parametrize(
    "bad",
    ["", " padded", "x" * 65, 42, None],
)
def test_invalid_tenant_ids_rejected(bad: object) -> None:
    """Empty, padded, too long or non-str tenant ids are a ValidationError."""
    with pytest.raises(ValidationError) as info:
        TenantContext(bad)  # type: ignore[arg-type]
    assert info.value.field == "tenant_id"


def test_invalid_roles_and_user_rejected() -> None:
    """Roles must be a collection of str; user ids are checked like tenant ids."""
    with pytest.raises(ValidationError, match="not a single str"):
        TenantContext("t", roles="admin")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="each role"):
        TenantContext("t", roles=(1,))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TenantContext("t", user_id="")
    with pytest.raises(ValidationError, match="inside the TenantContext"):
        set_current_tenant(TenantContext("t"), user_id="u")


def test_context_is_immutable() -> None:
    """A TenantContext cannot be changed after creation."""
    context = TenantContext("t")
    with pytest.raises(AttributeError):
        context.tenant_id = "other"  # type: ignore[misc]


async def test_child_tasks_inherit() -> None:
    """Asyncio and anyio child tasks see the tenant current when they start."""
    seen: list[str | None] = []

    async def record() -> None:
        seen.append(get_current_tenant())

    with tenant_scope("parent"):
        await asyncio.create_task(record())
        async with anyio.create_task_group() as tg:
            tg.start_soon(record)
    assert seen == ["parent", "parent"]


async def test_threads_copy_with_to_thread_but_not_executor() -> None:
    """to_thread copies the context; a bare executor needs copy_context().run."""
    loop = asyncio.get_running_loop()
    with tenant_scope("threaded"), ThreadPoolExecutor(max_workers=1) as pool:
        assert await asyncio.to_thread(get_current_tenant) == "threaded"
        assert await anyio.to_thread.run_sync(get_current_tenant) == "threaded"
        assert await loop.run_in_executor(pool, get_current_tenant) is None
        context = contextvars.copy_context()
        copied = await loop.run_in_executor(pool, context.run, get_current_tenant)
        assert copied == "threaded"


HOSTILE_IDS = [
    "a\x00b",
    "caf\udce9",
    "a\nb",
    "tab\there",
    "bell\x07",
    "del\x7f",
    "zero\u200bwidth",
    "line\u2028sep",
    "x" * 65,
    b"acme",
    uuid.UUID(int=1),
    1.5,
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
@pytest.mark.parametrize("field", ["tenant_id", "user_id"])
def test_hostile_ids_are_refused_at_every_entry_point(bad: object, field: str) -> None:
    """NUL, control, format characters, surrogates, over-long or non-str ids."""
    tenant, user = (bad, None) if field == "tenant_id" else ("ok", bad)
    entries = [
        lambda: TenantContext(tenant, user),  # type: ignore[arg-type]
        lambda: set_current_tenant(tenant, user_id=user),  # type: ignore[arg-type]
        lambda: tenant_scope(tenant, user_id=user).__enter__(),  # type: ignore[arg-type]
    ]
    for entry in entries:
        with pytest.raises(ValidationError) as info:
            entry()
        assert info.value.field == field
    assert get_current_tenant() is None


def test_str_subclasses_are_stored_as_plain_str() -> None:
    """A StrEnum tenant id works; the context holds the plain string."""

    class Tenant(enum.StrEnum):
        ACME = "acme"

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    with tenant_scope(Tenant.ACME, user_id=Sneaky("bob")) as context:
        assert context is not None
        assert type(context.tenant_id) is str
        assert context.tenant_id == "acme"
        assert type(context.user_id) is str
        assert context.user_id != "alice"


def test_unicode_ids_within_the_rules_are_kept() -> None:
    """Printable non-ASCII ids and inner spaces are fine, up to 64 characters."""
    for good in ["café", "東京", "acme corp", "x" * 64, "a:b{c}*"]:
        assert TenantContext(good).tenant_id == good


def test_roles_that_are_not_a_collection_are_refused() -> None:
    """roles=5 is a ValidationError, not a TypeError."""
    with pytest.raises(ValidationError):
        TenantContext("t", roles=5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        set_current_tenant(TenantContext("t"), roles=5)  # type: ignore[arg-type]


def test_user_and_roles_without_a_tenant_are_refused() -> None:
    """`tenant_scope(None, user_id=...)` would drop the user: ValidationError."""
    with pytest.raises(ValidationError) as info, tenant_scope(None, user_id="bob"):
        pass  # pragma: no cover - refused before the block
    assert info.value.field == "user_id"
    with pytest.raises(ValidationError), tenant_scope(None, roles=["admin"]):
        pass  # pragma: no cover - refused before the block
