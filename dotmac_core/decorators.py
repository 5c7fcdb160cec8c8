"""Wrappers for calls to databases and other services: errors, retries, deadlines.

- `standard_exception_handler`: every failure leaves as a `DotMacError`, logged
  once, with the tenant and user.
- `retry_on_failure`: runs the call again on transient errors, with jittered
  exponential backoff, bounded in attempts and in time.
- `timeout`: a deadline per call (anyio `fail_after`) that raises
  `OperationTimeoutError`.

Each keeps the wrapped signature for type checkers, works on functions and
methods, and stacks in any order. The usual order, outermost first::

    @standard_exception_handler        # one error type out, logged once
    @retry_on_failure(max_retries=3)   # retries what is transient
    @timeout(seconds=30)               # bounds each attempt

A `timeout` outside `retry_on_failure` bounds the whole call instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar, overload

import anyio
import anyio.lowlevel

from .exceptions import (
    ConfigurationError,
    DotMacError,
    OperationTimeoutError,
    RateLimitExceededError,
    ServiceError,
    translate_error,
)
from .tenancy import get_tenant_context

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["is_transient", "retry_on_failure", "standard_exception_handler", "timeout"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("dotmac_core.decorators")

#: What `retry_on_failure(exceptions=...)` accepts: classes, or a predicate.
RetryOn: TypeAlias = (
    type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
)


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or type(func).__qualname__


def _is_async(func: Callable[..., Any]) -> bool:
    """Whether calling `func` returns a coroutine (functions and callable objects)."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - async __call__ of an object
    )


def _reject_generators(func: Callable[..., Any], decorator: str) -> None:
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        msg = f"{decorator} cannot wrap the generator function {_name(func)}"
        raise TypeError(msg)


def _require_async(func: Callable[..., Any], decorator: str) -> None:
    if not _is_async(func):
        msg = f"{decorator} wraps async callables; {_name(func)} is not one"
        raise TypeError(msg)


# --- standard_exception_handler ------------------------------------------------

#: Errors already logged by a handler, so stacked or nested handlers log once.
_LOGGED: weakref.WeakSet[DotMacError] = weakref.WeakSet()


#: Packages whose errors `translate_error` knows: they say what failed.
_DRIVER_PACKAGES = frozenset({"aiosqlite", "asyncpg", "redis", "sqlalchemy", "sqlite3"})


def _translate(exc: Exception, operation: str) -> DotMacError:
    if isinstance(exc, DotMacError):
        return exc
    if type(exc).__module__.partition(".")[0] in _DRIVER_PACKAGES:
        translated = translate_error(exc)
        if isinstance(translated, DotMacError):
            return translated
    elif isinstance(exc, TimeoutError):
        # Any other timeout or connection error says nothing about which
        # dependency failed (the data layer translates its own): name the
        # operation rather than guess.
        return OperationTimeoutError(f"{operation} timed out ({type(exc).__name__})")
    error = ServiceError(f"unexpected {type(exc).__name__} in {operation}")
    error.transient = isinstance(exc, ConnectionError)
    return error


def _handled(exc: Exception, operation: str) -> DotMacError:
    """Return the `DotMacError` to raise for `exc`, logging it unless done already."""
    error = _translate(exc, operation)
    if error is not exc:
        # Chained before logging, so the logged traceback shows the original.
        error.__cause__ = exc
    if error not in _LOGGED:
        _LOGGED.add(error)
        _log_error(error, operation)
    return error


def _log_error(error: DotMacError, operation: str) -> None:
    # Never the call's arguments: they are where secrets and personal data live.
    context = get_tenant_context()
    tenant = None if context is None else context.tenant_id
    user = None if context is None else context.user_id
    server_side = error.http_status >= 500
    logger.log(
        logging.ERROR if server_side else logging.INFO,
        "%s failed: %s [%s] %s (tenant=%s, user=%s)",
        operation,
        type(error).__name__,
        error.code,
        error.message,
        tenant,
        user,
        exc_info=error if server_side else None,
        extra={
            "operation": operation,
            "error_code": error.code,
            "tenant_id": tenant,
            "user_id": user,
        },
    )


