"""Model bases and mixins: one SQLModel class is both the table and the schema.

Every column a mixin adds is declared with `Field(sa_type=...)`, never with a
shared `sa_column=Column(...)`, so each table gets its own `Column` and any
number of tables can share a mixin. Without `table=True` the same classes are
plain pydantic schemas.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import MetaData, String
from sqlalchemy.orm import declared_attr
from sqlmodel import Field, SQLModel

from ..exceptions import TenantError
from ..tenancy import MAX_TENANT_ID_LENGTH, current_user_id, get_current_tenant
from ._types import UTCDateTime, utc_now, uuid7

__all__ = [
    "NAMING_CONVENTION",
    "AuditMixin",
    "BaseModel",
    "DBBaseModel",
    "SoftDeleteMixin",
    "TableNamingMixin",
    "TenantBaseModel",
    "TenantMixin",
    "TimestampMixin",
    "UUIDMixin",
    "snake_case",
]

#: Constraint and index names Alembic can diff: `ix_user_email`, `uq_user_email`, ...
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Longest user id kept in `created_by` / `updated_by`.
MAX_USER_ID_LENGTH = 64

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """Return the snake_case form of a class name (`UserProfile` -> `user_profile`)."""
    return _WORD_BOUNDARY.sub("_", name).lower()


def stamp_tenant() -> str:
    """The current tenant, as the default of `tenant_id` (`TenantError` if none)."""
    tenant = get_current_tenant()
    if tenant is None:
        msg = "tenant_id was not given and no tenant is set in this context"
        raise TenantError(msg)
    return tenant


class TableNamingMixin(SQLModel):
    """Names the table after the class in snake_case unless `__tablename__` is set."""

    @declared_attr.directive
    def __tablename__(cls) -> str:
        return snake_case(cls.__name__)


class UUIDMixin(SQLModel):
    """Adds `id`, a UUID primary key generated client-side (time-ordered, v7)."""

    id: uuid.UUID = Field(default_factory=uuid7, primary_key=True)


class TimestampMixin(SQLModel):
    """Adds `created_at` and `updated_at` (UTC, aware); `updated_at` moves on update."""

    created_at: datetime = Field(
        default_factory=utc_now, sa_type=UTCDateTime, nullable=False
    )
    updated_at: datetime = Field(
        default_factory=utc_now,
        sa_type=UTCDateTime,
        nullable=False,
        # A Python-side onupdate: fires on ORM flushes and on Core UPDATEs that
        # do not set the column, and its value is known without a re-select.
        sa_column_kwargs={"onupdate": utc_now},
    )


class SoftDeleteMixin(SQLModel):
    """Adds `deleted_at`; a row with a value there counts as deleted."""

    deleted_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, nullable=True, index=True
    )

    @property
    def is_deleted(self) -> bool:
        """Return whether this row is soft-deleted."""
        return self.deleted_at is not None


class AuditMixin(SoftDeleteMixin):
    """Adds `created_by`, `updated_by` (the context's user) and `deleted_at`."""

    created_by: str | None = Field(
        default_factory=current_user_id,
        sa_type=String(MAX_USER_ID_LENGTH),
        max_length=MAX_USER_ID_LENGTH,
        nullable=True,
    )
    updated_by: str | None = Field(
        default_factory=current_user_id,
        sa_type=String(MAX_USER_ID_LENGTH),
        max_length=MAX_USER_ID_LENGTH,
        nullable=True,
        # Set on update by the toolkit session and the repository, only when
        # the context names a user: an anonymous update keeps the last editor.
    )


class TenantMixin(SQLModel):
    """Adds `tenant_id` (indexed, not null), from the tenant context if not given."""

    tenant_id: str = Field(
        default_factory=stamp_tenant,
        sa_type=String(MAX_TENANT_ID_LENGTH),
        max_length=MAX_TENANT_ID_LENGTH,
        min_length=1,
        nullable=False,
        index=True,
    )


class DBBaseModel(TimestampMixin, UUIDMixin, TableNamingMixin):
    """Base of table models: UUID `id`, `created_at`, `updated_at`, snake_case name.

    Subclass with `table=True` for a table, without it for a schema. Its
    metadata carries `NAMING_CONVENTION`, so constraint names are stable.
    """

    metadata: ClassVar[MetaData] = MetaData(naming_convention=NAMING_CONVENTION)


BaseModel = DBBaseModel
"""Alias of `DBBaseModel`, the name the handbook uses."""


class TenantBaseModel(TenantMixin, DBBaseModel):
    """`DBBaseModel` plus `TenantMixin`: the base of every tenant-owned table."""
