"""Pagination schemas and signed keyset cursors."""

from __future__ import annotations

import logging

import pydantic
import pytest

import dotmac_core.config as config_module
from dotmac_core import (
    MAX_PAGE_SIZE,
    CursorPage,
    PaginationParams,
    PaginationResult,
    SecurityConfig,
    ValidationError,
)
from dotmac_core.db import pagination
from dotmac_core.db.pagination import check_page, decode_cursor, encode_cursor


def test_params_defaults_and_alias() -> None:
    """`per_page` is an alias of `size`; offsets follow from page and size."""
    assert PaginationParams().page == 1
    params = PaginationParams.model_validate({"page": 3, "per_page": 25})
    assert params.size == params.per_page == 25
    assert params.offset == 50
    assert PaginationParams(page=2, size=10).offset == 10


@pytest.mark.parametrize(
    "data", [{"page": 0}, {"size": 0}, {"size": MAX_PAGE_SIZE + 1}, {"page": -1}]
)
def test_params_out_of_range_are_rejected(data: dict[str, int]) -> None:
    """Pages below 1 and sizes outside 1..max are errors, never clamped."""
    with pytest.raises(pydantic.ValidationError):
        PaginationParams.model_validate(data)


@pytest.mark.parametrize(
    ("page", "size"), [(0, 10), (1, 0), (1, 101), ("1", 10), (1, True), (1.5, 10)]
)
def test_check_page_rejects(page: object, size: object) -> None:
    """Repository page arguments are checked with a dotmac ValidationError."""
    with pytest.raises(ValidationError):
        check_page(page, size)


def test_result_math() -> None:
    """Totals give pages and has_next; without a total, `more` decides."""
    result = PaginationResult[int].build([1, 2], page=2, size=2, total=5, more=True)
    assert (result.pages, result.has_next, result.has_prev) == (3, True, True)
    last = PaginationResult[int].build([5], page=3, size=2, total=5, more=False)
    assert not last.has_next
    empty = PaginationResult[int].build([], page=1, size=10, total=0, more=False)
    assert empty.pages == 1
    countless = PaginationResult[int].build([1], page=1, size=1, total=None, more=True)
    assert countless.total is None
    assert countless.pages is None
    assert countless.has_next


def test_result_is_a_response_model() -> None:
    """The generic result has a JSON schema, as FastAPI response models need."""
    schema = PaginationResult[int].model_json_schema()
    assert set(schema["required"]) >= {"items", "total", "page", "size"}
    page = CursorPage[str](items=["a"], next_cursor=None, size=1)
    assert not page.has_next
    assert page.model_dump() == {"items": ["a"], "next_cursor": None, "size": 1}


def test_cursor_round_trip_and_tampering() -> None:
    """A cursor decodes for its binding only; any change is refused."""
    security = SecurityConfig(secret_key="k" * 32)
    cursor = encode_cursor("member|rank,id", [3, "abc"], security)
    assert decode_cursor(cursor, "member|rank,id", security) == [3, "abc"]
    body, mac = cursor.split(".")
    tampered = [
        f"{body}x.{mac}",
        f"{body}.{mac[:-2]}AA",
        f"{body[:-1]}.{mac}",
        "nonsense",
        "a.b.c",
        "!!!.???",
        "",
        cursor + "x" * 5000,
    ]
    for bad in tampered:
        with pytest.raises(ValidationError, match="invalid cursor"):
            decode_cursor(bad, "member|rank,id", security)
    with pytest.raises(ValidationError):
        decode_cursor(cursor, "member|-rank,id", security)  # another order
    with pytest.raises(ValidationError):
        decode_cursor(cursor, "team|rank,id", security)  # another model
    with pytest.raises(ValidationError):
        decode_cursor(cursor, "member|rank,id", SecurityConfig(secret_key="o" * 32))


def _key_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "dotmac_core.config" and "SECRET_KEY" in r.getMessage()
    ]


@pytest.mark.parametrize("given", [False, True], ids=["default", "given"])
def test_random_key_warns_once_on_first_cursor_use(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, given: bool
) -> None:
    """Without a configured key, the first cursor signed logs one WARNING.

    Verifying and signing more cursors logs nothing more, whether the key comes
    from the default `SecurityConfig()` or from one passed in.
    """
    monkeypatch.delenv("DOTMAC_SECURITY_SECRET_KEY", raising=False)
    monkeypatch.setattr(config_module, "_warned_process_secret", False)
    monkeypatch.setattr(pagination, "_DEFAULT_KEYS", {})
    with caplog.at_level(logging.WARNING, logger="dotmac_core.config"):
        security = SecurityConfig() if given else None
        assert _key_warnings(caplog) == []
        cursor = encode_cursor("member|id", ["a"], security)
        assert decode_cursor(cursor, "member|id", security) == ["a"]
        encode_cursor("member|id", ["b"], security)
    (warning,) = _key_warnings(caplog)
    assert warning.levelno == logging.WARNING
    key = SecurityConfig().secret_key.get_secret_value()
    assert key not in warning.getMessage()


def test_configured_key_never_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key from the environment or an argument signs cursors without a warning."""
    monkeypatch.setattr(config_module, "_warned_process_secret", False)
    monkeypatch.setattr(pagination, "_DEFAULT_KEYS", {})
    monkeypatch.setenv("DOTMAC_SECURITY_SECRET_KEY", "e" * 32)
    with caplog.at_level(logging.WARNING, logger="dotmac_core.config"):
        encode_cursor("member|id", ["a"])
        encode_cursor("member|id", ["a"], SecurityConfig(secret_key="a" * 32))
    assert _key_warnings(caplog) == []
