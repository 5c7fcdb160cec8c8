"""standard_exception_handler, retry_on_failure and timeout, alone and stacked."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from dotmac_core import (
    AlreadyExistsError,
    AuthorizationError,
    ConfigurationError,
    NotFoundError,
    OperationTimeoutError,
    RateLimitExceededError,
    ServiceError,
    TransactionConflictError,
    ValidationError,
    tenant_scope,
)
from dotmac_core import testing as dm_testing
from dotmac_core.decorators import (
    is_transient,
    retry_on_failure,
    standard_exception_handler,
    timeout,
)


class Flaky:
    """Fails with the given errors, in order, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        """Fail with the next error, or answer "ok" when none is left."""
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def delays() -> Iterator[list[float]]:
    """Retries record their waits instead of sleeping."""
    with dm_testing.record_retry_delays() as recorded:
        yield recorded


# --- the handbook's stacked example ---------------------------------------------


class ExternalService:
    """Stands in for a remote API: fails with the given errors, then answers."""

    def __init__(self, *errors: BaseException) -> None:
        self.flaky = Flaky(*errors)

    async def call(self) -> str:
        """Answer after a checkpoint, failing as planned."""
        await anyio.lowlevel.checkpoint()
        return self.flaky()


class ApiClient:
    """The handbook's example, as a method."""

    def __init__(self, external_service: ExternalService) -> None:
        self.external_service = external_service

    @standard_exception_handler
    @retry_on_failure(max_retries=3, backoff_factor=2.0)
    @timeout(seconds=30)
    async def api_call(self) -> str:
        """Automatic exception logging, retry logic, and timeout protection."""
        return await self.external_service.call()


async def test_handbook_example_retries_transient_errors(delays: list[float]) -> None:
    """The stacked example retries two connection errors and returns the answer."""
    service = ExternalService(ConnectionResetError(), TimeoutError())
    assert await ApiClient(service).api_call() == "ok"
    assert service.flaky.calls == 3
    assert len(delays) == 2


