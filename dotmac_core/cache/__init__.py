"""The cache: `CacheService` over memory, Redis or Redis Cluster, and `@cached`.

Import from the package root (`from dotmac_core import cached`); this
subpackage re-exports the same names.
"""

from ._breaker import FailOpenCounter as FailOpenCounter
from .backends import CacheBackend as CacheBackend
from .backends import CacheUnavailableError as CacheUnavailableError
from .backends import MemoryBackend as MemoryBackend
from .backends import RedisBackend as RedisBackend
from .backends import RedisClusterBackend as RedisClusterBackend
from .decorators import BoundCachedFunction as BoundCachedFunction
from .decorators import CachedFunction as CachedFunction
from .decorators import cached as cached
from .service import CacheService as CacheService
from .service import configure_cache as configure_cache
from .service import create_cache_service as create_cache_service
from .service import get_cache as get_cache
from .tenant import TenantAwareCacheManager as TenantAwareCacheManager

__all__ = [
    "BoundCachedFunction",
    "CacheBackend",
    "CacheService",
    "CacheUnavailableError",
    "CachedFunction",
    "FailOpenCounter",
    "MemoryBackend",
    "RedisBackend",
    "RedisClusterBackend",
    "TenantAwareCacheManager",
    "cached",
    "configure_cache",
    "create_cache_service",
    "get_cache",
]
