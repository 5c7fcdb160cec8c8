"""Models against real databases: create, insert, update, read back."""

from __future__ import annotations

import asyncio

from sqlalchemy import update
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from dotmac_core import tenant_scope

from ..models import Invoice, LoginHistory, Shipment, UserProfile


async def test_tables_sharing_every_mixin_insert(session: AsyncSession) -> None:
    """Two tables sharing every mixin create and insert fine, side by side."""
    with tenant_scope("acme", user_id="alice"):
        invoice = Invoice(number="INV-100", amount_cents=1200)
        shipment = Shipment(carrier="DHL")
        session.add_all([invoice, shipment, UserProfile(display_name="A", email="a@x")])
        session.add(LoginHistory(user_id="alice"))
        await session.commit()
    session.expunge_all()
    got_invoice = await session.get(Invoice, invoice.id)
    got_shipment = await session.get(Shipment, shipment.id)
    assert got_invoice is not None
    assert got_shipment is not None
    assert got_invoice.tenant_id == got_shipment.tenant_id == "acme"
    assert got_invoice.created_by == got_shipment.created_by == "alice"
    assert got_invoice.created_at == invoice.created_at  # exact, microseconds kept
    assert got_invoice.created_at.utcoffset() is not None
    assert got_shipment.deleted_at is None
    rows = (await session.exec(select(LoginHistory))).all()
    assert [row.user_id for row in rows] == ["alice"]


async def test_updated_at_moves_on_orm_update(session: AsyncSession) -> None:
    """An ORM flush of a change bumps `updated_at` and `updated_by`."""
    with tenant_scope("acme", user_id="alice"):
        invoice = Invoice(number="INV-200")
        session.add(invoice)
        await session.commit()
    first = invoice.updated_at
    await asyncio.sleep(0.002)
    with tenant_scope("acme", user_id="bob"):
        invoice.amount_cents = 99
        session.add(invoice)
        await session.commit()
    assert invoice.updated_at > first
    # A plain SQLModel session moves updated_at (a column default) but not
    # updated_by, which toolkit sessions and repositories set.
    assert invoice.updated_by == "alice"
    assert invoice.created_by == "alice"
    session.expunge_all()
    reread = await session.get(Invoice, invoice.id)
    assert reread is not None
    assert reread.updated_at == invoice.updated_at
    assert reread.created_at == invoice.created_at


async def test_updated_at_moves_on_core_update(session: AsyncSession) -> None:
    """A bulk UPDATE that does not set `updated_at` still bumps it."""
    with tenant_scope("acme", user_id="alice"):
        invoice = Invoice(number="INV-300")
        session.add(invoice)
        await session.commit()
    before = invoice.updated_at
    await asyncio.sleep(0.002)
    statement = (
        update(Invoice)
        .where(Invoice.id == invoice.id)  # type: ignore[arg-type]
        .values(amount_cents=5)
    )
    with tenant_scope("acme", user_id="carol"):
        await session.exec(statement)
        await session.commit()
    session.expunge_all()
    reread = await session.get(Invoice, invoice.id)
    assert reread is not None
    assert reread.amount_cents == 5
    assert reread.updated_at > before
    assert reread.updated_by == "alice"  # Core UPDATEs leave the editor alone
