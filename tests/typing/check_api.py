"""Uses the public API as users will; type-checked by mypy, never run."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlmodel import Field

from dotmac_core import (
    AuditMixin,
    DatabaseConfig,
    DBBaseModel,
    DotMacError,
    TenantBaseModel,
    TenantContext,
    TenantToken,
    configure_database,
    get_current_tenant,
    get_database,
    require_current_tenant,
    reset_current_tenant,
    set_current_tenant,
    tenant_scope,
    translate_errors,
)


class Account(TenantBaseModel, AuditMixin, table=True):
    """A tenant table as users write it."""

    name: str = Field(max_length=100)


class AccountRead(DBBaseModel):
    """A schema from the same base."""

    name: str


async def use_api() -> None:
    """Exercise the typed surface."""
    db = configure_database(DatabaseConfig(url="sqlite:///x.db"))
    assert db is get_database()
    token: TenantToken = set_current_tenant("t")
    tenant: str | None = get_current_tenant()
    required: str = require_current_tenant()
    reset_current_tenant(token)
    with tenant_scope(TenantContext("t", user_id="u")) as context:
        assert context is not None
        roles: tuple[str, ...] = context.roles
        account = Account(name="n")
        key: uuid.UUID = account.id
        when: datetime = account.updated_at
        deleted: datetime | None = account.deleted_at
        owner: str = account.tenant_id
        print(roles, key, when, deleted, owner, tenant, required)
    try:
        with translate_errors():
            async with db.session() as session:
                session.add(account)
                await session.commit()
    except DotMacError as exc:
        status: int = exc.http_status
        print(status, exc.to_dict())
    await db.dispose()
