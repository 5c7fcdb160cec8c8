"""Helpers for your own test suite: no retry waits, no leftover rate limits.

```python
# conftest.py: a failing call fails at once, without backoff sleeps
import pytest
from dotmac_core import testing


@pytest.fixture(autouse=True, scope="session")
def _no_retries():
    testing.set_retries_enabled(False)
```

The switches are process-wide (not per task) and meant for tests only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._ratelimit_store import LOCAL_STORE
from .decorators import _RETRY_MODE

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "record_retry_delays",
    "reset_rate_limits",
    "retries_disabled",
    "set_retries_enabled",
]


def set_retries_enabled(enabled: bool) -> None:
    """Turn every `retry_on_failure` on or off for the rest of the process.

    Off, a decorated call runs once and its error propagates as it is, as if
    `max_retries` were 0.
    """
    _RETRY_MODE.enabled = enabled


@contextmanager
def retries_disabled() -> Iterator[None]:
    """Run the block with retries off, then restore the previous setting."""
    previous = _RETRY_MODE.enabled
    _RETRY_MODE.enabled = False
    try:
        yield
    finally:
        _RETRY_MODE.enabled = previous


@contextmanager
def record_retry_delays() -> Iterator[list[float]]:
    """Run the block with retries that record their waits instead of sleeping.

    Yields the list the waits are appended to, in seconds, so a test can check
    a retry policy in microseconds. Recorded waits count toward `max_time` as
    if they had been slept. It only replaces the sleep: with retries disabled,
    nothing is retried and nothing recorded.

    ```python
    with testing.record_retry_delays() as delays:
        await fetch_report()
    assert delays == [0.1, 0.2]  # with jitter=False
    ```
    """
    previous = _RETRY_MODE.recorded
    delays: list[float] = []
    _RETRY_MODE.recorded = delays
    try:
        yield delays
    finally:
        _RETRY_MODE.recorded = previous


def reset_rate_limits() -> None:
    """Forget the calls every process-local `rate_limit` has counted.

    Limits kept in Redis are not touched: give each test its own
    `CacheConfig.key_prefix` and delete those keys instead.
    """
    LOCAL_STORE.clear()