async def test_handbook_example_wraps_unknown_errors(
    delays: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A non-transient unknown error is not retried and leaves as a ServiceError."""
    service = ExternalService(KeyError("boom"))
    with pytest.raises(ServiceError) as caught:
        await ApiClient(service).api_call()
    assert isinstance(caught.value.__cause__, KeyError)
    assert service.flaky.calls == 1
    assert delays == []
    assert "ApiClient.api_call failed" in caplog.text


async def test_handbook_example_gives_up_after_max_retries(
    delays: list[float],
) -> None:
    """Four transient failures exhaust `max_retries=3`; the last error is raised."""
    errors = [ConnectionRefusedError(str(i)) for i in range(4)]
    service = ExternalService(*errors)
    with pytest.raises(ServiceError) as caught:
        await ApiClient(service).api_call()
    assert caught.value.__cause__ is errors[-1]
    assert service.flaky.calls == 4
    assert len(delays) == 3


# --- standard_exception_handler ------------------------------------------------


def test_dotmac_errors_pass_through_untouched() -> None:
    """A DotMacError leaves as the same object, with no new cause."""
    error = NotFoundError("no such user", model="User")

    @standard_exception_handler
    def find() -> None:
        raise error

    with pytest.raises(NotFoundError) as caught:
        find()
    assert caught.value is error
    assert caught.value.__cause__ is None


async def test_unknown_errors_become_service_errors() -> None:
    """Any other Exception becomes ServiceError, with the original as cause."""
    original = ZeroDivisionError("x")

    @standard_exception_handler
    async def divide() -> None:
        raise original

    with pytest.raises(ServiceError) as caught:
        await divide()
    assert caught.value.__cause__ is original
    assert "ZeroDivisionError" in caught.value.message


def test_driver_errors_are_translated() -> None:
    """Driver errors get their DotMacError from translate_error, chained."""
    import sqlalchemy.exc as sa_exc

    class Orig(Exception):
        sqlstate = "40001"

    driver_error = sa_exc.OperationalError("UPDATE t", {}, Orig())

    @standard_exception_handler
    def update() -> None:
        raise driver_error

    with pytest.raises(TransactionConflictError) as caught:
        update()
    assert caught.value.__cause__ is driver_error


@pytest.mark.parametrize(
    "control",
    [asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit],
)
async def test_control_flow_is_never_swallowed(
    control: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """Cancellation and interpreter exits pass through unchanged and unlogged."""

    @standard_exception_handler
    async def run() -> None:
        raise control

    @standard_exception_handler
    def run_sync() -> None:
        raise control

    with pytest.raises(control):
        await run()
    with pytest.raises(control):
        run_sync()
    assert caplog.records == []


def test_logs_once_with_tenant_and_user(caplog: pytest.LogCaptureFixture) -> None:
    """One ERROR record carries the operation, code, tenant and user."""
    caplog.set_level(logging.INFO, logger="dotmac_core.decorators")

    @standard_exception_handler
    def charge() -> None:
        raise RuntimeError

    with tenant_scope("acme", user_id="alice"), pytest.raises(ServiceError):
        charge()
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.tenant_id == "acme"  # type: ignore[attr-defined]
    assert record.user_id == "alice"  # type: ignore[attr-defined]
    assert record.error_code == "service_error"  # type: ignore[attr-defined]
    assert "charge" in record.getMessage()
    assert "tenant=acme, user=alice" in record.getMessage()
    assert record.exc_info is not None


def test_client_errors_log_at_info_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 4xx error (NotFoundError) is an expected outcome: INFO, no traceback."""
    caplog.set_level(logging.INFO, logger="dotmac_core.decorators")

    @standard_exception_handler
    def find() -> None:
        raise NotFoundError("no such order")

    with pytest.raises(NotFoundError):
        find()
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    assert record.tenant_id is None  # type: ignore[attr-defined]


def test_never_logs_the_arguments(caplog: pytest.LogCaptureFixture) -> None:
    """The call's arguments (where secrets live) appear nowhere in the log."""
    secret = "hunter2-" + "x" * 8

    @standard_exception_handler
    def login(password: str) -> None:
        raise PermissionError

    with pytest.raises(ServiceError):
        login(password=secret)
    assert caplog.records
    assert secret not in caplog.text


async def test_stacked_and_nested_handlers_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error crossing stacked and nested handlers is logged exactly once."""

    @standard_exception_handler
    async def inner() -> None:
        raise ValueError

    @standard_exception_handler
    @standard_exception_handler
    async def outer() -> None:
        await inner()

    with pytest.raises(ServiceError) as caught:
        await outer()
    assert isinstance(caught.value.__cause__, ValueError)
    assert len(caplog.records) == 1


async def test_each_distinct_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Two failing calls are two errors, and two records."""

    @standard_exception_handler
    async def fail() -> None:
        raise ValueError

    for _ in range(2):
        with pytest.raises(ServiceError):
            await fail()
    assert len(caplog.records) == 2


async def test_async_callable_objects_are_awaited() -> None:
    """An object with an async __call__ is wrapped as async, so errors are caught."""

    class Endpoint:
        async def __call__(self) -> None:
            raise ValueError

    wrapped = standard_exception_handler(Endpoint())
    assert inspect.iscoroutinefunction(wrapped)
    with pytest.raises(ServiceError):
        await wrapped()


def test_generators_are_refused() -> None:
    """Generator functions raise their errors while iterating: refused up front."""

    def numbers() -> Iterator[int]:
        yield 1

    async def stream() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        standard_exception_handler(numbers)
    with pytest.raises(TypeError, match="generator"):
        retry_on_failure()(stream)


def test_signature_and_metadata_are_kept() -> None:
    """Each decorator keeps the wrapped name, docstring and signature."""

    async def fetch(user_id: int, *, fresh: bool = False) -> str:
        """Fetch a user."""
        return str(user_id)

    for decorate in (
        standard_exception_handler,
        retry_on_failure(),
        timeout(1),
    ):
        wrapped: Any = decorate(fetch)
        assert wrapped.__name__ == "fetch"
        assert wrapped.__doc__ == "Fetch a user."
        assert inspect.signature(wrapped) == inspect.signature(fetch)
        assert inspect.iscoroutinefunction(wrapped)


# --- retry_on_failure ----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ValidationError("bad email", field="email"),
        NotFoundError("gone"),
        AuthorizationError("no"),
        AlreadyExistsError("dup"),
        ValueError("plain"),
        KeyError("k"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_never_retried(
    error: Exception, delays: list[float]
) -> None:
    """ValidationError and friends run once and propagate unchanged."""
    flaky = Flaky(error)
    with pytest.raises(type(error)) as caught:
        retry_on_failure(max_retries=5)(flaky)()
    assert caught.value is error
    assert flaky.calls == 1
    assert delays == []


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),
        ConnectionResetError(),
        OperationTimeoutError("slow"),
        TransactionConflictError("40001"),
        RateLimitExceededError("later", retry_after=0.5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_errors_are_retried(error: Exception, delays: list[float]) -> None:
    """Timeouts, lost connections, conflicts and rate limits are retried."""
    assert is_transient(error)
    flaky = Flaky(error)
    assert retry_on_failure()(flaky)() == "ok"
    assert flaky.calls == 2
    assert len(delays) == 1


def test_backoff_is_exponential_and_capped(delays: list[float]) -> None:
    """Without jitter the waits are initial * factor ** n, capped at max_delay."""
    flaky = Flaky(*[TimeoutError()] * 5)
    retry = retry_on_failure(
        max_retries=5, backoff_factor=3.0, initial_delay=0.5, max_delay=6, jitter=False
    )
    assert retry(flaky)() == "ok"
    assert delays == [0.5, 1.5, 4.5, 6, 6]


def test_jitter_stays_within_the_computed_wait(delays: list[float]) -> None:
    """Full jitter waits a random time between 0 and the computed wait."""
    flaky = Flaky(*[TimeoutError()] * 50)
    retry_on_failure(max_retries=50, initial_delay=1, backoff_factor=1.0)(flaky)()
    assert all(0 <= d <= 1 for d in delays)
    assert len(set(delays)) > 1


def test_huge_backoff_factor_does_not_overflow(delays: list[float]) -> None:
    """A backoff that overflows a float waits max_delay instead of crashing."""
    flaky = Flaky(*[TimeoutError()] * 3)
    retry = retry_on_failure(backoff_factor=1e308, max_delay=2, jitter=False)
    assert retry(flaky)() == "ok"
    assert delays == [0.1, 2, 2]


def test_retry_after_is_honoured(delays: list[float]) -> None:
    """An error's retry_after is the least wait, beyond max_delay if need be."""
    flaky = Flaky(RateLimitExceededError("slow down", retry_after=7.5))
    assert retry_on_failure(max_delay=1)(flaky)() == "ok"
    assert delays == [7.5]


def test_retry_after_beyond_the_budget_gives_up(delays: list[float]) -> None:
    """A retry_after that ends past max_time is not waited for: raised at once."""
    error = RateLimitExceededError("slow down", retry_after=60)
    flaky = Flaky(error)
    with pytest.raises(RateLimitExceededError):
        retry_on_failure(max_time=10)(flaky)()
    assert flaky.calls == 1


def test_odd_retry_after_values_are_ignored(delays: list[float]) -> None:
    """Only a finite positive number of seconds counts as a retry_after."""

    class Odd(TimeoutError):
        def __init__(self, retry_after: object) -> None:
            self.retry_after = retry_after

    flaky = Flaky(Odd(True), Odd(float("nan")), Odd(-1), Odd("5"))
    retry = retry_on_failure(max_retries=4, initial_delay=0, jitter=False)
    assert retry(flaky)() == "ok"
    assert delays == [0, 0, 0, 0]


def test_max_time_bounds_the_retries(delays: list[float]) -> None:
    """No retry starts whose wait would end after max_time (recorded waits count)."""
    flaky = Flaky(*[TimeoutError()] * 10)
    retry = retry_on_failure(
        max_retries=10, initial_delay=1, max_delay=100, max_time=5, jitter=False
    )
    with pytest.raises(TimeoutError):
        retry(flaky)()
    assert delays == [1, 2]
    assert flaky.calls == 3


def test_exceptions_argument_takes_classes_or_a_predicate(
    delays: list[float],
) -> None:
    """`exceptions=` replaces the default test: a class, a tuple, or a predicate."""
    assert retry_on_failure(exceptions=KeyError)(Flaky(KeyError()))() == "ok"
    assert retry_on_failure(exceptions=(OSError, KeyError))(Flaky(KeyError()))()
    flaky = Flaky(TimeoutError())
    with pytest.raises(TimeoutError):
        retry_on_failure(exceptions=KeyError)(flaky)()
    assert flaky.calls == 1

    def odd_codes(exc: Exception) -> bool:
        return isinstance(exc, LookupError) and len(exc.args) % 2 == 1

    assert retry_on_failure(exceptions=odd_codes)(Flaky(KeyError(1)))() == "ok"


def test_logs_each_retry_without_arguments(
    delays: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry logs a warning with the operation, error class and wait."""
    secret = "s3cr3t-" + "y" * 6

    @retry_on_failure(jitter=False)
    def pay(token: str) -> str:
        return flaky()

    flaky = Flaky(TimeoutError())
    assert pay(secret) == "ok"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "pay raised TimeoutError; retry 1 of 3 in 0.100 s" in record.getMessage()
    assert secret not in caplog.text


async def test_async_retry_sleeps_for_real() -> None:
    """Outside testing mode the wait is slept (briefly here)."""
    calls = 0

    @retry_on_failure(initial_delay=0.01, jitter=False)
    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError
        return calls

    started = time.monotonic()
    assert await fetch() == 3
    assert time.monotonic() - started >= 0.03


def test_sync_retry_sleeps_for_real() -> None:
    """Sync callables are retried too, sleeping between attempts."""
    flaky = Flaky(TimeoutError())
    started = time.monotonic()
    assert retry_on_failure(initial_delay=0.01, jitter=False)(flaky)() == "ok"
    assert time.monotonic() - started >= 0.01


async def test_cancellation_is_not_retried() -> None:
    """CancelledError propagates at once; retry never catches it."""
    calls = 0

    @retry_on_failure()
    async def work() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await work()
    assert calls == 1


def test_retries_can_be_switched_off(delays: list[float]) -> None:
    """`testing.retries_disabled()` and `set_retries_enabled` turn retrying off."""
    with dm_testing.retries_disabled():
        flaky = Flaky(TimeoutError())
        with pytest.raises(TimeoutError):
            retry_on_failure()(flaky)()
        assert flaky.calls == 1
    assert retry_on_failure()(Flaky(TimeoutError()))() == "ok"

    dm_testing.set_retries_enabled(False)
    try:
        with pytest.raises(TimeoutError):
            retry_on_failure()(Flaky(TimeoutError()))()
    finally:
        dm_testing.set_retries_enabled(True)
    assert len(delays) == 1  # only the call made with retries on waited


def test_record_retry_delays_nests() -> None:
    """An inner recorder collects its own waits and restores the outer one."""
    with dm_testing.record_retry_delays() as outer:
        retry_on_failure(jitter=False)(Flaky(TimeoutError()))()
        with dm_testing.record_retry_delays() as inner:
            retry_on_failure(jitter=False)(Flaky(TimeoutError(), TimeoutError()))()
        retry_on_failure(jitter=False)(Flaky(TimeoutError()))()
    assert inner == [0.1, 0.2]
    assert outer == [0.1, 0.1]


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"backoff_factor": 0.5},
        {"initial_delay": -1},
        {"max_delay": float("inf")},
        {"max_time": 0},
    ],
)
def test_bad_retry_arguments_are_refused(arguments: dict[str, Any]) -> None:
    """Out-of-range arguments raise ConfigurationError naming the argument."""
    with pytest.raises(ConfigurationError) as caught:
        retry_on_failure(**arguments)
    assert caught.value.field == next(iter(arguments))


# --- timeout --------------------------------------------------------------------


async def test_timeout_cuts_a_slow_call_short() -> None:
    """timeout(0.2) around a 5 s call raises OperationTimeoutError well within 1 s."""

    @timeout(0.2)
    async def slow() -> None:
        await anyio.sleep(5)

    started = time.monotonic()
    with pytest.raises(OperationTimeoutError) as caught:
        await slow()
    assert time.monotonic() - started < 1
    error = caught.value
    assert isinstance(error, ServiceError)
    assert isinstance(error, TimeoutError)
    assert isinstance(error.__cause__, TimeoutError)
    assert error.details == {"timeout": 0.2}
    assert error.transient
    assert "slow timed out after 0.2 s" in error.message


async def test_timeout_returns_the_result_in_time() -> None:
    """A call that finishes in time returns its value."""

    @timeout(5)
    async def quick(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 2

    assert await quick(21) == 42


async def test_the_calls_own_timeout_error_passes_through() -> None:
    """A TimeoutError the call raises itself is not taken for the deadline."""
    own = TimeoutError("driver timeout")

    @timeout(5)
    async def query() -> None:
        raise own

    with pytest.raises(TimeoutError) as caught:
        await query()
    assert caught.value is own


async def test_outer_cancellation_stays_cancellation() -> None:
    """An enclosing cancel scope's cancellation is not turned into a timeout."""

    @timeout(10)
    async def slow() -> None:
        await anyio.sleep(10)

    with anyio.move_on_after(0.05) as scope:
        await slow()
    assert scope.cancelled_caught


async def test_task_cancel_stays_cancellation() -> None:
    """Asyncio's Task.cancel() reaches the caller as CancelledError."""

    @timeout(10)
    async def slow() -> None:
        await anyio.sleep(10)

    task = asyncio.ensure_future(slow())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_timeout_inside_retry_bounds_each_attempt() -> None:
    """retry(timeout(f)): each attempt has its own deadline, and is retried."""
    calls = 0

    @retry_on_failure(max_retries=2, initial_delay=0, jitter=False)
    @timeout(0.05)
    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            await anyio.sleep(10)
        return calls

    assert await fetch() == 3


async def test_timeout_outside_retry_bounds_the_whole() -> None:
    """timeout(retry(f)): the deadline cuts the retrying short."""
    calls = 0

    @timeout(0.2)
    @retry_on_failure(max_retries=100, initial_delay=0.01, jitter=False)
    async def fetch() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError
        await anyio.sleep(10)

    started = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        await fetch()
    assert time.monotonic() - started < 1
    assert calls == 2


async def test_retry_does_not_sleep_past_an_enclosing_deadline() -> None:
    """A backoff that would outlast the caller's deadline raises the real error now."""
    error = ConnectionResetError("reset")

    @timeout(1)
    @retry_on_failure(initial_delay=5, jitter=False)
    async def fetch() -> None:
        raise error

    started = time.monotonic()
    with pytest.raises(ConnectionResetError) as caught:
        await fetch()
    assert caught.value is error
    assert time.monotonic() - started < 1


def test_timeout_refuses_sync_callables_and_bad_seconds() -> None:
    """Sync code cannot be interrupted; seconds must be positive."""

    def blocking() -> None:
        """Never runs."""

    with pytest.raises(TypeError, match="async"):
        timeout(1)(blocking)  # type: ignore[arg-type]
    for seconds in (0, -1, float("nan")):
        with pytest.raises(ConfigurationError):
            timeout(seconds)
