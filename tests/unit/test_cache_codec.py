"""The value codec: JSON in a versioned envelope, typed on the way back, no pickle."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, PositiveInt
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import registry
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from dotmac_core import ValidationError
from dotmac_core.cache.codec import (
    ENVELOPE_VERSION,
    JSON_CODEC,
    DecodeError,
    ValueCodec,
    codec_for,
    encode,
    header,
    pack,
    unpack,
)

from ..models import InvoiceSchema, UserProfile


class _PrivateBase(SQLModel, registry=registry()):
    """A base with its own registry, so the suite's metadata is untouched."""


class Counter(_PrivateBase, table=True):
    """A table whose primary key is assigned by the database."""

    id: int | None = SQLField(default=None, primary_key=True)
    n: int = 0


class Aliased(BaseModel):
    """A model whose field has an alias."""

    user_id: str = Field(alias="userId")


def _row() -> UserProfile:
    return UserProfile(display_name="Ada", email="ada@example.com")


def test_envelope_carries_version_and_generation() -> None:
    """The header names the format version and the generation tokens."""
    head = header(b"g1,g2")
    assert head == f"dmc{ENVELOPE_VERSION}|g1,g2|".encode()
    stored = pack(head, b"[1]")
    assert unpack(stored, head) == b"[1]"
    assert unpack(stored, header(b"g1,g3")) is None  # another generation: a miss
    assert unpack(pickle.dumps([1]), head) is None  # not ours: a miss


def test_encode_is_json_never_pickle() -> None:
    """Values are encoded as JSON; models by alias, datetimes as ISO strings."""
    when = datetime(2024, 5, 1, tzinfo=UTC)
    assert encode({"at": when, "n": None}) == b'{"at":"2024-05-01T00:00:00Z","n":null}'
    assert encode(Aliased(userId="u")) == b'{"userId":"u"}'
    with pytest.raises(ValidationError, match="cannot be cached as JSON"):
        encode(object())


def test_plain_json_codec() -> None:
    """Without a type, payloads decode to plain JSON values; `null` is `None`."""
    assert codec_for(None) is JSON_CODEC
    assert codec_for(Any) is JSON_CODEC
    assert JSON_CODEC.decode(b'{"a":[1,null]}') == {"a": [1, None]}
    assert JSON_CODEC.decode(b"null") is None
    with pytest.raises(DecodeError):
        JSON_CODEC.decode(b"{broken")


def test_models_come_back_as_models() -> None:
    """A pydantic model round-trips, aliases included."""
    assert ValueCodec(Aliased).decode(encode(Aliased(userId="u"))) == Aliased(
        userId="u"
    )
    schema = InvoiceSchema(number="N-1", tenant_id="acme")
    assert ValueCodec(InvoiceSchema).decode(encode(schema)) == schema


def test_table_rows_come_back_detached_as_their_class() -> None:
    """A SQLModel table object is rebuilt with its field types, detached."""
    row = _row()
    back = ValueCodec(UserProfile).decode(encode(row))
    assert type(back) is UserProfile
    assert back.id == row.id
    assert isinstance(back.id, type(row.id))
    assert back.created_at == row.created_at
    assert sa_inspect(back).detached


ROW = _row()


@pytest.mark.parametrize(
    ("annotation", "value", "first"),
    [
        (list[UserProfile], [ROW], lambda v: v[0]),
        (UserProfile | None, ROW, lambda v: v),
        (dict[str, UserProfile], {"a": ROW}, lambda v: v["a"]),
        (tuple[UserProfile, ...], (ROW,), lambda v: v[0]),
        (Annotated[UserProfile, "meta"], ROW, lambda v: v),
        (Annotated[list[UserProfile], "meta"], [ROW], lambda v: v[0]),
    ],
)
def test_table_rows_inside_containers(
    annotation: Any, value: Any, first: Callable[[Any], Any]
) -> None:
    """Table objects are rebuilt inside lists, optionals, dicts and tuples."""
    row = first(ValueCodec(annotation).decode(encode(value)))
    assert type(row) is UserProfile
    assert row.id == ROW.id


def test_optional_table_row_accepts_none() -> None:
    """`Model | None` decodes `null` as `None`."""
    assert ValueCodec(UserProfile | None).decode(b"null") is None


def test_row_without_a_key_stays_transient() -> None:
    """A table object whose primary key is unset cannot be detached: transient."""
    back = ValueCodec(Counter).decode(encode(Counter(n=2)))
    assert type(back) is Counter
    assert sa_inspect(back).transient
    assert sa_inspect(ValueCodec(Counter).decode(encode(Counter(id=1)))).detached


def test_annotations_without_tables_are_kept() -> None:
    """Annotations that hold no table class are used as they are."""
    assert ValueCodec(Literal["a", "b"]).decode(b'"a"') == "a"
    assert ValueCodec(list[int]).decode(b"[1,2]") == [1, 2]
    assert ValueCodec(Annotated[int, "meta"]).decode(b"3") == 3


def test_values_that_no_longer_fit_are_decode_errors() -> None:
    """A payload that fails validation (the model changed) is a `DecodeError`."""
    with pytest.raises(DecodeError):
        ValueCodec(Aliased).decode(b'{"other":1}')
    with pytest.raises(DecodeError):
        ValueCodec(PositiveInt).decode(b"-1")
    with pytest.raises(DecodeError):
        ValueCodec(UserProfile).decode(b'{"display_name":1}')


def test_codecs_are_cached_per_annotation() -> None:
    """One codec per annotation; unhashable annotations still work."""
    assert codec_for(list[int]) is codec_for(list[int])
    unhashable = Annotated[int, {"not": "hashable"}]
    assert codec_for(unhashable).decode(b"5") == 5


def test_counter_table_stays_out_of_the_suite_metadata() -> None:
    """The private test table is not registered on the shared metadata."""
    assert "counter" not in SQLModel.metadata.tables
