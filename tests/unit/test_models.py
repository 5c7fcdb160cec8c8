"""Model bases and mixins, without a database."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pydantic
import pytest
from sqlalchemy.dialects import postgresql, sqlite

from dotmac_core import (
    NAMING_CONVENTION,
    BaseModel,
    DBBaseModel,
    TenantError,
    snake_case,
    tenant_scope,
)
from dotmac_core.db._types import UTCDateTime, uuid7, uuid7_batch

from ..models import Invoice, InvoiceSchema, LoginHistory, Shipment, UserProfile


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("UserProfile", "user_profile"),
        ("User", "user"),
        ("HTTPRequestLog", "http_request_log"),
        ("OAuth2Token", "o_auth2_token"),
        ("Invoice2Line", "invoice2_line"),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    """Class names become snake_case table names."""
    assert snake_case(name) == expected


def test_table_names() -> None:
    """`UserProfile` -> `user_profile`; an explicit `__tablename__` wins."""
    assert UserProfile.__tablename__ == "user_profile"
    assert UserProfile.__table__.name == "user_profile"  # type: ignore[attr-defined]
    assert LoginHistory.__table__.name == "user_login_log"  # type: ignore[attr-defined]


def test_base_model_alias() -> None:
    """`BaseModel` is `DBBaseModel`."""
    assert BaseModel is DBBaseModel


def test_mixins_give_each_table_its_own_columns() -> None:
    """Two tables sharing every mixin have distinct Column objects and indexes."""
    invoice = Invoice.__table__  # type: ignore[attr-defined]
    shipment = Shipment.__table__  # type: ignore[attr-defined]
    shared = {
        "id",
        "created_at",
        "updated_at",
        "tenant_id",
        "created_by",
        "updated_by",
        "deleted_at",
    }
    assert shared <= set(invoice.columns.keys())
    assert shared <= set(shipment.columns.keys())
    for name in shared:
        assert invoice.c[name] is not shipment.c[name]
        assert invoice.c[name].table is invoice
    assert not invoice.c.tenant_id.nullable
    assert invoice.c.id.primary_key
    assert {ix.name for ix in invoice.indexes} == {
        "ix_invoice_tenant_id",
        "ix_invoice_deleted_at",
    }
    assert {ix.name for ix in shipment.indexes} == {
        "ix_shipment_tenant_id",
        "ix_shipment_deleted_at",
    }


def test_naming_convention() -> None:
    """Constraint names follow the convention on the DBBaseModel metadata."""
    assert DBBaseModel.metadata.naming_convention == {
        "ix": NAMING_CONVENTION["ix"],
        "uq": NAMING_CONVENTION["uq"],
        "ck": NAMING_CONVENTION["ck"],
        "fk": NAMING_CONVENTION["fk"],
        "pk": NAMING_CONVENTION["pk"],
    }
    names = {
        c.name
        for c in UserProfile.__table__.constraints  # type: ignore[attr-defined]
    }
    assert {"pk_user_profile", "uq_user_profile_email"} <= names


def test_timestamp_columns_are_timezone_aware() -> None:
    """`created_at` / `updated_at` are TIMESTAMP WITH TIME ZONE on PostgreSQL."""
    column = Invoice.__table__.c.created_at  # type: ignore[attr-defined]
    ddl = column.type.compile(dialect=postgresql.dialect())
    assert ddl == "TIMESTAMP WITH TIME ZONE"


def test_defaults_on_construction() -> None:
    """A new row gets a v7 UUID, UTC timestamps, tenant and user from context."""
    with tenant_scope("acme", user_id="alice"):
        invoice = Invoice(number="INV-1")
    assert invoice.id.version == 7
    assert invoice.created_at.tzinfo is UTC
    assert invoice.updated_at >= invoice.created_at
    assert invoice.tenant_id == "acme"
    assert invoice.created_by == invoice.updated_by == "alice"
    assert invoice.deleted_at is None
    assert not invoice.is_deleted


def test_tenant_is_required_without_context() -> None:
    """A tenant row built outside a tenant scope without `tenant_id` fails closed."""
    with pytest.raises(TenantError):
        Invoice(number="INV-2")
    explicit = Invoice(number="INV-3", tenant_id="given")
    assert explicit.tenant_id == "given"
    assert explicit.created_by is None


def test_schema_without_table_validates() -> None:
    """The same bases without `table=True` are a validating pydantic schema."""
    with tenant_scope("acme"):
        schema = InvoiceSchema(number="INV-9")
    assert schema.tenant_id == "acme"
    assert not hasattr(InvoiceSchema, "__table__")
    with pytest.raises(pydantic.ValidationError):
        InvoiceSchema(number="x" * 21, tenant_id="t")
    with pytest.raises(pydantic.ValidationError):
        InvoiceSchema.model_validate({"number": "n", "tenant_id": "t", "id": "nope"})
    dumped = InvoiceSchema(number="n", tenant_id="t").model_dump(mode="json")
    assert uuid.UUID(dumped["id"]).version == 7


def test_uuid7_is_time_ordered() -> None:
    """v7 ids carry the time: later ids sort after earlier ones."""
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert first.version == second.version == 7
    assert first.variant == uuid.RFC_4122
    assert first < second
    millis = first.int >> 80
    assert abs(millis / 1000 - time.time()) < 5
    assert len({uuid7() for _ in range(1000)}) == 1000


def test_uuid7_batch_is_ordered_and_unique() -> None:
    """A batch of 20,000 ids (several per millisecond) is strictly increasing."""
    ids = uuid7_batch(20_000)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids[:100])
    assert str(ids[0]) == str(uuid.UUID(str(ids[0])))
    assert uuid7() > ids[-1]


def test_forked_child_makes_its_own_random_bits() -> None:
    """A forked worker does not replay its parent's buffered randomness."""
    uuid7()  # the parent now holds unread random bytes
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child process
        os.write(write, uuid7().bytes)
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 16)
    os.close(read)
    os.waitpid(child, 0)
    ours = uuid7().bytes
    assert theirs[8:] != ours[8:]  # the 62 random bits differ


def test_utc_datetime_binding() -> None:
    """Aware datetimes are stored in UTC; naive ones and non-datetimes are refused."""
    column_type = UTCDateTime()
    plus_two = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    pg = column_type.process_bind_param(plus_two, postgresql.dialect())
    assert pg == datetime(2026, 1, 1, 10, tzinfo=UTC)
    lite = column_type.process_bind_param(plus_two, sqlite.dialect())
    assert lite == datetime(2026, 1, 1, 10)  # SQLite stores the UTC wall time
    assert column_type.process_bind_param(None, sqlite.dialect()) is None
    with pytest.raises(ValueError, match="naive"):
        column_type.process_bind_param(datetime(2026, 1, 1), sqlite.dialect())
    with pytest.raises(TypeError, match="datetime"):
        column_type.process_bind_param("2026-01-01", sqlite.dialect())
    naive_read = column_type.process_result_value(
        datetime(2026, 1, 1), sqlite.dialect()
    )
    assert naive_read == datetime(2026, 1, 1, tzinfo=UTC)
    aware_read = column_type.process_result_value(plus_two, postgresql.dialect())
    assert aware_read is not None
    assert aware_read.tzinfo is UTC
    assert column_type.process_result_value(None, sqlite.dialect()) is None


def test_uuid7_is_monotonic_within_a_millisecond() -> None:
    """Ids made in one burst sort in creation order, even in the same millisecond."""
    burst = [uuid7() for _ in range(5000)]
    assert burst == sorted(burst)
    assert all(u.version == 7 for u in burst)
