"""Column types and value factories shared by the models (private)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.types import DateTime, TypeDecorator

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


_uuid7_lock = threading.Lock()
_uuid7_last = (0, 0)  # (millisecond, 12-bit counter) of the last id made


def uuid7() -> uuid.UUID:
    """Return a time-ordered UUID (RFC 9562 version 7), monotonic in this process.

    Its first 48 bits are the Unix time in milliseconds, so new keys land at
    the right edge of a B-tree index instead of at random pages. Within one
    millisecond the next 12 bits count up (RFC 9562 method 1), so ids made in
    this process sort in creation order.
    """
    global _uuid7_last
    with _uuid7_lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_counter = _uuid7_last
        if millis > last_millis:
            # A random start in the lower half leaves room to count up.
            counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
        else:
            millis, counter = last_millis, last_counter + 1
            if counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                millis, counter = millis + 1, 0
        _uuid7_last = (millis, counter)
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (millis & 0xFFFF_FFFF_FFFF) << 80  # 48-bit time
    value |= 0x7 << 76  # version 7
    value |= counter << 64  # 12-bit rand_a used as a counter
    value |= 0x2 << 62  # RFC 9562 variant
    value |= rand_b  # 62 random bits
    return uuid.UUID(int=value)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    Naive datetimes are refused: their meaning depends on the machine's clock.
    On SQLite (no time zone storage) the UTC wall time is stored.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            msg = f"expected a datetime, got {type(value).__name__}"
            raise TypeError(msg)
        if value.tzinfo is None or value.utcoffset() is None:
            msg = "naive datetime refused: give a timezone-aware datetime"
            raise ValueError(msg)
        as_utc = value.astimezone(UTC)
        return as_utc.replace(tzinfo=None) if dialect.name == "sqlite" else as_utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    """A datetime read from the database, as an aware UTC datetime."""
    if value.tzinfo is UTC:
        return value  # asyncpg's timestamptz values already are
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
