"""The public namespace: `__all__` is sorted, complete, and documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

import dotmac_core

#: Public names DESIGN.md fixes for the parts built so far (models, database,
#: tenancy, config, guards, exceptions, data access, cache, decorators).
DESIGN_NAMES = {
    "AlreadyExistsError",
    "AuditMixin",
    "AuthenticationError",
    "AuthorizationError",
    "BaseModel",
    "BusinessRuleError",
    "CacheConfig",
    "DBBaseModel",
    "Database",
    "DatabaseConfig",
    "DatabaseError",
    "DotMacError",
    "NotFoundError",
    "OperationTimeoutError",
    "RateLimitExceededError",
    "SecurityConfig",
    "ServiceError",
    "SoftDeleteMixin",
    "TableNamingMixin",
    "TenantBaseModel",
    "TenantContext",
    "TenantError",
    "TenantMixin",
    "TimestampMixin",
    "UUIDMixin",
    "ValidationError",
    "configure_database",
    "get_current_tenant",
    "get_database",
    "get_tenant_context",
    "is_cache_available",
    "is_database_available",
    "is_schemas_available",
    "require_cache",
    "require_current_tenant",
    "require_database",
    "require_schemas",
    "reset_current_tenant",
    "set_current_tenant",
    "tenant_scope",
    "translate_errors",
    # data access
    "AsyncRepository",
    "CursorPage",
    "PaginationParams",
    "PaginationResult",
    "TransactionManager",
    "transactional",
    # cache
    "CacheService",
    "TenantAwareCacheManager",
    "cached",
    "configure_cache",
    "create_cache_service",
    "get_cache",
    # decorators and rate limiting
    "rate_limit",
    "retry_on_failure",
    "standard_exception_handler",
    "timeout",
}

#: Public names beyond DESIGN.md's list that the package has committed to: the
#: integrations (ASGI, row-level security, tracing), the types and helpers
#: they and the data layer expose. Removing one breaks users' imports.
ADDED_NAMES = {
    # settings, errors and guards
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseConnectionError",
    "IntegrityConstraintError",
    "MissingDependencyError",
    "TransactionConflictError",
    "is_fastapi_available",
    "is_transient",
    "require_fastapi",
    # models, types and the data layer
    "AsyncSession",
    "FILTER_OPERATORS",
    "MAX_PAGE_SIZE",
    "NAMING_CONVENTION",
    "PlainModel",
    "UTCDateTime",
    "current_transaction",
    "snake_case",
    # tenancy
    "TenantToken",
    "current_user_id",
    "is_scoping_bypassed",
    # cache
    "BoundCachedFunction",
    "CacheBackend",
    "CacheUnavailableError",
    "CachedFunction",
    "FailOpenCounter",
    "MemoryBackend",
    "RedisBackend",
    "RedisClusterBackend",
    # rate limiting
    "close_rate_limiters",
    "rate_limit_fail_opens",
    # ASGI / FastAPI
    "DEFAULT_EXEMPT_PATHS",
    "PROBLEM_JSON",
    "TenantMiddleware",
    "install_exception_handlers",
    "problem_details",
    "tenant_dependency",
    "tenant_from_header",
    "tenant_from_subdomain",
    # row-level security
    "apply_row_level_security",
    "enable_row_level_security",
    "row_level_security_ddl",
    # tracing
    "instrument",
    "is_instrumented",
    "uninstrument",
}

#: The public names of the other public entry points.
SUBPACKAGE_NAMES = {
    "dotmac_core.testing": {
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
        "record_retry_delays",
        "reset_rate_limits",
        "retries_disabled",
        "set_retries_enabled",
    },
    "dotmac_core.migrations": {
        "TEMPLATE_DIR",
        "context_options",
        "database_config",
        "import_models",
        "process_revision_directives",
        "render_item",
        "target_metadata",
    },
}


def test_all_is_sorted_and_unique() -> None:
    """`__all__` is sorted (ruff's isort order) and has no duplicates."""
    names = dotmac_core.__all__
    assert len(names) == len(set(names))
    constants = [n for n in names if n.isupper()]
    classes = [n for n in names if n[0].isupper() and not n.isupper()]
    functions = [n for n in names if n[0].islower()]
    assert names == sorted(constants) + sorted(classes) + sorted(functions)


def test_design_names_are_exported() -> None:
    """Every public name DESIGN.md lists for the built parts is in `__all__`."""
    assert set(dotmac_core.__all__) >= DESIGN_NAMES


def test_added_names_stay_exported() -> None:
    """The names exported beyond DESIGN.md's list are still in `__all__`."""
    assert set(dotmac_core.__all__) >= ADDED_NAMES
    assert not ADDED_NAMES & DESIGN_NAMES


@pytest.mark.parametrize("module", sorted(SUBPACKAGE_NAMES))
def test_subpackage_names_are_exported_and_documented(module: str) -> None:
    """`dotmac_core.testing` and `.migrations` keep their names, each documented."""
    package = importlib.import_module(module)
    assert set(package.__all__) >= SUBPACKAGE_NAMES[module]
    for name in SUBPACKAGE_NAMES[module]:
        value = getattr(package, name)
        if name.isupper():
            continue  # constants are documented by their `#:` comment
        doc = inspect.getdoc(value)
        assert doc, (module, name)
        assert doc.splitlines()[0].endswith("."), (module, name)


def test_all_matches_public_attributes() -> None:
    """`__all__` lists exactly the public re-exports, and each resolves."""
    public = {
        name
        for name, value in vars(dotmac_core).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(dotmac_core.__all__)


def test_every_name_has_a_one_line_summary() -> None:
    """Each exported name has a docstring whose first line is one sentence."""
    for name in dotmac_core.__all__:
        value = getattr(dotmac_core, name)
        doc = inspect.getdoc(value) if not isinstance(value, dict) else None
        if name.isupper():
            continue  # constants are documented by their `#:` comment and the docs
        assert doc, name
        first = doc.splitlines()[0]
        assert first.endswith("."), (name, first)
        assert len(first) <= 88, (name, first)
