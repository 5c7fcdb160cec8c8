"""Model bases and mixins: one SQLModel class is both the table and the schema.

Every column a mixin adds is declared with `Field(sa_type=...)`, never with a
shared `sa_column=Column(...)`, so each table gets its own `Column` and any
number of tables can share a mixin. Without `table=True` the same classes are
plain pydantic schemas.

Every table of the toolkit lands on one `MetaData`, `PlainModel.metadata`
(which is `DBBaseModel.metadata`): `DBBaseModel` tables and `PlainModel`
tables (link tables, composite or integer keys) can reference each other,
`Database.create_all()` creates them all and Alembic sees them all. A table
declared on `SQLModel` itself lands on `SQLModel.metadata` instead; a foreign
key between the two metadata cannot be resolved, so one is refused with a
`ConfigurationError` naming the class to move (`check_metadata_links`).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import MetaData, String, event
from sqlalchemy.orm import Mapper, declared_attr
from sqlmodel import Field, SQLModel

from ..exceptions import ConfigurationError, TenantError
from ..tenancy import MAX_TENANT_ID_LENGTH, current_user_id, get_current_tenant
from ._types import UTCDateTime, utc_now, uuid7

if TYPE_CHECKING:
    from sqlalchemy import ForeignKey

__all__ = [
    "NAMING_CONVENTION",
    "AuditMixin",
    "BaseModel",
    "DBBaseModel",
    "PlainModel",
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


class PlainModel(SQLModel):
    """`SQLModel` on the toolkit's metadata, adding no columns: for link tables.

    Use it where the SQLModel docs write `SQLModel`, for a table that needs
    neither the UUID `id` nor the timestamps of `DBBaseModel`: a link table
    whose primary key is its two foreign keys, an integer or natural key. Its
    table lands on `DBBaseModel.metadata` (the same object), so foreign keys
    to and from `DBBaseModel` tables resolve, `Database.create_all()` creates
    it and Alembic compares it. Its metadata carries `NAMING_CONVENTION`.
    """

    metadata: ClassVar[MetaData] = MetaData(naming_convention=NAMING_CONVENTION)


class DBBaseModel(TimestampMixin, UUIDMixin, TableNamingMixin, PlainModel):
    """Base of table models: UUID `id`, `created_at`, `updated_at`, snake_case name.

    Subclass with `table=True` for a table, without it for a schema. Its
    metadata is `PlainModel.metadata`, which carries `NAMING_CONVENTION`, so
    constraint names are stable.
    """


BaseModel = DBBaseModel
"""Alias of `DBBaseModel`, the name the handbook uses."""


class TenantBaseModel(TenantMixin, DBBaseModel):
    """`DBBaseModel` plus `TenantMixin`: the base of every tenant-owned table."""


def check_metadata_links() -> None:
    """Refuse a foreign key between `SQLModel.metadata` and the toolkit's metadata.

    A class based on `SQLModel` itself puts its table on `SQLModel.metadata`,
    where a foreign key naming a `DBBaseModel` table (or the reverse) cannot
    be resolved: SQLAlchemy would fail later with `NoReferencedTableError`,
    and `create_all()` would not create the table. Runs before mappers are
    configured, and in `Database.create_all()`.

    Raises:
        ConfigurationError: a table references a table of the other metadata;
            the message names the class to base on `PlainModel`.
    """
    ours, theirs = PlainModel.metadata, SQLModel.metadata
    for source, other in ((theirs, ours), (ours, theirs)):
        for table in source.tables.values():
            for fk in table.foreign_keys:
                target = _target_table(fk)
                if target is None or target in source.tables:
                    continue
                if target in other.tables:
                    moved = table if source is theirs else other.tables[target]
                    msg = (
                        f"table {table.fullname!r} references {fk.target_fullname!r},"
                        f" whose table is on {_NAMES[other is ours]}; a foreign key"
                        " cannot cross metadata: base the class of table"
                        f" {moved.fullname!r} on dotmac_core.PlainModel instead of"
                        " SQLModel, so both tables share DBBaseModel.metadata"
                    )
                    raise ConfigurationError(msg)


_NAMES = {True: "DBBaseModel.metadata", False: "SQLModel.metadata"}


def _target_table(fk: ForeignKey) -> str | None:
    """The key of the table a string foreign key names (`None`: a Column object).

    A foreign key given a `Column` object resolves through that column,
    whatever its metadata; only a string (`"hero.id"`) is looked up by name.
    """
    if not isinstance(getattr(fk, "_colspec", None), str):
        return None
    return fk.target_fullname.rpartition(".")[0]


event.listen(Mapper, "before_configured", check_metadata_links)
