"""The error hierarchy and the driver-independent parts of translation."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy.exc as sa_exc

from dotmac_core import (
    AlreadyExistsError,
    AuthorizationError,
    ConfigurationError,
    DatabaseConnectionError,
    DatabaseError,
    DotMacError,
    IntegrityConstraintError,
    MissingDependencyError,
    NotFoundError,
    OperationTimeoutError,
    RateLimitExceededError,
    ServiceError,
    TenantError,
    TransactionConflictError,
    ValidationError,
    translate_errors,
)
from dotmac_core.exceptions import translate_error


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ValidationError, ValueError),
        (NotFoundError, LookupError),
        (AuthorizationError, PermissionError),
        (OperationTimeoutError, TimeoutError),
        (MissingDependencyError, ImportError),
    ],
)
def test_subclasses_match_builtin_meaning(
    cls: type[DotMacError], builtin: type[Exception]
) -> None:
    """Errors subclass the builtin whose meaning they share."""
    assert issubclass(cls, DotMacError)
    assert issubclass(cls, builtin)


def test_tree_shape() -> None:
    """Database errors, timeouts and configuration errors sit where documented."""
    assert issubclass(AlreadyExistsError, IntegrityConstraintError)
    assert issubclass(IntegrityConstraintError, DatabaseError)
    assert issubclass(TransactionConflictError, DatabaseError)
    assert issubclass(DatabaseConnectionError, DatabaseError)
    assert issubclass(OperationTimeoutError, ServiceError)
    assert issubclass(ConfigurationError, ValidationError)


def test_to_dict_and_status() -> None:
    """`to_dict()` gives code, message and details; each class has a status."""
    exc = ValidationError("email is invalid", field="email")
    assert exc.to_dict() == {
        "error": "validation_error",
        "message": "email is invalid",
        "details": {"field": "email"},
    }
    assert exc.http_status == 422
    assert NotFoundError("x", model="User").details == {"model": "User"}
    assert NotFoundError().http_status == 404
    assert AlreadyExistsError().http_status == 409
    assert TenantError().http_status == 403
    assert RateLimitExceededError(retry_after=2.5).to_dict()["details"] == {
        "retry_after": 2.5
    }
    assert DotMacError("m", code="custom").code == "custom"
    assert (
        repr(TenantError("no tenant"))
        == "TenantError('no tenant', code='tenant_error')"
    )


def test_transient_flags() -> None:
    """Retryable errors say so; the rest do not."""
    assert TransactionConflictError().transient
    assert DatabaseConnectionError().transient
    assert OperationTimeoutError().transient
    assert not DatabaseError().transient
    assert DatabaseError(transient=True).transient
    assert not AlreadyExistsError().transient
    assert not ValidationError().transient


def test_missing_dependency_names_the_extra() -> None:
    """The message says which extra to install."""
    exc = MissingDependencyError("asyncpg", "postgres")
    assert "dotmac-core[postgres]" in str(exc)
    assert exc.extra == "postgres"


def test_dotmac_errors_pass_through() -> None:
    """A DotMacError raised in the block leaves it unchanged."""
    original = NotFoundError("gone")
    with pytest.raises(NotFoundError) as info, translate_errors():
        raise original
    assert info.value is original


def test_unrelated_errors_pass_through() -> None:
    """Errors that are not driver errors are not translated."""
    with pytest.raises(KeyError), translate_errors():
        raise KeyError("k")
    with pytest.raises(FileNotFoundError), translate_errors():
        raise FileNotFoundError("f")


def test_message_fallback_for_unique_violation() -> None:
    """Without SQLSTATE or result code, SQLite's message identifies a duplicate."""
    orig = Exception("UNIQUE constraint failed: user_profile.email")
    wrapped = sa_exc.IntegrityError("INSERT ...", {}, orig)
    with pytest.raises(AlreadyExistsError) as info, translate_errors():
        raise wrapped
    assert info.value.constraint == "user_profile.email"
    assert info.value.__cause__ is wrapped


def test_message_fallback_other_integrity() -> None:
    """An integrity error without a recognisable message is a constraint error."""
    wrapped = sa_exc.IntegrityError("INSERT ...", {}, Exception("CHECK failed"))
    translated = translate_error(wrapped)
    assert type(translated) is IntegrityConstraintError


def test_sqlalchemy_errors_without_driver() -> None:
    """SQLAlchemy-level errors become DatabaseError; bad bind values ValidationError."""
    assert type(translate_error(sa_exc.InvalidRequestError("x"))) is DatabaseError
    bad_value = sa_exc.StatementError("bind", "SELECT", {}, ValueError("naive"))
    assert isinstance(translate_error(bad_value), ValidationError)
    assert isinstance(translate_error(sa_exc.TimeoutError()), OperationTimeoutError)
    assert isinstance(translate_error(TimeoutError()), OperationTimeoutError)
    assert type(translate_error(sqlite3.ProgrammingError("closed"))) is DatabaseError
    assert isinstance(
        translate_error(ConnectionRefusedError(111, "refused")),
        DatabaseConnectionError,
    )