@overload
def standard_exception_handler(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def standard_exception_handler(func: Callable[P, R]) -> Callable[P, R]: ...
def standard_exception_handler(func: Callable[P, Any]) -> Callable[P, Any]:
    """Make every failure of `func` a logged `DotMacError`; sync or async.

    A `DotMacError` passes through untouched. Driver errors (SQLAlchemy,
    SQLite, redis-py) become the matching `DotMacError` (`translate_errors`).
    Any other `Exception` becomes a `ServiceError`: a `TimeoutError` an
    `OperationTimeoutError`, a `ConnectionError` a transient `ServiceError`
    (neither says which dependency failed, so the message names the
    operation). Either way the original is the `__cause__`.

    Each error is logged once, however many handlers it crosses: server-side
    errors (`http_status` >= 500) at ERROR with the traceback, the others at
    INFO. The record carries the operation, the error code, and the tenant and
    user from the tenant context; never the call's arguments. Cancellation,
    `KeyboardInterrupt`, `SystemExit` and `GeneratorExit` are not `Exception`s
    and pass through unchanged.

    Raises:
        TypeError: `func` is a generator function (its errors surface while
            iterating, outside the call this decorator wraps).
    """
    _reject_generators(func, "standard_exception_handler")
    operation = _name(func)

    if _is_async(func):

        @functools.wraps(func)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                error = _handled(exc, operation)
                if error is exc:
                    raise
                raise error from exc

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            error = _handled(exc, operation)
            if error is exc:
                raise
            raise error from exc

    return wrapper


# --- retry_on_failure ----------------------------------------------------------


@dataclass(slots=True)
class _RetryMode:
    """Process-wide switches that `dotmac_core.testing` flips."""

    enabled: bool = True
    #: When a list: delays are appended here instead of slept.
    recorded: list[float] | None = None


_RETRY_MODE = _RetryMode()


def is_transient(exc: Exception) -> bool:
    """Return whether waiting and trying again may help (the default retry test).

    True for `DotMacError`s whose `.transient` is set (lost connections,
    serialization failures and deadlocks, timeouts) and for
    `RateLimitExceededError`; for driver errors that translate to those; and for
    the builtin `TimeoutError` and `ConnectionError`. False for everything else,
    `ValidationError`, `NotFoundError`, `AuthorizationError` and
    `AlreadyExistsError` among them.
    """
    error = translate_error(exc)
    if isinstance(error, DotMacError):
        return error.transient or isinstance(error, RateLimitExceededError)
    return isinstance(exc, (TimeoutError, ConnectionError))


def _retry_after(exc: Exception) -> float | None:
    """The wait the error asks for (`.retry_after`, seconds), if it names one."""
    value = getattr(exc, "retry_after", None)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    return None


def _as_predicate(exceptions: RetryOn | None) -> Callable[[Exception], bool]:
    if exceptions is None:
        return is_transient
    if isinstance(exceptions, (type, tuple)):
        classes = exceptions

        def is_listed(exc: Exception) -> bool:
            return isinstance(exc, classes)

        return is_listed
    return exceptions


@dataclass(frozen=True, slots=True)
class _RetryPolicy:
    """When to try again and how long to wait first."""

    max_retries: int
    initial_delay: float
    backoff_factor: float
    max_delay: float
    jitter: bool
    max_time: float | None
    should_retry: Callable[[Exception], bool]

    def delay(
        self, exc: Exception, failures: int, elapsed: float, time_left: float
    ) -> float | None:
        """Return the wait before the next attempt, or `None` to give up.

        Args:
            exc: The error the last attempt raised.
            failures: Attempts that failed so far (1 after the first).
            elapsed: Seconds since the first attempt started.
            time_left: Seconds until an enclosing deadline (`inf` if none).
        """
        if (
            not _RETRY_MODE.enabled
            or failures > self.max_retries
            or not self.should_retry(exc)
        ):
            return None
        try:
            backoff = self.initial_delay * self.backoff_factor ** (failures - 1)
        except OverflowError:
            backoff = self.max_delay
        wait = min(backoff, self.max_delay)
        if self.jitter:
            # Full jitter: callers that failed together do not retry together.
            wait = random.uniform(0.0, wait)  # noqa: S311 - spreading load, not security
        hint = _retry_after(exc)
        if hint is not None:
            wait = max(wait, hint)
        if self.max_time is not None and elapsed + wait > self.max_time:
            return None
        # Sleeping past an enclosing deadline would only turn this error into a
        # timeout: give the caller the real error now.
        if wait >= time_left:
            return None
        return wait


class _Attempts:
    """One call's bookkeeping: failures so far and the time they took."""

    __slots__ = ("_failures", "_operation", "_policy", "_started", "_virtual")

    def __init__(self, policy: _RetryPolicy, operation: str, now: float) -> None:
        self._policy = policy
        self._operation = operation
        self._started = now
        self._failures = 0
        # Seconds recorded instead of slept (testing): they count as elapsed.
        self._virtual = 0.0

    def next_delay(
        self, exc: Exception, now: float, deadline: float = math.inf
    ) -> float | None:
        """Count the failure; return the wait before retrying, or `None`."""
        self._failures += 1
        now += self._virtual
        wait = self._policy.delay(
            exc, self._failures, now - self._started, deadline - now
        )
        if wait is not None:
            logger.warning(
                "%s raised %s; retry %d of %d in %.3f s",
                self._operation,
                type(exc).__name__,
                self._failures,
                self._policy.max_retries,
                wait,
                extra={"operation": self._operation, "retry": self._failures},
            )
        return wait

    def record(self, wait: float) -> bool:
        """Record `wait` instead of sleeping, when testing asks; say whether it did."""
        recorded = _RETRY_MODE.recorded
        if recorded is None:
            return False
        recorded.append(wait)
        self._virtual += wait
        return True


class _RetryDecorator:
    """The decorator `retry_on_failure(...)` returns; wraps sync and async callables."""

    __slots__ = ("_policy",)

    def __init__(self, policy: _RetryPolicy) -> None:
        self._policy = policy

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """Wrap `func` so transient failures run it again."""
        _reject_generators(func, "retry_on_failure")
        policy = self._policy
        operation = _name(func)

        if _is_async(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                attempts = _Attempts(policy, operation, anyio.current_time())
                while True:
                    try:
                        return await func(*args, **kwargs)
                    except Exception as exc:
                        wait = attempts.next_delay(
                            exc,
                            anyio.current_time(),
                            anyio.current_effective_deadline(),
                        )
                        if wait is None:
                            raise
                    if attempts.record(wait):
                        await anyio.lowlevel.checkpoint()
                    else:
                        await anyio.sleep(wait)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            attempts = _Attempts(policy, operation, time.monotonic())
            while True:
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    wait = attempts.next_delay(exc, time.monotonic())
                    if wait is None:
                        raise
                if not attempts.record(wait):
                    time.sleep(wait)

        return wrapper


def _check(condition: bool, field: str, requirement: str) -> None:
    if not condition:
        msg = f"{field} must be {requirement}"
        raise ConfigurationError(msg, field=field)


def retry_on_failure(
    max_retries: int = 3,
    backoff_factor: float = 2.0,
    *,
    exceptions: RetryOn | None = None,
    initial_delay: float = 0.1,
    max_delay: float = 5.0,
    max_time: float | None = 45.0,
    jitter: bool = True,
) -> _RetryDecorator:
    """Run the call again when it fails with a transient error; sync or async.

    The call runs at most `1 + max_retries` times. Before retry `n` it waits
    `initial_delay * backoff_factor ** (n - 1)` seconds, capped at `max_delay`;
    with `jitter`, a random time between 0 and that ("full jitter"). An error
    with a `retry_after` (seconds, like `RateLimitExceededError`) waits at least
    that long. No retry starts whose wait would end more than `max_time`
    seconds after the first attempt began, or after an enclosing deadline (a
    `timeout` around this decorator): the last error is raised at once instead.
    A running attempt is never interrupted; put `timeout` inside to bound each
    attempt, outside to bound the whole.

    Only re-runnable work belongs here: an attempt that failed after it wrote
    something (a timeout after the server committed, say) runs again.

    Args:
        max_retries: Retries after the first attempt; 0 disables retrying.
        backoff_factor: Growth of the wait from one retry to the next (>= 1).
        exceptions: What to retry: exception classes, or a predicate taking the
            error. Default: `is_transient` (connection losses, timeouts,
            serialization failures, rate limits; never `ValidationError`,
            `NotFoundError`, `AuthorizationError`, `AlreadyExistsError`). Classes
            match subclasses too: `ValidationError` is a `ValueError`.
        initial_delay: Wait before the first retry, in seconds.
        max_delay: Longest wait computed from the backoff, in seconds.
        max_time: Time budget in seconds for starting retries; `None`: none.
        jitter: Randomise each wait (recommended; off gives exact waits).

    Raises:
        ConfigurationError: an argument is out of range.
    """
    _check(
        isinstance(max_retries, int) and max_retries >= 0,
        "max_retries",
        "an int >= 0",
    )
    _check(backoff_factor >= 1, "backoff_factor", ">= 1")
    _check(0 <= initial_delay < math.inf, "initial_delay", "finite and >= 0")
    _check(0 <= max_delay < math.inf, "max_delay", "finite and >= 0")
    _check(max_time is None or max_time > 0, "max_time", "> 0 or None")
    return _RetryDecorator(
        _RetryPolicy(
            max_retries=max_retries,
            initial_delay=initial_delay,
            backoff_factor=backoff_factor,
            max_delay=max_delay,
            jitter=jitter,
            max_time=max_time,
            should_retry=_as_predicate(exceptions),
        )
    )


# --- timeout --------------------------------------------------------------------


def timeout(
    seconds: float,
) -> Callable[
    [Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]
]:
    """Fail an async call that takes longer than `seconds` with `OperationTimeoutError`.

    The call runs in an anyio `fail_after` scope: at the deadline it is
    cancelled (its cleanup runs), and `OperationTimeoutError` is raised from the
    scope's `TimeoutError`. It is a `ServiceError` and a builtin `TimeoutError`,
    and transient, so `retry_on_failure` outside retries it. A `TimeoutError`
    the call raises itself, and a cancellation from outside, pass through
    unchanged.

    Raises:
        ConfigurationError: `seconds` is not > 0.
        TypeError: the decorated callable is not async (sync code cannot be
            interrupted).
    """
    _check(seconds > 0, "seconds", "> 0")

    def decorate(
        func: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        _require_async(func, "timeout")
        operation = _name(func)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                with anyio.fail_after(seconds) as scope:
                    result = await func(*args, **kwargs)
            except TimeoutError as exc:
                if not scope.cancelled_caught:
                    raise  # the call's own TimeoutError, not our deadline
                msg = f"{operation} timed out after {seconds:g} s"
                raise OperationTimeoutError(msg, details={"timeout": seconds}) from exc
            return result

        return wrapper

    return decorate
