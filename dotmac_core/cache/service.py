"""`CacheService`: the cache's public face, over any `CacheBackend`.

Values are JSON in a versioned envelope (see `codec`). `None` is a value like
any other; a miss returns the `default` you pass. Namespaces group keys so
that one call invalidates them all in O(1): each namespace has a generation
token, every entry records the tokens it was written under, and invalidating
the namespace replaces its token, so older entries read as misses and age out
by their TTL. Reading an entry of a namespace fetches the token with it, in
the same round trip.

When the backend fails, the service fails open (`CacheConfig.fail_open`):
reads miss, writes and invalidations are skipped, and a circuit breaker stops
calling a backend that keeps failing, so an outage costs microseconds per
call. Each such decision is counted in `CacheService.fail_opens`. With
`fail_open=False` the same failures raise `CacheUnavailableError`.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from pydantic import SecretStr

from .._registry import Default
from ..config import CacheConfig
from ..db.transaction import current_transaction
from ..exceptions import ConfigurationError, ValidationError
from ._engine import FAILED, Engine, decode
from ._keys import Keyspace
from .backends import (
    CacheBackend,
    CacheUnavailableError,
    MemoryBackend,
    RedisBackend,
    RedisClusterBackend,
)
from .codec import codec_for

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
    from types import TracebackType
    from typing import Self


__all__ = ["CacheService", "configure_cache", "create_cache_service", "get_cache"]

T = TypeVar("T")
D = TypeVar("D")

logger = logging.getLogger("dotmac_core.cache")

BackendName = Literal["memory", "redis", "redis-cluster"]


def _check_expiry(ttl: float | None, jitter: float, lock_timeout: float = 1.0) -> None:
    """Raise `ValidationError` for a TTL or lock timeout <= 0 or a bad jitter."""
    if not lock_timeout > 0:
        msg = f"lock_timeout must be a positive number of seconds, got {lock_timeout!r}"
        raise ValidationError(msg, field="lock_timeout")
    if ttl is not None and not ttl > 0:
        msg = f"ttl must be a positive number of seconds, got {ttl!r}"
        raise ValidationError(msg, field="ttl")
    if not 0 <= jitter < 1:
        msg = f"jitter must be a fraction in [0, 1), got {jitter!r}"
        raise ValidationError(msg, field="jitter")


class CacheService:
    """Get, set and invalidate JSON values in a `CacheBackend`; fail open.

    Build one with `create_cache_service()` (or pass a backend yourself).

    Args:
        backend: The store; `MemoryBackend`, `RedisBackend`,
            `RedisClusterBackend` or your own `CacheBackend`.
        config: TTL default, key prefix and failure policy; from the
            environment (`DOTMAC_CACHE_*`) when omitted.
    """

    def __init__(self, backend: CacheBackend, config: CacheConfig | None = None):
        self.backend = backend
        #: The settings this service was built from (the rate limiter reads them).
        self.config = config or CacheConfig()
        self._engine = Engine(backend, self.config)
        #: Operations answered without the backend because it failed or its
        #: circuit was open: a read that missed, a write or invalidation
        #: skipped (one user call may count several backend operations).
        self.fail_opens = self._engine.fail_opens
        self._root = Keyspace(self.config.key_prefix)
        self._namespaces: dict[str, Keyspace] = {}

    @property
    def backend_name(self) -> str:
        """The backend's name: `memory`, `redis` or `redis-cluster`."""
        return self.backend.name

    def __repr__(self) -> str:
        return f"<CacheService backend={self.backend_name!r}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the backend's connections; errors while closing are ignored."""
        try:
            await self.backend.aclose()
        except CacheUnavailableError:
            logger.debug("error while closing the cache backend", exc_info=True)

    # --- keyspaces ---------------------------------------------------------------

    def _space(self, namespace: str | None) -> Keyspace:
        if namespace is None:
            return self._root
        space = self._namespaces.get(namespace)
        if space is None:
            space = self._namespaces[namespace] = self._root.namespace(namespace)
        return space

    def _tenant_space(self, tenant_id: str, namespace: str | None) -> Keyspace:
        space = self._root.tenant(tenant_id)
        return space if namespace is None else space.namespace(namespace)

    # --- reading -----------------------------------------------------------------

    @overload
    async def get(
        self, key: str, default: Any = None, *, namespace: str | None = None
    ) -> Any: ...
    @overload
    async def get(
        self,
        key: str,
        *,
        as_type: type[T],
        namespace: str | None = None,
    ) -> T | None: ...
    @overload
    async def get(
        self,
        key: str,
        default: D,
        *,
        as_type: type[T],
        namespace: str | None = None,
    ) -> T | D: ...
    async def get(
        self,
        key: str,
        default: Any = None,
        *,
        as_type: Any = None,
        namespace: str | None = None,
    ) -> Any:
        """Return the value stored under `key`, or `default` on a miss.

        A stored `None` is returned as `None`; pass a sentinel as `default` to
        tell it from a miss. A value that no longer decodes is a miss.

        Args:
            key: The key, as given to `set`.
            default: Returned on a miss (and when the backend is down).
            as_type: Validate the value as this type (a pydantic or SQLModel
                model, `list[Model]`, ...); plain JSON values when omitted.
            namespace: The namespace the key was stored in.
        """
        return await self._get(self._space(namespace), key, default, as_type)

    async def _get(self, space: Keyspace, key: str, default: Any, as_type: Any) -> Any:
        [payload] = await self._engine.payloads(space, [key])
        return decode(payload, codec_for(as_type), default)

    async def exists(self, key: str, *, namespace: str | None = None) -> bool:
        """Return whether a current entry is stored under `key` (`None` counts).

        The value itself is not decoded: a stored value that no longer fits its
        model still exists, although `get(key, as_type=...)` misses it.
        """
        return await self._exists(self._space(namespace), key)

    async def _exists(self, space: Keyspace, key: str) -> bool:
        [payload] = await self._engine.payloads(space, [key])
        return payload is not None

    async def get_many(
        self,
        keys: Iterable[str],
        *,
        as_type: Any = None,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """Return `{key: value}` for the keys that hit, in one round trip.

        Args:
            keys: The keys to read.
            as_type: Validate each value as this type; plain JSON when omitted.
            namespace: The namespace the keys were stored in.
        """
        return await self._get_many(self._space(namespace), list(keys), as_type)

    async def _get_many(
        self, space: Keyspace, keys: list[str], as_type: Any
    ) -> dict[str, Any]:
        if not keys:
            return {}
        payloads = await self._engine.payloads(space, keys)
        codec = codec_for(as_type)
        found: dict[str, Any] = {}
        for key, payload in zip(keys, payloads, strict=True):
            value = decode(payload, codec, FAILED)
            if value is not FAILED:
                found[key] = value
        return found

    # --- writing -----------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        jitter: float = 0.0,
        namespace: str | None = None,
    ) -> None:
        """Store `value` (anything JSON can carry, models included) under `key`.

        Args:
            key: The key.
            value: The value; `None` is stored as a value.
            ttl: Seconds to keep it; `CacheConfig.ttl_default` when omitted.
            jitter: Shorten the TTL by a random fraction up to this (0.1: up to
                10 %), so entries written together do not expire together.
            namespace: Store it in this namespace.

        Raises:
            ValidationError: the value has no JSON form, or ttl / jitter are
                out of range.
        """
        await self.set_many({key: value}, ttl, jitter=jitter, namespace=namespace)

    async def set_many(
        self,
        mapping: Mapping[str, Any],
        ttl: float | None = None,
        *,
        jitter: float = 0.0,
        namespace: str | None = None,
    ) -> None:
        """Store every `key: value` of `mapping`, in one round trip.

        Arguments are as for `set`.
        """
        await self._set_many(self._space(namespace), mapping, ttl, jitter)

    async def _set_many(
        self,
        space: Keyspace,
        mapping: Mapping[str, Any],
        ttl: float | None,
        jitter: float,
    ) -> None:
        _check_expiry(ttl, jitter)
        await self._engine.write(space, mapping, ttl, jitter)

    # --- invalidating -------------------------------------------------------------

    async def _invalidate(
        self, keys: Sequence[str] = (), generations: Sequence[str] = ()
    ) -> None:
        """Delete `keys` and renew `generations` (both complete keys).

        Every invalidation goes through here (`delete`, `delete_many`,
        `@cached(...).invalidate`, namespace and tenant invalidation). Inside
        a `TransactionManager` it waits for the commit (and is dropped on
        rollback): invalidating earlier would let a reader re-cache the row
        the transaction is about to change.
        """
        tx = current_transaction() if self.config.invalidate_after_commit else None
        if tx is not None:
            tx.on_commit(
                functools.partial(
                    self._engine.invalidate, tuple(keys), tuple(generations)
                )
            )
            return
        await self._engine.invalidate(keys, generations)

    async def delete(self, key: str, *, namespace: str | None = None) -> None:
        """Remove `key`; a computation of it in progress here is not stored."""
        await self._invalidate(keys=[self._space(namespace).key(key)])

    async def delete_many(
        self, keys: Iterable[str], *, namespace: str | None = None
    ) -> None:
        """Remove several keys in one round trip."""
        space = self._space(namespace)
        await self._invalidate(keys=[space.key(k) for k in keys])

    async def invalidate_namespace(self, namespace: str) -> None:
        """Make every entry of `namespace` a miss, in O(1) (one write).

        The old entries are not deleted; they expire by their TTL.
        """
        await self._invalidate(generations=self._space(namespace).generations[-1:])

    async def clear(self) -> None:
        """Remove every entry under this service's key prefix.

        On Redis this scans the keyspace (`SCAN MATCH prefix*` + `UNLINK`), so
        it costs time in proportion to the database: use it in tests and
        maintenance, and `invalidate_namespace` on request paths.

        Raises:
            ConfigurationError: `key_prefix` is empty (clear would wipe the
                whole database).
        """
        prefix = self.config.key_prefix
        if not prefix:
            msg = "clear() needs a non-empty CacheConfig.key_prefix"
            raise ConfigurationError(msg, field="key_prefix")
        await self._engine.clear(prefix)

    # --- read-through -------------------------------------------------------------

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
        namespace: str | None = None,
    ) -> Any:
        """Return the value under `key`; on a miss, await `factory()` and store it.

        Concurrent misses for one key in this process await one `factory()`
        call (single flight); each caller gets its own copy of the value.

        Args:
            key: The key.
            factory: Computes the value on a miss.
            ttl: Seconds to keep it; `CacheConfig.ttl_default` when omitted.
            as_type: Validate a hit as this type, so hits and misses return the
                same type; without it a hit returns plain JSON values.
            jitter: Random fraction the TTL may be shortened by (see `set`).
            lock: Also serialise misses across processes with a lock in the
                backend; others wait for the value (up to `lock_timeout`).
            lock_timeout: Seconds the lock lives and others wait for it.
            namespace: The namespace of the key.
        """
        _check_expiry(ttl, jitter, lock_timeout)
        return await self._engine.load(
            self._space(namespace),
            key,
            codec_for(as_type),
            factory,
            ttl,
            jitter,
            lock_timeout if lock else None,
        )


