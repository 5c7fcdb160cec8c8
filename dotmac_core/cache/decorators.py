"""`@cached`: read-through caching for async functions and methods.

```python
class UserService:
    def __init__(self, cache: CacheService) -> None:
        self.cache = cache

    @cached(ttl=300, key="user:{user_id}")
    async def get_user_profile(self, user_id: str) -> UserProfile: ...
```

The key template is filled like an f-string from the call's arguments, so
`await self.cache.delete(f"user:{user_id}")` removes the entry; so does
`await service.get_user_profile.invalidate(user_id)`. Without a template the
key is the function's qualified name plus every argument, type-tagged (`1` and
`"1"` differ). The value comes back as the return annotation says (a pydantic
or SQLModel model, a list of them, ...). Concurrent misses for one key run the
function once in the process; `lock=True` also serialises them across
processes.

The cache is, in order: `cache=`; else the first argument's `cache` attribute
when it is a `CacheService` or `TenantAwareCacheManager` (the handbook's
`UserService(cache)`); else the default service (`configure_cache`). With a
`TenantAwareCacheManager`, or `tenant=True`, keys belong to the current tenant
and a call without one raises `TenantError`: a value cached for one tenant is
never returned to another.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    TypeVar,
    cast,
    overload,
)

from pydantic.errors import PydanticUserError

from ..exceptions import ConfigurationError
from ..tenancy import require_current_tenant
from ._keys import key_function
from .codec import ValueCodec, codec_for
from .service import CacheService, _check_expiry, get_cache
from .tenant import TenantAwareCacheManager

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from typing import Self

    from ._keys import Keyspace

__all__ = ["BoundCachedFunction", "CachedFunction", "cached"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")


def _codec(func: Callable[..., Any], *, strict: bool) -> ValueCodec | None:
    """The codec for `func`'s return annotation; `None` if it cannot resolve yet.

    Raises:
        ConfigurationError: the annotation names a type with no JSON form, or
            (with `strict`) cannot be resolved.
    """
    try:
        hints = typing.get_type_hints(func, include_extras=True)
        return codec_for(hints.get("return", Any))
    except NameError as exc:  # includes pydantic's PydanticUndefinedAnnotation
        if not strict:
            return None  # a forward reference defined later: resolve at first call
        msg = f"cannot resolve the return annotation of {func.__qualname__}: {exc}"
        raise ConfigurationError(msg) from exc
    except (TypeError, PydanticUserError) as exc:  # no schema for the type
        msg = f"@cached cannot store the return type of {func.__qualname__}: {exc}"
        raise ConfigurationError(msg) from exc


class CachedFunction(Generic[P, R]):
    """An async function whose results are cached; `.invalidate(...)` drops one.

    Made by `@cached`; call it like the function it wraps.
    """

    def __init__(
        self,
        func: Callable[P, Awaitable[R]],
        *,
        ttl: float | None,
        key: str | None,
        cache: CacheService | TenantAwareCacheManager | None,
        namespace: str | None,
        tenant: bool,
        jitter: float,
        lock_timeout: float | None,
    ) -> None:
        functools.update_wrapper(self, func)
        self._func = func
        self._key = key_function(func, key)
        self._cache = cache
        self._namespace = namespace
        self._tenant = tenant
        self._ttl = ttl
        self._jitter = jitter
        self._lock_timeout = lock_timeout
        self._codec = _codec(func, strict=False)

    def _scope(self, args: tuple[Any, ...]) -> tuple[CacheService, Keyspace]:
        target = self._cache
        if target is None:
            own = getattr(args[0], "cache", None) if args else None
            if isinstance(own, (CacheService, TenantAwareCacheManager)):
                target = own
            else:
                target = get_cache()
        if isinstance(target, TenantAwareCacheManager):
            return target._scope(None, self._namespace)
        if self._tenant:
            tenant = require_current_tenant()
            return target, target._tenant_space(tenant, self._namespace)
        return target, target._space(self._namespace)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Return the cached result for these arguments; call the function on a miss."""
        cache, space = self._scope(args)
        key = self._key(args, kwargs)
        codec = self._codec or self._resolve_codec()
        return await cache._engine.load(
            space,
            key,
            codec,
            lambda: self._func(*args, **kwargs),
            self._ttl,
            self._jitter,
            self._lock_timeout,
        )

    def _resolve_codec(self) -> ValueCodec:
        codec = _codec(self._func, strict=True)
        assert codec is not None  # noqa: S101 - strict never returns None
        self._codec = codec
        return codec

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the entry that a call with these arguments would read."""
        cache, space = self._scope(args)
        await cache._invalidate(keys=[space.key(self._key(args, kwargs))])

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R],
        instance: S,
        owner: type[Any] | None = None,
    ) -> BoundCachedFunction[P2, R]: ...
    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return BoundCachedFunction(cast("CachedFunction[..., R]", self), instance)

    def __repr__(self) -> str:
        return f"<cached function {self._func.__qualname__}>"


class BoundCachedFunction(Generic[P, R]):
    """A cached method bound to its instance; `.invalidate(...)` binds it too."""

    __slots__ = ("__func__", "__self__")

    def __init__(
        self, func: CachedFunction[Concatenate[Any, P], R], instance: object
    ) -> None:
        self.__func__ = func
        self.__self__ = instance

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Call the cached method on the bound instance."""
        return self.__func__(self.__self__, *args, **kwargs)

    def invalidate(
        self, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, None]:
        """Drop the entry that a call with these arguments would read."""
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bound {self.__func__!r} of {self.__self__!r}>"


def cached(
    ttl: float | None = None,
    *,
    key: str | None = None,
    cache: CacheService | TenantAwareCacheManager | None = None,
    namespace: str | None = None,
    tenant: bool = False,
    jitter: float = 0.0,
    lock: bool = False,
    lock_timeout: float = 10.0,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """Cache an async function's results: `@cached(ttl=300, key="user:{user_id}")`.

    Args:
        ttl: Seconds to keep a result; `CacheConfig.ttl_default` when omitted.
        key: Template filled from the arguments like an f-string
            (`"user:{user_id}"`, `"{user.id}"`); checked when decorating.
            Default: qualified name plus every argument, type-tagged.
        cache: A `CacheService` or `TenantAwareCacheManager`; see the module
            docs for the default.
        namespace: Store results in this namespace (`invalidate_namespace`).
        tenant: Scope keys to the current tenant even on a plain service.
        jitter: Random fraction the TTL may be shortened by.
        lock: Also serialise misses across processes (a lock in the backend).
        lock_timeout: Seconds the lock lives and others wait for its value.

    Raises:
        ConfigurationError: the template names a missing argument, the
            function is not async, or its return type has no JSON form.
        ValidationError: ttl, jitter or lock_timeout are out of range.
    """
    _check_expiry(ttl, jitter, lock_timeout)

    def decorate(func: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        if not inspect.iscoroutinefunction(func):
            msg = f"@cached decorates async functions; {func!r} is not one"
            raise ConfigurationError(msg)
        return CachedFunction(
            func,
            ttl=ttl,
            key=key,
            cache=cache,
            namespace=namespace,
            tenant=tenant,
            jitter=jitter,
            lock_timeout=lock_timeout if lock else None,
        )

    return decorate
