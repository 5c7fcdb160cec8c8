"""The public namespace: `__all__` is sorted, complete, and documented."""

from __future__ import annotations

import inspect

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