# --- construction and the default service ------------------------------------------


def _memory(config: CacheConfig, url: str | Sequence[str] | None) -> CacheBackend:
    if url is not None:
        msg = "the memory cache backend takes no url"
        raise ConfigurationError(msg, field="url")
    return MemoryBackend(config.max_entries)


def _redis(config: CacheConfig, url: str | Sequence[str] | None) -> CacheBackend:
    if url is not None and not isinstance(url, str):
        msg = "the redis cache backend takes one url; a list is for redis-cluster"
        raise ConfigurationError(msg, field="url")
    return RedisBackend(config, url=url)


def _redis_cluster(
    config: CacheConfig, url: str | Sequence[str] | None
) -> CacheBackend:
    return RedisClusterBackend(config, url=url)


_FACTORIES: dict[str, Callable[[CacheConfig, str | Sequence[str] | None], CacheBackend]]
_FACTORIES = {"memory": _memory, "redis": _redis, "redis-cluster": _redis_cluster}


def create_cache_service(
    backend: BackendName | CacheBackend | None = None,
    *,
    url: str | Sequence[str] | None = None,
    config: CacheConfig | None = None,
) -> CacheService:
    """Build a `CacheService` from a backend name (or instance), a URL and settings.

    Args:
        backend: `"memory"`, `"redis"`, `"redis-cluster"`, or a ready
            `CacheBackend`. Defaults to `config.backend`, or to `"redis"` when
            only a `url` is given.
        url: Redis URL (wins over the config's); for `redis-cluster`, one or
            several startup node URLs.
        config: Settings; `CacheConfig()` (the environment) when omitted.

    Raises:
        ConfigurationError: unknown backend name, or a URL it cannot use.
        MissingDependencyError: a Redis backend without the `redis` extra.
    """
    config = config or CacheConfig()
    if backend is not None and not isinstance(backend, str):
        if url is not None:
            msg = "pass url to the backend you build, not beside it"
            raise ConfigurationError(msg, field="url")
        return CacheService(backend, config)
    if backend is None:
        backend = "redis" if url is not None and config.backend == "memory" else None
    name = backend or config.backend
    factory = _FACTORIES.get(name)
    if factory is None:
        msg = f"unknown cache backend {name!r}: use memory, redis or redis-cluster"
        raise ConfigurationError(msg, field="backend")
    updates: dict[str, Any] = {"backend": name}
    if url is not None:
        first = url if isinstance(url, str) else next(iter(url), None)
        updates["url"] = None if first is None else SecretStr(first)
    config = config.model_copy(update=updates)
    return CacheService(factory(config, url), config)


_default: Default[CacheService] = Default("cache", "configure_cache")


def configure_cache(
    cache: CacheService | CacheConfig | None = None,
    *,
    backend: BackendName | CacheBackend | None = None,
    url: str | Sequence[str] | None = None,
) -> CacheService:
    """Register the default `CacheService`, given or built (see `create_cache_service`).

    Returns:
        The registered service, used by `@cached` and `TenantAwareCacheManager`
        wherever no cache is given.
    """
    if isinstance(cache, CacheService):
        if backend is not None or url is not None:
            msg = "backend and url apply only when configure_cache builds the service"
            raise ConfigurationError(msg)
        return _default.set(cache)
    return _default.set(create_cache_service(backend, url=url, config=cache))


def get_cache() -> CacheService:
    """Return the default `CacheService`.

    Raises:
        ConfigurationError: `configure_cache()` has not been called.
    """
    return _default.get()


_reset_default_cache = _default.reset
