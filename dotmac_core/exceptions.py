"""One error hierarchy for everything dotmac_core raises.

```
DotMacError
├── ValidationError (ValueError)          bad input, named field
│   └── ConfigurationError                bad or missing configuration
├── AuthenticationError                   who you are is unknown
├── AuthorizationError (PermissionError)  you may not do this
├── TenantError                           no tenant, or the wrong one
├── BusinessRuleError                     a domain rule said no
├── NotFoundError (LookupError)           no row matched
├── RateLimitExceededError                too many calls; see .retry_after
├── DatabaseError                         the database failed; .sqlstate, .transient
│   ├── DatabaseConnectionError           connection lost or refused (transient)
│   ├── TransactionConflictError          serialization failure / deadlock (transient)
│   └── IntegrityConstraintError          a constraint refused the write; .constraint
│       └── AlreadyExistsError            unique violation
├── ServiceError                          a dependency failed
│   └── OperationTimeoutError (TimeoutError)
└── MissingDependencyError (ImportError)  an optional extra is not installed
```

Driver errors are turned into this tree in one place, `translate_errors()`:
PostgreSQL errors by SQLSTATE, SQLite errors by extended result code (with the
message as a last resort), never by parsing text when a code exists.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import sys
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy.exc as sa_exc

if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextlib import AbstractContextManager
    from types import TracebackType

__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "AuthorizationError",
    "BusinessRuleError",
    "ConfigurationError",
    "DatabaseConnectionError",
    "DatabaseError",
    "DotMacError",
    "IntegrityConstraintError",
    "MissingDependencyError",
    "NotFoundError",
    "OperationTimeoutError",
    "RateLimitExceededError",
    "ServiceError",
    "TenantError",
    "TransactionConflictError",
    "ValidationError",
    "translate_errors",
]


class DotMacError(Exception):
    """Root of every error dotmac_core raises; carries a code, details and a status.

    Args:
        message: Human-readable description; never contains secrets.
        code: Stable machine-readable code; defaults to the class's `default_code`.
        details: JSON-serialisable context for API responses and logs.
    """

    default_code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    #: Whether running the same operation again may succeed (read by retries).
    transient: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready body: `error` (code), `message`, `details`."""
        return {"error": self.code, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"


class ValidationError(DotMacError, ValueError):
    """Input was rejected; `.field` names the culprit when there is one."""

    default_code = "validation_error"
    http_status = 422

    def __init__(
        self,
        message: str = "",
        *,
        field: str | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = dict(details or {})
        if field is not None:
            merged.setdefault("field", field)
        super().__init__(message, code=code, details=merged)
        self.field = field


class ConfigurationError(ValidationError):
    """Configuration is invalid or missing (bad settings, nothing registered)."""

    default_code = "configuration_error"
    http_status = 500


class AuthenticationError(DotMacError):
    """The caller's identity could not be established."""

    default_code = "authentication_error"
    http_status = 401


class AuthorizationError(DotMacError, PermissionError):
    """The caller is known but may not perform this action."""

    default_code = "authorization_error"
    http_status = 403


class TenantError(DotMacError):
    """No tenant is set where one is required, or a row belongs to another tenant."""

    default_code = "tenant_error"
    http_status = 403


class BusinessRuleError(DotMacError):
    """A domain rule refused the operation (for example, insufficient balance)."""

    default_code = "business_rule_violation"
    http_status = 422


class NotFoundError(DotMacError, LookupError):
    """No row matched; `.model` and `.criteria` say what was asked for."""

    default_code = "not_found"
    http_status = 404

    def __init__(
        self,
        message: str = "",
        *,
        model: str | None = None,
        criteria: Mapping[str, Any] | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = dict(details or {})
        if model is not None:
            merged.setdefault("model", model)
        super().__init__(message, code=code, details=merged)
        self.model = model
        self.criteria: dict[str, Any] = dict(criteria or {})


class RateLimitExceededError(DotMacError):
    """Too many calls; `.retry_after` (seconds) says when to try again."""

    default_code = "rate_limited"
    http_status = 429

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        remaining: int = 0,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = dict(details or {})
        if retry_after is not None:
            merged.setdefault("retry_after", retry_after)
        super().__init__(message, code=code, details=merged)
        self.retry_after = retry_after
        self.remaining = remaining


class DatabaseError(DotMacError):
    """The database failed; `.sqlstate` says how, `.transient` whether to retry."""

    default_code = "database_error"
    http_status = 500

    def __init__(
        self,
        message: str = "",
        *,
        sqlstate: str | None = None,
        transient: bool | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.sqlstate = sqlstate
        if transient is not None:
            self.transient = transient


class DatabaseConnectionError(DatabaseError):
    """The connection to the database was refused, lost or invalidated."""

    default_code = "database_unavailable"
    http_status = 503
    transient = True


class TransactionConflictError(DatabaseError):
    """Serialization failure or deadlock (40001 / 40P01): rerun the transaction."""

    default_code = "transaction_conflict"
    http_status = 409
    transient = True


class IntegrityConstraintError(DatabaseError):
    """A constraint (foreign key, not null, check) refused the write; `.constraint`."""

    default_code = "integrity_error"
    http_status = 409

    def __init__(
        self,
        message: str = "",
        *,
        constraint: str | None = None,
        sqlstate: str | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = dict(details or {})
        if constraint is not None:
            merged.setdefault("constraint", constraint)
        super().__init__(message, sqlstate=sqlstate, code=code, details=merged)
        self.constraint = constraint


class AlreadyExistsError(IntegrityConstraintError):
    """A row with the same unique key already exists."""

    default_code = "already_exists"


class ServiceError(DotMacError):
    """A dependency (another service, the cache, the network) failed."""

    default_code = "service_error"
    http_status = 502


class OperationTimeoutError(ServiceError, TimeoutError):
    """An operation ran out of time: a deadline, a statement timeout or a full pool."""

    default_code = "timeout"
    http_status = 504
    transient = True


class MissingDependencyError(DotMacError, ImportError):
    """An optional part was used without its extra; the message names the extra."""

    default_code = "missing_dependency"

    def __init__(self, package: str, extra: str | None) -> None:
        target = "dotmac-core" if extra is None else f"dotmac-core[{extra}]"
        super().__init__(
            f"{package!r} is not installed; install it with pip install '{target}'",
            details={"package": package, "extra": extra},
        )
        self.package = package
        self.extra = extra


# --- translation of driver errors -------------------------------------------------

# SQLSTATE classes and codes (PostgreSQL appendix A).
_UNIQUE_VIOLATION = "23505"
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})  # query canceled, lock not available
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})

# SQLite extended result codes (https://sqlite.org/rescode.html).
_SQLITE_CONSTRAINT_PRIMARYKEY = 1555
_SQLITE_CONSTRAINT_UNIQUE = 2067
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_UNIQUE_TEXT = re.compile(r"UNIQUE constraint failed: (?P<columns>[\w., ]+)")


def _sqlstate(orig: BaseException | None) -> str | None:
    """Read the SQLSTATE the driver attached (asyncpg and its SQLAlchemy adapter)."""
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def _constraint_name(orig: BaseException | None) -> str | None:
    """Read the violated constraint's name where the driver reports it."""
    for candidate in (orig, getattr(orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str):
            return name
    return None


def _sqlite_code(orig: BaseException | None) -> int | None:
    code = getattr(orig, "sqlite_errorcode", None)
    return code if isinstance(code, int) else None


def _translate_dbapi(exc: sa_exc.DBAPIError) -> DotMacError:
    """Map one SQLAlchemy-wrapped driver error onto the hierarchy."""
    return _translate_driver(
        exc.orig,
        kind=type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
        invalidated=exc.connection_invalidated,
        integrity=isinstance(exc, sa_exc.IntegrityError),
    )


def _translate_driver(
    orig: BaseException | None, *, kind: str, invalidated: bool, integrity: bool
) -> DotMacError:
    """Map a driver error (bare, or the `orig` of SQLAlchemy's wrapper)."""
    state = _sqlstate(orig)
    sqlite_code = _sqlite_code(orig)
    if invalidated or (state is not None and state.startswith("08")):
        return DatabaseConnectionError(
            f"database connection lost ({kind})", sqlstate=state
        )
    if state in _CONNECTION_SQLSTATES:
        return DatabaseConnectionError(
            f"database unavailable ({kind}, SQLSTATE {state})", sqlstate=state
        )
    if state in _RETRYABLE_SQLSTATES:
        return TransactionConflictError(
            f"transaction conflict ({kind}, SQLSTATE {state}); rerun the transaction",
            sqlstate=state,
        )
    if state in _TIMEOUT_SQLSTATES:
        return OperationTimeoutError(
            f"database statement timed out ({kind}, SQLSTATE {state})",
            details={"sqlstate": state},
        )
    if integrity or (state or "").startswith("23"):
        return _translate_integrity(orig, state, sqlite_code)
    if sqlite_code is not None and sqlite_code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return OperationTimeoutError(
            "SQLite database is locked (busy timeout expired)",
            details={"sqlite_errorcode": sqlite_code},
        )
    return DatabaseError(f"database error ({kind})", sqlstate=state)


def _translate_integrity(
    orig: BaseException | None, state: str | None, sqlite_code: int | None
) -> IntegrityConstraintError:
    constraint = _constraint_name(orig)
    is_unique = state == _UNIQUE_VIOLATION or sqlite_code in (
        _SQLITE_CONSTRAINT_UNIQUE,
        _SQLITE_CONSTRAINT_PRIMARYKEY,
    )
    if state is None and sqlite_code is None:
        # Fallback for drivers that report neither code: SQLite's stable message.
        match = _SQLITE_UNIQUE_TEXT.search(str(orig))
        is_unique = match is not None
        if match is not None:
            constraint = match.group("columns")
    elif sqlite_code is not None and constraint is None:
        match = _SQLITE_UNIQUE_TEXT.search(str(orig))
        constraint = match.group("columns") if match is not None else None
    if is_unique:
        return AlreadyExistsError(
            "a row with the same unique key already exists",
            constraint=constraint,
            sqlstate=state,
        )
    return IntegrityConstraintError(
        "the write violates a database constraint",
        constraint=constraint,
        sqlstate=state,
    )


def _service_error(message: str, *, transient: bool) -> ServiceError:
    error = ServiceError(message)
    error.transient = transient
    return error


#: redis-py error classes by meaning. Looked up by name, so a class that an
#: older redis-py lacks (`AuthorizationError` is recent) is simply skipped.
_REDIS_REFUSED = ("AuthenticationError", "AuthorizationError", "NoPermissionError")
_REDIS_UNAVAILABLE = (
    "ConnectionError",  # refused, reset, still loading, pool exhausted
    "ClusterDownError",  # failover in progress
    "TryAgainError",  # slot being migrated
    "ReadOnlyError",  # wrote to a master that was just demoted
    "SlotNotCoveredError",  # slot map not yet updated after a failover
)


def _redis_classes(module: Any, names: tuple[str, ...]) -> tuple[type, ...]:
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


def _translate_redis(exc: BaseException) -> DotMacError | None:
    """Map a redis-py error; `None` when `exc` is not one.

    redis is an optional extra: if `redis.exceptions` was never imported, no
    redis error can exist, so nothing is imported here. `RedisClusterException`
    is checked on its own because it is not a `RedisError` (redis-py 7 and 8).
    """
    errors = sys.modules.get("redis.exceptions")
    if errors is None or not isinstance(
        exc, (errors.RedisError, errors.RedisClusterException)
    ):
        return None
    kind = type(exc).__name__
    if isinstance(exc, errors.TimeoutError):
        return OperationTimeoutError(f"Redis did not answer in time ({kind})")
    if isinstance(exc, _redis_classes(errors, _REDIS_REFUSED)):
        return _service_error(f"Redis refused the client ({kind})", transient=False)
    if isinstance(exc, _redis_classes(errors, _REDIS_UNAVAILABLE)):
        return _service_error(f"Redis is unavailable ({kind})", transient=True)
    return _service_error(f"Redis error ({kind})", transient=False)


def translate_error(exc: BaseException) -> BaseException:
    """Return the dotmac_core error for a driver error, or `exc` itself if unknown."""
    if isinstance(exc, DotMacError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):
        return OperationTimeoutError(
            "timed out waiting for a database connection from the pool"
        )
    if isinstance(exc, sa_exc.DBAPIError):
        return _translate_dbapi(exc)
    if isinstance(exc, sa_exc.StatementError) and isinstance(
        exc.orig, (ValueError, TypeError)
    ):
        return ValidationError(f"value rejected by the column type: {exc.orig}")
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return DatabaseError(f"database error ({type(exc).__name__})")
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(exc, asyncpg.PostgresError):
        # A bare asyncpg error: raised by calls made on the driver connection
        # itself (COPY), outside SQLAlchemy's wrapping.
        return _translate_driver(
            exc, kind=type(exc).__name__, invalidated=False, integrity=False
        )
    if asyncpg is not None and isinstance(
        exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)
    ):
        # A bare client-side error of a driver connection. Closed under it
        # (the server went away: SQLAlchemy's dialect reads the same message
        # as a disconnect) or in a state asyncpg cannot go on from, the
        # connection is gone; anything else is a misuse of it.
        kind = type(exc).__name__
        if isinstance(
            exc, asyncpg.InternalClientError
        ) or "connection is closed" in str(exc):
            return DatabaseConnectionError(f"database connection lost ({kind})")
        return DatabaseError(f"database driver error ({kind}: {exc})")
    if (
        asyncpg is not None
        and isinstance(exc.__cause__, asyncpg.PostgresError)
        and type(exc).__module__.startswith("sqlalchemy.")
    ):
        # The error class of SQLAlchemy's asyncpg adapter, raised by an
        # adapter method called directly (the held-back BEGIN): the asyncpg
        # error it wraps says what happened.
        return translate_error(exc.__cause__)
    redis_error = _translate_redis(exc)
    if redis_error is not None:
        return redis_error
    if isinstance(exc, TimeoutError):
        # asyncpg's command_timeout raises the builtin, unwrapped by SQLAlchemy.
        return OperationTimeoutError("database command timed out")
    if isinstance(exc, sqlite3.Error):
        # A bare sqlite3 error: raised by calls made on the driver connection.
        return _translate_driver(
            exc,
            kind=type(exc).__name__,
            invalidated=False,
            integrity=isinstance(exc, sqlite3.IntegrityError),
        )
    # Connect failures: refused/reset, name resolution, or asyncio's combined
    # "Multiple exceptions" OSError. Other OSErrors (files) are not ours.
    if isinstance(exc, (ConnectionError, socket.gaierror)) or type(exc) is OSError:
        return DatabaseConnectionError(
            f"cannot reach the database ({type(exc).__name__})"
        )
    return exc


class _TranslateErrors:
    """The context manager `translate_errors()` returns (stateless, so shared).

    A class rather than a generator: every repository call enters one.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        translated = translate_error(exc)
        if translated is not exc:
            raise translated from exc


_TRANSLATE = _TranslateErrors()


def translate_errors() -> AbstractContextManager[None]:
    """Turn driver errors raised in the block into dotmac_core errors, chained.

    `DotMacError`s pass through untouched; exceptions that are not driver
    errors (including cancellation) propagate unchanged.

    Raises:
        DotMacError: a subclass chosen by SQLSTATE / SQLite result code, with the
            driver error as `__cause__`.
    """
    return _TRANSLATE
