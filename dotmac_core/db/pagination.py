"""Offset pages (`PaginationParams`, `PaginationResult`), keyset pages (`CursorPage`).

An offset page costs the database every skipped row (page 1,000 of 50 reads
50,000 rows) plus a COUNT for the total. A keyset page starts right after the
last row seen, so page 1,000 costs what page 1 costs; its cursor is opaque,
signed with `SecurityConfig.secret_key`, and bound to the model and the order
it was made for, so a tampered or foreign cursor is refused.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import os
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pydantic
from pydantic import AliasChoices, Field

from ..config import SecurityConfig, _note_key_use
from ..exceptions import ValidationError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "CursorPage",
    "PaginationParams",
    "PaginationResult",
]

T = TypeVar("T")

#: Page size used when a call gives none.
DEFAULT_PAGE_SIZE = 20
#: Largest page size accepted.
MAX_PAGE_SIZE = 100


class PaginationParams(pydantic.BaseModel):
    """Which page to read: `page` (from 1) and `size` (1..100, alias `per_page`)."""

    model_config = pydantic.ConfigDict(frozen=True, populate_by_name=True)

    page: int = Field(default=1, ge=1, description="Page number, from 1.")
    size: int = Field(
        default=DEFAULT_PAGE_SIZE,
        ge=1,
        le=MAX_PAGE_SIZE,
        validation_alias=AliasChoices("size", "per_page"),
        description="Rows per page.",
    )

    @property
    def per_page(self) -> int:
        """Alias of `size`, the name the handbook's internal helpers use."""
        return self.size

    @property
    def offset(self) -> int:
        """Rows skipped before this page."""
        return (self.page - 1) * self.size


def check_page(page: object, size: object, max_size: int = MAX_PAGE_SIZE) -> None:
    """Raise `ValidationError` unless `page >= 1` and `1 <= size <= max_size`."""
    if not isinstance(page, int) or isinstance(page, bool) or page < 1:
        msg = f"page must be an int >= 1, got {page!r}"
        raise ValidationError(msg, field="page")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= max_size:
        msg = f"size must be an int from 1 to {max_size}, got {size!r}"
        raise ValidationError(msg, field="size")
    if (page - 1) * size > MAX_ROWS:
        msg = f"page {page} of size {size} starts past the largest offset, {MAX_ROWS}"
        raise ValidationError(msg, field="page")


#: The largest LIMIT / OFFSET the databases take (a signed 64-bit int).
MAX_ROWS = 2**63 - 1


class PaginationResult(pydantic.BaseModel, Generic[T]):
    """One page of rows with its position; usable as a FastAPI response model.

    `total` and `pages` are `None` when the page was read without a count.
    """

    items: list[T]
    total: int | None
    page: int
    size: int
    pages: int | None
    has_next: bool
    has_prev: bool

    @classmethod
    def build(
        cls, items: Sequence[T], *, page: int, size: int, total: int | None, more: bool
    ) -> PaginationResult[T]:
        """Assemble a page; `more` says whether a row follows this page."""
        pages = None if total is None else max(1, math.ceil(total / size))
        has_next = more if total is None else page * size < total
        # Every field is computed here from checked values: no validation pass
        # (it would walk every row object again).
        return cls.model_construct(
            items=list(items),
            total=total,
            page=page,
            size=size,
            pages=pages,
            has_next=has_next,
            has_prev=page > 1,
        )


class CursorPage(pydantic.BaseModel, Generic[T]):
    """One keyset page: its rows and the opaque cursor of the next page (or `None`)."""

    items: list[T]
    next_cursor: str | None
    size: int

    @property
    def has_next(self) -> bool:
        """Whether another page follows."""
        return self.next_cursor is not None


# --- cursor encoding --------------------------------------------------------------


_DEFAULT_KEYS: dict[str | None, bytes] = {}


def _key(security: SecurityConfig | None) -> bytes:
    if security is not None:
        secret = security.secret_key.get_secret_value()
        _note_key_use(secret)
        return secret.encode()
    # Reading the settings costs about 0.1 ms, twice per keyset page: the
    # default key is read once per value of the variable that sets it (and
    # checked for being the process's random key then, warning once).
    variable = os.environ.get("DOTMAC_SECURITY_SECRET_KEY")
    key = _DEFAULT_KEYS.get(variable)
    if key is None:
        secret = SecurityConfig().secret_key.get_secret_value()
        _note_key_use(secret)
        key = secret.encode()
        _DEFAULT_KEYS.clear()
        _DEFAULT_KEYS[variable] = key
    return key


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(
    binding: str, values: list[Any], security: SecurityConfig | None = None
) -> str:
    """Sign `values` (JSON-ready) for the model/order described by `binding`."""
    payload = json.dumps(values, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(_sign(security, binding, payload))}"


def _sign(security: SecurityConfig | None, binding: str, payload: bytes) -> bytes:
    """The cursor's 128-bit HMAC-SHA256 tag (`hmac.digest`: the one-shot C path)."""
    message = binding.encode() + b"\0" + payload
    return hmac.digest(_key(security), message, "sha256")[:16]


def decode_cursor(
    cursor: str, binding: str, security: SecurityConfig | None = None
) -> list[Any]:
    """Verify `cursor` was made by `encode_cursor` for `binding`; return its values.

    Raises:
        ValidationError: the cursor is malformed, tampered with, or was made for
            another model, order or key.
    """
    if not isinstance(cursor, str) or len(cursor) > 4096 or cursor.count(".") != 1:
        msg = "invalid cursor"
        raise ValidationError(msg, field="cursor")
    body, signature = cursor.split(".")
    try:
        payload, mac = _unb64(body), _unb64(signature)
    except (binascii.Error, ValueError):
        msg = "invalid cursor"
        raise ValidationError(msg, field="cursor") from None
    if not hmac.compare_digest(mac, _sign(security, binding, payload)):
        msg = "invalid cursor: tampered with, or made for another model or order"
        raise ValidationError(msg, field="cursor")
    values = json.loads(payload)
    if not isinstance(values, list):  # pragma: no cover - we signed a list
        msg = "invalid cursor"
        raise ValidationError(msg, field="cursor")
    return values


_CURSOR_CONFIG = pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
_CURSOR_ADAPTERS: dict[
    tuple[type[Any], tuple[str, ...]], pydantic.TypeAdapter[Any]
] = {}


def cursor_adapter(
    model: type[Any], names: tuple[str, ...]
) -> pydantic.TypeAdapter[Any]:
    """Values of a keyset's sort columns to JSON and back, typed by the fields."""
    key = (model, names)
    adapter = _CURSOR_ADAPTERS.get(key)
    if adapter is None:
        fields = [model.model_fields[name].annotation for name in names]
        shape: Any = tuple[tuple(fields)]  # type: ignore[misc]
        adapter = _CURSOR_ADAPTERS[key] = pydantic.TypeAdapter(
            shape, config=_CURSOR_CONFIG
        )
    return adapter


def cursor_position(
    cursor: str,
    binding: str,
    adapter: pydantic.TypeAdapter[Any],
    security: SecurityConfig | None = None,
) -> tuple[Any, ...]:
    """The typed sort values a cursor made by `encode_cursor` holds.

    Raises:
        ValidationError: the cursor is malformed, tampered with, foreign, or
            its values do not fit the sort columns.
    """
    raw = decode_cursor(cursor, binding, security)
    try:
        position: tuple[Any, ...] = adapter.validate_json(json.dumps(raw))
    except pydantic.ValidationError:
        msg = "invalid cursor"
        raise ValidationError(msg, field="cursor") from None
    return position
