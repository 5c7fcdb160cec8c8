"""Test tables, defined once for the whole suite (metadata is never redefined)."""

import uuid

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, Relationship

from dotmac_core import (
    AuditMixin,
    DBBaseModel,
    SoftDeleteMixin,
    TenantBaseModel,
    TenantMixin,
    UUIDMixin,
)


class UserProfile(DBBaseModel, table=True):
    """Named by the base: `user_profile`."""

    display_name: str = Field(max_length=50)
    email: str = Field(max_length=255, unique=True)


class LoginHistory(DBBaseModel, table=True):
    """An explicit `__tablename__` wins over the generated one."""

    __tablename__ = "user_login_log"

    user_id: str = Field(max_length=64)


class Invoice(TenantBaseModel, AuditMixin, table=True):
    """One of two tables sharing every mixin."""

    number: str = Field(max_length=20, unique=True)
    amount_cents: int = 0


class Shipment(
    DBBaseModel, TenantMixin, AuditMixin, SoftDeleteMixin, UUIDMixin, table=True
):
    """The other table sharing every mixin (listed again on purpose)."""

    carrier: str = Field(max_length=40)


class InvoiceLine(DBBaseModel, table=True):
    """A child row: its foreign key exercises integrity errors."""

    invoice_id: uuid.UUID = Field(foreign_key="invoice.id")
    quantity: int = Field(ge=1)


class InvoiceSchema(TenantBaseModel, AuditMixin):
    """The same bases without `table=True`: a plain pydantic schema."""

    number: str = Field(max_length=20)


class Squad(TenantBaseModel, table=True):
    """A tenant-owned parent with a relationship to its members."""

    name: str = Field(max_length=50)
    members: list["Member"] = Relationship(back_populates="team")


class Member(TenantBaseModel, AuditMixin, table=True):
    """Tenant rows with soft delete, a per-tenant unique email and a rank."""

    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    email: str = Field(max_length=120)
    name: str = Field(max_length=50)
    rank: int = 0
    balance_cents: int = 0
    team_id: uuid.UUID | None = Field(default=None, foreign_key="squad.id")
    team: Squad | None = Relationship(back_populates="members")


class User(TenantBaseModel, table=True):
    """The handbook's example model (its email is unique across tenants)."""

    email: str = Field(max_length=255, unique=True)
    name: str = Field(max_length=100)


class Tag(DBBaseModel, table=True):
    """A model without tenant or soft delete."""

    label: str = Field(max_length=30, unique=True)
    weight: int = 0
