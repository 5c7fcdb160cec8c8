"""Helpers and a pytest plugin for your own test suite.

Enable the plugin in your top-level conftest.py (it needs pytest-asyncio):

```python
pytest_plugins = ["dotmac_core.testing"]
```

It gives the fixtures `dotmac_db` (a database per test, registered as the
default, emptied afterwards), `dotmac_cache` (an in-memory cache),
`dotmac_tenant` (a current tenant, also through the `dotmac_tenant` marker)
and `dotmac_queries` (a `QueryCounter`), and switches `retry_on_failure` off
for the run. `assert_tenant_isolated` probes a repository across two tenants.
See the Testing page of the docs.

The helpers below work without the plugin:

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

from .._ratelimit_store import LOCAL_STORE
from ..decorators import _RETRY_MODE
from ._isolation import assert_tenant_isolated as assert_tenant_isolated
from ._plugin import DEFAULT_TENANT as DEFAULT_TENANT
from ._plugin import DEFAULT_URL as DEFAULT_URL
from ._plugin import _dotmac_clean_process_state as _dotmac_clean_process_state
from ._plugin import dotmac_cache as dotmac_cache
from ._plugin import dotmac_database_url as dotmac_database_url
from ._plugin import dotmac_db as dotmac_db
from ._plugin import dotmac_metadata as dotmac_metadata
from ._plugin import dotmac_queries as dotmac_queries
from ._plugin import dotmac_tenant as dotmac_tenant
from ._plugin import pytest_addoption as pytest_addoption
from ._plugin import pytest_collection_modifyitems as pytest_collection_modifyitems
from ._plugin import pytest_configure as pytest_configure
from ._plugin import pytest_unconfigure as pytest_unconfigure
from ._queries import QueryCounter as QueryCounter

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_TENANT",
    "DEFAULT_URL",
    "QueryCounter",
    "assert_tenant_isolated",
    "dotmac_cache",
    "dotmac_database_url",
    "dotmac_db",
    "dotmac_metadata",
    "dotmac_queries",
    "dotmac_tenant",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_unconfigure",
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
