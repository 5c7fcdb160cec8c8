import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread
from sqlmodel import Field

from dotmac_core import (
    AuditMixin,
    TenantBaseModel,
    TenantError,
    current_user_id,
    get_current_tenant,
    get_tenant_context,
    require_current_tenant,
    reset_current_tenant,
    set_current_tenant,
    tenant_scope,
)


class TenancyNote(TenantBaseModel, AuditMixin, table=True):
    """A tenant-owned, audited table; its table is `tenancy_note`."""

    text: str = Field(max_length=200)


def stamping() -> None:
    """New rows take `tenant_id` and `created_by` from the context."""
    with tenant_scope("acme", user_id="alice", roles=["admin"]) as context:
        assert context is get_tenant_context()
        assert context is not None
        assert context.has_role("admin")
        note = TenancyNote(text="hello")
    assert (note.tenant_id, note.created_by) == ("acme", "alice")
    assert get_current_tenant() is None  # the scope restored "no tenant"

    try:
        TenancyNote(text="orphan")
    except TenantError as exc:
        print(f"without a tenant: TenantError: {exc.message}")
    else:
        msg = "a row without a tenant was accepted"
        raise AssertionError(msg)


async def set_and_reset() -> None:
    """The token pair, for code that sets and resets in different places."""
    token = set_current_tenant("globex", user_id="bob")
    try:
        assert require_current_tenant() == "globex"
        assert current_user_id() == "bob"
    finally:
        reset_current_tenant(token)
    assert get_current_tenant() is None

    # Handbook code awaits the call; the token allows it.
    token = await set_current_tenant("initech")
    assert get_current_tenant() == "initech"
    reset_current_tenant(token)


async def _tenant_seen_by_task() -> str | None:
    return get_current_tenant()


async def _expect_tenant(expected: str) -> None:
    assert get_current_tenant() == expected


async def _switch_tenant() -> None:
    set_current_tenant("other")  # changes only this task's copy


async def tasks_and_threads() -> None:
    """What carries the context over to other tasks and threads."""
    with tenant_scope("acme"):
        # Tasks copy the context when they are created ...
        assert await asyncio.create_task(_tenant_seen_by_task()) == "acme"
        async with anyio.create_task_group() as group:
            group.start_soon(_expect_tenant, "acme")
        # ... and what a task changes stays in its own copy.
        await asyncio.create_task(_switch_tenant())
        assert get_current_tenant() == "acme"

        # These two copy the context into the worker thread.
        assert await asyncio.to_thread(get_current_tenant) == "acme"
        assert await anyio.to_thread.run_sync(get_current_tenant) == "acme"

        # run_in_executor does not; run the callable inside a copy.
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, get_current_tenant) is None
        context = contextvars.copy_context()
        assert await loop.run_in_executor(None, context.run, get_current_tenant) == (
            "acme"
        )


def thread_pool() -> None:
    """`ThreadPoolExecutor.submit` does not copy the context either."""
    with tenant_scope("acme"), ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(get_current_tenant).result() is None
        copied = contextvars.copy_context()
        assert pool.submit(copied.run, get_current_tenant).result() == "acme"


async def main() -> None:
    """Run each demonstration; every check is an assert."""
    stamping()
    await set_and_reset()
    await tasks_and_threads()
    thread_pool()
    print("tenant context: all checks passed")


if __name__ == "__main__":
    asyncio.run(main())
