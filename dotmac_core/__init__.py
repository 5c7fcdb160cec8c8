"""dotmac_core: an async data layer on SQLModel and SQLAlchemy 2.

Everything public is importable from here: ``from dotmac_core import DBBaseModel``.
"""

from .asgi import DEFAULT_EXEMPT_PATHS as DEFAULT_EXEMPT_PATHS
from .asgi import PROBLEM_JSON as PROBLEM_JSON
from .asgi import TenantMiddleware as TenantMiddleware
from .asgi import install_exception_handlers as install_exception_handlers
from .asgi import problem_details as problem_details
from .asgi import tenant_dependency as tenant_dependency
from .asgi import tenant_from_header as tenant_from_header
from .asgi import tenant_from_subdomain as tenant_from_subdomain
from .cache import BoundCachedFunction as BoundCachedFunction
from .cache import CacheBackend as CacheBackend
from .cache import CachedFunction as CachedFunction
from .cache import CacheService as CacheService
from .cache import CacheUnavailableError as CacheUnavailableError
from .cache import FailOpenCounter as FailOpenCounter
from .cache import MemoryBackend as MemoryBackend
from .cache import RedisBackend as RedisBackend
from .cache import RedisClusterBackend as RedisClusterBackend
from .cache import TenantAwareCacheManager as TenantAwareCacheManager
from .cache import cached as cached
from .cache import configure_cache as configure_cache
from .cache import create_cache_service as create_cache_service
from .cache import get_cache as get_cache
from .config import CacheConfig as CacheConfig
from .config import DatabaseConfig as DatabaseConfig
from .config import SecurityConfig as SecurityConfig
from .db.database import Database as Database
from .db.database import configure_database as configure_database
from .db.database import get_database as get_database
from .db.filters import FILTER_OPERATORS as FILTER_OPERATORS
from .db.models import NAMING_CONVENTION as NAMING_CONVENTION
from .db.models import AuditMixin as AuditMixin
from .db.models import BaseModel as BaseModel
from .db.models import DBBaseModel as DBBaseModel
from .db.models import PlainModel as PlainModel
from .db.models import SoftDeleteMixin as SoftDeleteMixin
from .db.models import TableNamingMixin as TableNamingMixin
from .db.models import TenantBaseModel as TenantBaseModel
from .db.models import TenantMixin as TenantMixin
from .db.models import TimestampMixin as TimestampMixin
from .db.models import UUIDMixin as UUIDMixin
from .db.models import snake_case as snake_case
from .db.pagination import MAX_PAGE_SIZE as MAX_PAGE_SIZE
from .db.pagination import CursorPage as CursorPage
from .db.pagination import PaginationParams as PaginationParams
from .db.pagination import PaginationResult as PaginationResult
from .db.repository import AsyncRepository as AsyncRepository
from .db.rls import apply_row_level_security as apply_row_level_security
from .db.rls import enable_row_level_security as enable_row_level_security
from .db.rls import row_level_security_ddl as row_level_security_ddl
from .db.session import AsyncSession as AsyncSession
from .db.session import ConcurrentSessionUseError as ConcurrentSessionUseError
from .db.transaction import TransactionManager as TransactionManager
from .db.transaction import current_transaction as current_transaction
from .db.transaction import transactional as transactional
from .decorators import is_transient as is_transient
from .decorators import retry_on_failure as retry_on_failure
from .decorators import standard_exception_handler as standard_exception_handler
from .decorators import timeout as timeout
from .exceptions import AlreadyExistsError as AlreadyExistsError
from .exceptions import AuthenticationError as AuthenticationError
from .exceptions import AuthorizationError as AuthorizationError
from .exceptions import BusinessRuleError as BusinessRuleError
from .exceptions import ConfigurationError as ConfigurationError
from .exceptions import DatabaseConnectionError as DatabaseConnectionError
from .exceptions import DatabaseError as DatabaseError
from .exceptions import DotMacError as DotMacError
from .exceptions import IntegrityConstraintError as IntegrityConstraintError
from .exceptions import MissingDependencyError as MissingDependencyError
from .exceptions import NotFoundError as NotFoundError
from .exceptions import OperationTimeoutError as OperationTimeoutError
from .exceptions import RateLimitExceededError as RateLimitExceededError
from .exceptions import ServiceError as ServiceError
from .exceptions import TenantError as TenantError
from .exceptions import TransactionConflictError as TransactionConflictError
from .exceptions import ValidationError as ValidationError
from .exceptions import translate_errors as translate_errors
from .guards import is_cache_available as is_cache_available
from .guards import is_database_available as is_database_available
from .guards import is_fastapi_available as is_fastapi_available
from .guards import is_schemas_available as is_schemas_available
from .guards import require_cache as require_cache
from .guards import require_database as require_database
from .guards import require_fastapi as require_fastapi
from .guards import require_schemas as require_schemas
from .ratelimit import close_rate_limiters as close_rate_limiters
from .ratelimit import rate_limit as rate_limit
from .ratelimit import rate_limit_fail_opens as rate_limit_fail_opens
from .tenancy import TenantContext as TenantContext
from .tenancy import TenantToken as TenantToken
from .tenancy import current_user_id as current_user_id
from .tenancy import get_current_tenant as get_current_tenant
from .tenancy import get_tenant_context as get_tenant_context
from .tenancy import is_scoping_bypassed as is_scoping_bypassed
from .tenancy import require_current_tenant as require_current_tenant
from .tenancy import reset_current_tenant as reset_current_tenant
from .tenancy import set_current_tenant as set_current_tenant
from .tenancy import tenant_scope as tenant_scope
from .tracing import instrument as instrument
from .tracing import is_instrumented as is_instrumented
from .tracing import uninstrument as uninstrument
from .types import UTCDateTime as UTCDateTime

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXEMPT_PATHS",
    "FILTER_OPERATORS",
    "MAX_PAGE_SIZE",
    "NAMING_CONVENTION",
    "PROBLEM_JSON",
    "AlreadyExistsError",
    "AsyncRepository",
    "AsyncSession",
    "AuditMixin",
    "AuthenticationError",
    "AuthorizationError",
    "BaseModel",
    "BoundCachedFunction",
    "BusinessRuleError",
    "CacheBackend",
    "CacheConfig",
    "CacheService",
    "CacheUnavailableError",
    "CachedFunction",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "CursorPage",
    "DBBaseModel",
    "Database",
    "DatabaseConfig",
    "DatabaseConnectionError",
    "DatabaseError",
    "DotMacError",
    "FailOpenCounter",
    "IntegrityConstraintError",
    "MemoryBackend",
    "MissingDependencyError",
    "NotFoundError",
    "OperationTimeoutError",
    "PaginationParams",
    "PaginationResult",
    "PlainModel",
    "RateLimitExceededError",
    "RedisBackend",
    "RedisClusterBackend",
    "SecurityConfig",
    "ServiceError",
    "SoftDeleteMixin",
    "TableNamingMixin",
    "TenantAwareCacheManager",
    "TenantBaseModel",
    "TenantContext",
    "TenantError",
    "TenantMiddleware",
    "TenantMixin",
    "TenantToken",
    "TimestampMixin",
    "TransactionConflictError",
    "TransactionManager",
    "UTCDateTime",
    "UUIDMixin",
    "ValidationError",
    "apply_row_level_security",
    "cached",
    "close_rate_limiters",
    "configure_cache",
    "configure_database",
    "create_cache_service",
    "current_transaction",
    "current_user_id",
    "enable_row_level_security",
    "get_cache",
    "get_current_tenant",
    "get_database",
    "get_tenant_context",
    "install_exception_handlers",
    "instrument",
    "is_cache_available",
    "is_database_available",
    "is_fastapi_available",
    "is_instrumented",
    "is_schemas_available",
    "is_scoping_bypassed",
    "is_transient",
    "problem_details",
    "rate_limit",
    "rate_limit_fail_opens",
    "require_cache",
    "require_current_tenant",
    "require_database",
    "require_fastapi",
    "require_schemas",
    "reset_current_tenant",
    "retry_on_failure",
    "row_level_security_ddl",
    "set_current_tenant",
    "snake_case",
    "standard_exception_handler",
    "tenant_dependency",
    "tenant_from_header",
    "tenant_from_subdomain",
    "tenant_scope",
    "timeout",
    "transactional",
    "translate_errors",
    "uninstrument",
]
