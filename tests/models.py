"""Test tables, defined once for the whole suite (metadata is never redefined)."""

from __future__ import annotations

import uuid

from sqlmodel import Field

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
