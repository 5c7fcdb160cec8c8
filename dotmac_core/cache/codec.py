"""Value encoding: JSON in a small versioned envelope; never pickle.

A stored entry is `dmc1|<generation>|<json>`: a magic string with the format
version, the generation tokens of its keyspace (empty for plain keys), and the
value as JSON (`pydantic_core.to_json`, which understands pydantic and SQLModel
models, dataclasses, datetimes, UUIDs, enums, ...).

Reading back, a value is validated against the type it is wanted as (a
`@cached` function's return annotation, or `as_type=`) with a pydantic
`TypeAdapter`, so a model comes back as that model. SQLModel *table* classes
skip validation in their constructor, so they are rebuilt through
`model_validate` and returned detached (they have an identity, belong to no
session). Anything that fails to parse or validate, for example after the
model changed, is reported as undecodable and the cache treats it as a miss.
"""

from __future__ import annotations

import functools
import types
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
)

from pydantic import PlainValidator, TypeAdapter
from pydantic_core import PydanticSerializationError, from_json, to_json
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import SQLModel

from ..exceptions import ValidationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ENVELOPE_VERSION", "DecodeError", "ValueCodec", "codec_for", "encode"]

#: Version of the stored format; entries written by another version are misses.
ENVELOPE_VERSION = 1
_MAGIC = f"dmc{ENVELOPE_VERSION}|".encode()


class DecodeError(ValueError):
    """A stored value could not be read as the wanted type (treated as a miss)."""


def encode(value: object) -> bytes:
    """Return `value` as JSON bytes.

    Raises:
        ValidationError: the value has no JSON form (a socket, a lock, ...).
    """
    try:
        return to_json(value, by_alias=True)
    except PydanticSerializationError as exc:
        msg = f"a {type(value).__qualname__} value cannot be cached as JSON: {exc}"
        raise ValidationError(msg) from exc


def header(generation: bytes) -> bytes:
    """Return the envelope header for entries of a keyspace generation."""
    return _MAGIC + generation + b"|"


def pack(head: bytes, payload: bytes) -> bytes:
    """Wrap a JSON payload in the envelope whose header is `head`."""
    return head + payload


def unpack(raw: bytes, head: bytes) -> bytes | None:
    """Return the payload of `raw` if it carries `head`, else `None` (a miss)."""
    if raw.startswith(head):
        return raw[len(head) :]
    return None


def _is_table(annotation: Any) -> bool:
    return (
        isinstance(annotation, type)
        and issubclass(annotation, SQLModel)
        and bool(annotation.model_config.get("table", False))
    )


def _load_row(model: type[SQLModel], data: Any) -> SQLModel:
    """Build a table object through SQLModel's own validation, detached.

    Detached, as a row loaded by a closed session would be: it has an identity,
    so `session.add()` updates the row instead of inserting a duplicate, and a
    relationship that was never loaded raises instead of reading as empty.
    """
    row = model.model_validate(data)
    if None not in sa_inspect(row).mapper.primary_key_from_instance(row):
        make_transient_to_detached(row)
    return row


def _rebuild(annotation: Any) -> Any:
    """Replace SQLModel table classes in `annotation` with validating stand-ins."""
    if _is_table(annotation):
        return Annotated[Any, PlainValidator(functools.partial(_load_row, annotation))]
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is None or origin is Literal or not args:
        return annotation
    if origin is Annotated:
        inner = _rebuild(args[0])
        if inner is args[0]:
            return annotation
        return Annotated[(inner, *annotation.__metadata__)]
    rebuilt = tuple(_rebuild(arg) for arg in args)
    if all(new is old for new, old in zip(rebuilt, args, strict=True)):
        return annotation
    if origin is Union or origin is types.UnionType:
        return Union[rebuilt]  # noqa: UP007 - built from a runtime tuple
    return origin[rebuilt]


class ValueCodec:
    """Decode payloads as one type (or as plain JSON when the type is `Any`)."""

    __slots__ = ("_parse",)

    def __init__(self, annotation: Any = Any) -> None:
        # The schema validator itself: TypeAdapter.validate_json would add a
        # Python layer to every hit.
        self._parse: Callable[[bytes], Any] = (
            from_json
            if annotation is Any
            else TypeAdapter(_rebuild(annotation)).validator.validate_json
        )

    def decode(self, payload: bytes) -> Any:
        """Return the value in `payload`.

        Raises:
            DecodeError: the payload is not JSON or does not fit the type.
        """
        try:
            return self._parse(payload)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise DecodeError(str(exc)) from exc


#: Decodes as plain JSON (dicts, lists, str, numbers, bool, None).
JSON_CODEC = ValueCodec()


@functools.lru_cache(maxsize=256)
def _codec_for(annotation: Any) -> ValueCodec:
    return ValueCodec(annotation)


def codec_for(annotation: Any) -> ValueCodec:
    """Return a (cached) codec for `annotation`; `None` or `Any` means plain JSON."""
    if annotation is None or annotation is Any:
        return JSON_CODEC
    try:
        hash(annotation)
    except TypeError:  # unhashable annotation metadata: build one uncached
        return ValueCodec(annotation)
    return _codec_for(annotation)
