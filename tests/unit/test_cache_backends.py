"""The in-process backend and the circuit breaker, with a fake clock."""

from __future__ import annotations

import logging

import pytest

from dotmac_core.cache import CacheBackend, MemoryBackend
from dotmac_core.cache._breaker import CALL, PROBE, SKIP, CircuitBreaker
from dotmac_core.cache.backends import _glob_escape


class Clock:
    """Monotonic seconds that tests move by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A fake monotonic clock."""
    return Clock()


@pytest.fixture
def memory(clock: Clock) -> MemoryBackend:
    """A memory backend of three entries on the fake clock."""
    return MemoryBackend(3, clock=clock)


async def test_memory_backend_implements_the_protocol(memory: MemoryBackend) -> None:
    """`MemoryBackend` is a `CacheBackend` without a deadline."""
    assert isinstance(memory, CacheBackend)
    assert memory.name == "memory"
    assert memory.timeout is None


async def test_entries_expire_after_their_ttl(
    memory: MemoryBackend, clock: Clock
) -> None:
    """An entry is returned until its TTL passes, then gone; no TTL: kept."""
    await memory.set("a", b"1", 10)
    await memory.set("b", b"2", None)
    clock.now += 9.9
    assert await memory.get_many(["a", "b"]) == [b"1", b"2"]
    clock.now += 0.1
    assert await memory.get("a") is None
    assert await memory.get("b") == b"2"
    assert len(memory) == 1


async def test_least_recently_used_entry_is_evicted(memory: MemoryBackend) -> None:
    """Past `max_entries`, the entry read or written longest ago goes first."""
    await memory.set_many([("a", b"1", None), ("b", b"2", None), ("c", b"3", None)])
    assert await memory.get("a") == b"1"  # a is now the most recent
    await memory.set("d", b"4", None)
    assert await memory.get_many(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]


async def test_add_stores_only_when_absent(memory: MemoryBackend, clock: Clock) -> None:
    """`add` refuses a live key and accepts an expired one."""
    assert await memory.add("lock", b"me", 5)
    assert not await memory.add("lock", b"you", 5)
    clock.now += 5
    assert await memory.add("lock", b"you", 5)


async def test_delete_if_equal_removes_only_its_own_value(
    memory: MemoryBackend,
) -> None:
    """`delete_if_equal` leaves a key that holds another value."""
    await memory.set("lock", b"me", None)
    assert not await memory.delete_if_equal("lock", b"you")
    assert await memory.delete_if_equal("lock", b"me")
    assert not await memory.delete_if_equal("lock", b"me")


async def test_clear_and_delete(memory: MemoryBackend) -> None:
    """`clear` drops a prefix; `delete_many` ignores absent keys; close empties."""
    await memory.set_many([("p:a", b"1", None), ("p:b", b"2", None), ("q", b"3", None)])
    await memory.clear("p:")
    assert await memory.get_many(["p:a", "p:b", "q"]) == [None, None, b"3"]
    await memory.delete_many(["q", "absent"])
    assert len(memory) == 0
    await memory.set("x", b"1", None)
    await memory.aclose()
    assert len(memory) == 0


def test_scan_patterns_escape_glob_characters() -> None:
    """A prefix with glob characters matches only itself in `SCAN MATCH`."""
    assert _glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


def test_breaker_opens_at_the_threshold_and_probes_once(clock: Clock) -> None:
    """Closed until N failures; open for `reset_after`; then exactly one probe."""
    breaker = CircuitBreaker("redis", 3, 5.0, clock=clock)
    error = ConnectionError("down")
    for _ in range(2):
        assert breaker.acquire() == CALL
        breaker.failure(error)
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.acquire() == CALL
        breaker.failure(error)
    assert breaker.acquire() == SKIP
    clock.now += 5
    assert breaker.acquire() == PROBE
    assert breaker.acquire() == SKIP  # one probe at a time
    breaker.failure(error)  # the probe failed: open again
    assert breaker.acquire() == SKIP
    clock.now += 5
    assert breaker.acquire() == PROBE
    breaker.release()  # the probe was cancelled: another call may probe
    assert breaker.acquire() == PROBE
    breaker.success()
    assert breaker.acquire() == CALL


def test_breaker_logs_once_per_outage(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning when an outage starts, one info once healthy for a while."""
    breaker = CircuitBreaker("redis", 3, 5.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="dotmac_core.cache"):
        for _ in range(10):
            breaker.failure(ConnectionError("down"))
            breaker.success()  # a partly working backend: still one outage
        clock.now += 4
        breaker.success()
        clock.now += 5
        breaker.success()  # healthy for reset_after seconds: the outage is over
        breaker.failure(ConnectionError("again"))
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == ["WARNING", "INFO", "WARNING"]
    assert "ConnectionError: down" in levels[0][1]
    assert "answers again" in levels[1][1]
