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
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


_uuid7_lock = threading.Lock()
_uuid7_last = (0, 0)  # (millisecond, 12-bit counter) of the last id made
_random = b""  # unused bytes of the last os.urandom read
_new_uuid = uuid.UUID.__new__
_safe = uuid.SafeUUID.unknown


def uuid7() -> uuid.UUID:
    """Return a time-ordered UUID (RFC 9562 version 7), monotonic in this process.

    Its first 48 bits are the Unix time in milliseconds, so new keys land at
    the right edge of a B-tree index instead of at random pages. Within one
    millisecond the next 12 bits count up (RFC 9562 method 1), so ids made in
    this process sort in creation order.
    """
    return uuid7_batch(1)[0]


def uuid7_batch(count: int) -> list[uuid.UUID]:
    """Return `count` successive `uuid7()` values, made under one lock."""
    global _uuid7_last, _random
    values = []
    with _uuid7_lock:
        if len(_random) < 10 * count:
            _random = os.urandom(max(4096, 10 * count))
        randomness, _random = _random[: 10 * count], _random[10 * count :]
        last_millis, counter = _uuid7_last
        for i in range(0, 10 * count, 10):
            millis = time.time_ns() // 1_000_000
            if millis > last_millis:
                # A random start in the lower half leaves room to count up.
                counter = int.from_bytes(randomness[i : i + 2], "big") & 0x7FF
            else:
                millis, counter = last_millis, counter + 1
                if counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                    millis, counter = millis + 1, 0
            last_millis = millis
            rand_b = int.from_bytes(randomness[i + 2 : i + 10], "big") & _RAND_B
            values.append(
                (millis & 0xFFFF_FFFF_FFFF) << 80  # 48-bit time
                | 0x7 << 76  # version 7
                | counter << 64  # 12-bit rand_a used as a counter
                | 0x2 << 62  # RFC 9562 variant
                | rand_b  # 62 random bits
            )
        _uuid7_last = (last_millis, counter)
    made = []
    for value in values:
        # What UUID(int=value) does, minus its argument checks: the value is
        # in range by construction.
        one: uuid.UUID = _new_uuid(uuid.UUID)
        object.__setattr__(one, "int", value)
        object.__setattr__(one, "is_safe", _safe)
        made.append(one)
    return made


_RAND_B = (1 << 62) - 1


def _after_fork_in_child() -> None:
    """A forked worker must not reuse its parent's unread random bytes."""
    global _random, _uuid7_lock
    _random = b""
    _uuid7_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: PostgreSQL's type code (OID) of `timestamp with time zone`.
_TIMESTAMPTZ = 1184


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

    def result_processor(
        self, dialect: Dialect, coltype: object
    ) -> Callable[[Any], datetime | None] | None:
        """`process_result_value` after the impl's processor, as one function.

        Pages read three timestamps a row: this skips the generic wrapper's
        extra calls. asyncpg reads a `timestamptz` column (type code 1184) as
        an aware UTC datetime whatever the server's time zone: nothing to
        convert, so no processor at all.
        """
        inner = self.impl_instance.result_processor(dialect, coltype)
        if inner is None and dialect.driver == "asyncpg" and coltype == _TIMESTAMPTZ:
            return None

        def process(value: Any) -> datetime | None:
            if inner is not None:
                value = inner(value)
            if value is None or value.tzinfo is UTC:
                read: datetime | None = value
                return read
            return as_utc(value)

        return process


# Its public home: Alembic writes a type as `type(obj).__module__` + its repr,
# and a migration must not import a private module.
UTCDateTime.__module__ = "dotmac_core.types"


def as_utc(value: datetime) -> datetime:
    """A datetime read from the database, as an aware UTC datetime."""
    if value.tzinfo is UTC:
        return value  # asyncpg's timestamptz values already are
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
