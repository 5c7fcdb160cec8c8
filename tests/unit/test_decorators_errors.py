"""What standard_exception_handler raises for builtin, library and redis-py errors."""

from __future__ import annotations

import sys

import asyncpg.exceptions
import pytest
import redis.exceptions as redis_errors

from dotmac_core import (
    DatabaseConnectionError,
    DatabaseError,
    DotMacError,
    OperationTimeoutError,
    ServiceError,
)
from dotmac_core.decorators import is_transient, standard_exception_handler
from dotmac_core.exceptions import translate_error


class LibraryError(Exception):
    """An error from some library dotmac_core knows nothing about."""


class LibraryConnectError(ConnectionError):
    """An HTTP client's connection error (a builtin ConnectionError subclass)."""


class LibraryTimeout(TimeoutError):
    """An HTTP client's timeout (a builtin TimeoutError subclass)."""


def _raised_by_handler(exc: Exception) -> DotMacError:
    @standard_exception_handler
    def call() -> None:
        raise exc

    with pytest.raises(DotMacError) as caught:
        call()
    assert caught.value.__cause__ is exc
    return caught.value


@pytest.mark.parametrize("exc", [TimeoutError(), LibraryTimeout()])
def test_timeouts_become_operation_timeouts(exc: Exception) -> None:
    """A non-driver TimeoutError becomes OperationTimeoutError naming the operation."""
    error = _raised_by_handler(exc)
    assert type(error) is OperationTimeoutError
    assert "call timed out" in error.message
    assert error.transient


@pytest.mark.parametrize("exc", [ConnectionRefusedError(), LibraryConnectError()])
def test_connection_errors_become_transient_service_errors(exc: Exception) -> None:
    """A non-driver ConnectionError is a transient ServiceError, not a DB error."""
    error = _raised_by_handler(exc)
    assert type(error) is ServiceError
    assert error.transient


@pytest.mark.parametrize("exc", [ValueError("v"), LibraryError("lib")])
def test_other_errors_become_permanent_service_errors(exc: Exception) -> None:
    """Other errors become a permanent ServiceError naming their type."""
    error = _raised_by_handler(exc)
    assert type(error) is ServiceError
    assert not error.transient
    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    ("exc", "expected", "transient"),
    [
        (
            asyncpg.exceptions.InterfaceError("connection is closed"),
            DatabaseConnectionError,
            True,
        ),
        (asyncpg.exceptions.InterfaceError("i"), DatabaseError, False),
    ],
)
def test_bare_asyncpg_client_errors_are_database_errors(
    exc: Exception, expected: type[DotMacError], transient: bool
) -> None:
    """A closed driver connection is a lost connection; other misuse a DatabaseError."""
    error = _raised_by_handler(exc)
    assert type(error) is expected
    assert error.transient is transient
    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    ("exc", "expected", "transient"),
    [
        (redis_errors.TimeoutError("key tenant-42:user"), OperationTimeoutError, True),
        (redis_errors.ConnectionError("key tenant-42:user"), ServiceError, True),
        (redis_errors.BusyLoadingError("key tenant-42:user"), ServiceError, True),
        (redis_errors.ClusterDownError("key tenant-42:user"), ServiceError, True),
        (redis_errors.TryAgainError("key tenant-42:user"), ServiceError, True),
        (redis_errors.ReadOnlyError("key tenant-42:user"), ServiceError, True),
        (redis_errors.SlotNotCoveredError("key tenant-42:user"), ServiceError, True),
        (redis_errors.AuthenticationError("key tenant-42:user"), ServiceError, False),
        (redis_errors.NoPermissionError("key tenant-42:user"), ServiceError, False),
        (redis_errors.ResponseError("key tenant-42:user"), ServiceError, False),
        (redis_errors.RedisClusterException("key tenant-42:user"), ServiceError, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_redis_errors_are_translated(
    exc: Exception, expected: type[DotMacError], transient: bool
) -> None:
    """redis-py errors map to ServiceError / OperationTimeoutError, by kind."""
    translated = translate_error(exc)
    assert type(translated) is expected
    assert isinstance(translated, DotMacError)
    assert translated.transient is transient
    assert is_transient(exc) is transient
    # The redis error's text (which may name keys) is not repeated.
    assert str(exc) not in translated.message
    assert type(_raised_by_handler(exc)) is expected


def test_redis_translation_needs_no_redis_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without redis.exceptions loaded, no error is taken for a redis error."""
    monkeypatch.delitem(sys.modules, "redis.exceptions")
    error = LibraryError()
    assert translate_error(error) is error
