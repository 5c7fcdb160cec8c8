"""`TenantAwareCacheManager`: a cache whose keys always belong to one tenant.

Keys become `tenant:{tenant_id}:{key}` (stored as
`<prefix>#tenant:{<encoded id>}:<key>`): the braces are a Redis Cluster hash
tag, so one tenant's keys and its generation share a slot, and the id is
percent-encoded, so ids containing `:`, `{`, `}` or spaces can neither collide
with other ids nor move the tag. The tenant comes from the `tenant_id`
argument or the current tenant context; with neither, `TenantError` is raised
and nothing is read or written under a shared key. A `tenant_id` argument
obeys the rules of `tenant_scope()`: a non-empty `str` of at most 64
printable characters without surrounding whitespace, NUL, other control,
format or separator characters, or lone surrogates; anything else is a
`ValidationError` before any key is built.

`invalidate_tenant()` replaces the tenant's generation token: one write,
whatever the number of keys; the old entries read as misses and expire by
their TTL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..exceptions import ConfigurationError, TenantError
from ..tenancy import _check_id as check_tenant_id
from ..tenancy import get_current_tenant
from .codec import codec_for
from .service import CacheService, _check_expiry, create_cache_service, get_cache

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

    from ..config import CacheConfig
    from ._keys import Keyspace
    from .backends import CacheBackend
    from .service import BackendName

__all__ = ["TenantAwareCacheManager"]

T = TypeVar("T")
D = TypeVar("D")


class TenantAwareCacheManager:
    """Tenant-scoped view of a `CacheService`: one tenant never sees another's keys.

    Args:
        cache: The service to store in. Omitted: build one from `backend`,
            `url` and `config` if any is given (`TenantAwareCacheManager(
            backend="redis")`), else use the default service (`get_cache()`)
            when first needed.
        backend: As for `create_cache_service`.
        url: As for `create_cache_service`.
        config: As for `create_cache_service`.

    Every method takes `tenant_id=` (default: the current tenant); a given
    id must pass the same checks as `tenant_scope()`, else the call raises
    `ValidationError` naming `tenant_id`.

    Raises:
        ConfigurationError: the key prefix contains `{` or `}` (it would take
            the tenant's cluster hash tag), or `cache` is given with options.
    """

    def __init__(
        self,
        cache: CacheService | None = None,
        *,
        backend: BackendName | CacheBackend | None = None,
        url: str | Sequence[str] | None = None,
        config: CacheConfig | None = None,
    ) -> None:
        options_given = backend is not None or url is not None or config is not None
        if cache is not None and options_given:
            msg = "pass either a CacheService or backend/url/config, not both"
            raise ConfigurationError(msg)
        if cache is None and options_given:
            cache = create_cache_service(backend, url=url, config=config)
        self._cache = None if cache is None else self._checked(cache)

    @staticmethod
    def _checked(cache: CacheService) -> CacheService:
        prefix = cache.config.key_prefix
        if "{" in prefix or "}" in prefix:
            msg = (
                f"key_prefix {prefix!r} contains a brace: tenant keys need the "
                "first {...} of the key for their cluster hash tag"
            )
            raise ConfigurationError(msg, field="key_prefix")
        return cache

    @property
    def cache(self) -> CacheService:
        """The `CacheService` underneath (the default one, if none was given)."""
        if self._cache is None:
            return self._checked(get_cache())
        return self._cache

    def __repr__(self) -> str:
        backend = "default" if self._cache is None else self._cache.backend_name
        return f"<TenantAwareCacheManager backend={backend!r}>"

    @staticmethod
    def _tenant(tenant_id: str | None) -> str:
        if tenant_id is None:
            tenant_id = get_current_tenant()
            if tenant_id is None:
                msg = (
                    "no tenant for a tenant-scoped cache: pass tenant_id= or set "
                    "the current tenant (tenant_scope)"
                )
                raise TenantError(msg)
            return tenant_id  # checked when the context was set
        # tenant_scope()'s own check: an id no tenant context may hold names no
        # cache tenant either, and a str subclass is keyed by its plain text.
        return check_tenant_id(tenant_id, "tenant_id")

    def _scope(
        self, tenant_id: str | None, namespace: str | None
    ) -> tuple[CacheService, Keyspace]:
        """Return the service and the tenant's keyspace (TenantError without one)."""
        tenant = self._tenant(tenant_id)
        cache = self.cache
        return cache, cache._tenant_space(tenant, namespace)

    @overload
    async def get(
        self,
        key: str,
        default: Any = None,
        *,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> Any: ...
    @overload
    async def get(
        self,
        key: str,
        *,
        as_type: type[T],
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> T | None: ...
    @overload
    async def get(
        self,
        key: str,
        default: D,
        *,
        as_type: type[T],
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> T | D: ...
    async def get(
        self,
        key: str,
        default: Any = None,
        *,
        as_type: Any = None,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> Any:
        """Return the tenant's value under `key`, or `default` on a miss."""
        cache, space = self._scope(tenant_id, namespace)
        return await cache._get(space, key, default, as_type)

    async def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        jitter: float = 0.0,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> None:
        """Store `value` under the tenant's `key` (see `CacheService.set`)."""
        cache, space = self._scope(tenant_id, namespace)
        await cache._set_many(space, {key: value}, ttl, jitter)

    async def exists(
        self, key: str, *, tenant_id: str | None = None, namespace: str | None = None
    ) -> bool:
        """Return whether the tenant's `key` would hit."""
        cache, space = self._scope(tenant_id, namespace)
        return await cache._exists(space, key)

    async def delete(
        self, key: str, *, tenant_id: str | None = None, namespace: str | None = None
    ) -> None:
        """Remove the tenant's `key`."""
        cache, space = self._scope(tenant_id, namespace)
        await cache._invalidate(keys=[space.key(key)])

    async def get_many(
        self,
        keys: Iterable[str],
        *,
        as_type: Any = None,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """Return `{key: value}` for the tenant's keys that hit (one slot, one MGET)."""
        cache, space = self._scope(tenant_id, namespace)
        return await cache._get_many(space, list(keys), as_type)

    async def set_many(
        self,
        mapping: Mapping[str, Any],
        ttl: float | None = None,
        *,
        jitter: float = 0.0,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> None:
        """Store every `key: value` of `mapping` for the tenant."""
        cache, space = self._scope(tenant_id, namespace)
        await cache._set_many(space, mapping, ttl, jitter)

    async def delete_many(
        self,
        keys: Iterable[str],
        *,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> None:
        """Remove several of the tenant's keys."""
        cache, space = self._scope(tenant_id, namespace)
        await cache._invalidate(keys=[space.key(k) for k in keys])

    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[T]],
        ttl: float | None = None,
        *,
        as_type: type[T],
        jitter: float = 0.0,
        lock: bool = False,
        lock_timeout: float = 10.0,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> T: ...
    @overload
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float | None = None,
        *,
        jitter: float = 0.0,
        lock: bool = False,
        lock_timeout: float = 10.0,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> Any: ...
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float | None = None,
        *,
        as_type: Any = None,
        jitter: float = 0.0,
        lock: bool = False,
        lock_timeout: float = 10.0,
        tenant_id: str | None = None,
        namespace: str | None = None,
    ) -> Any:
        """Read through the tenant's `key` (see `CacheService.get_or_set`)."""
        _check_expiry(ttl, jitter, lock_timeout)
        cache, space = self._scope(tenant_id, namespace)
        return await cache._engine.load(
            space,
            key,
            codec_for(as_type),
            factory,
            ttl,
            jitter,
            lock_timeout if lock else None,
        )

    async def invalidate_namespace(
        self, namespace: str, *, tenant_id: str | None = None
    ) -> None:
        """Make every entry of the tenant's `namespace` a miss, in O(1)."""
        cache, space = self._scope(tenant_id, namespace)
        await cache._invalidate(generations=space.generations[-1:])

    async def invalidate_tenant(self, tenant_id: str | None = None) -> None:
        """Make every entry of the tenant a miss, in O(1); other tenants keep theirs."""
        cache, space = self._scope(tenant_id, None)
        await cache._invalidate(generations=space.generations[-1:])
