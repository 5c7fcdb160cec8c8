"""`rate_limit`: at most `max_calls` per `time_window` seconds, per key.

Without a backend the limit is kept in this process (a sliding-window log,
exact and safe across tasks and threads). With a Redis backend every process
shares it: one atomic Lua script per call on the Redis server's clock, through
a client that never resends a command (see `_ratelimit_redis`).

Calls with the same key share one budget: by default the key is the decorated
function's dotted name, so each function has its own. A string key names a
budget several functions can share; a callable key derives it from the call's
arguments (per tenant, per user). Limits with different `max_calls` or
`time_window` never share a budget, even under one key.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeAlias, TypeVar
from urllib.parse import urlsplit

from ._ratelimit_store import LOCAL_STORE, WindowStore
from .cache._breaker import FailOpenCounter
from .config import CacheConfig
from .decorators import _check, _name, _require_async
from .exceptions import ConfigurationError, RateLimitExceededError, ServiceError
from .guards import require_cache

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = [
    "HasCacheConfig",
    "close_rate_limiters",
    "rate_limit",
    "rate_limit_fail_opens",
]

#: Every call let through unchecked, one warning each. A logger of its own
#: (under `dotmac_core.ratelimit`, whose warnings mark outages), so it can be
#: routed or rate-limited apart from them.
_fail_open_log = logging.getLogger("dotmac_core.ratelimit.fail_open")

#: Calls every limit of the process let through because Redis failed.
_FAIL_OPENS = FailOpenCounter()


def rate_limit_fail_opens() -> FailOpenCounter:
    """Return the count of calls rate limits let through unchecked (Redis failed).

    One counter for every limit of the process with `fail_open=True`; each
    such call is also logged as a warning by `dotmac_core.ratelimit.fail_open`. A
    growing count means the limits are not being enforced: alert on it.
    """
    return _FAIL_OPENS


P = ParamSpec("P")
R = TypeVar("R")

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


class HasCacheConfig(Protocol):
    """Anything that carries a `CacheConfig`, such as a `CacheService`."""

    @property
    def config(self) -> CacheConfig:
        """The cache settings; a Redis limit reuses their connection settings."""
        ...


#: What `rate_limit(backend=...)` accepts.
RateLimitBackend: TypeAlias = CacheConfig | str | HasCacheConfig | None


def _resolve(backend: RateLimitBackend) -> tuple[WindowStore, str]:
    """Return the store for `backend` and the key prefix to write under."""
    if backend is None:
        return LOCAL_STORE, ""
    if isinstance(backend, str):
        if urlsplit(backend).scheme not in _REDIS_SCHEMES:
            msg = "backend URL must be a redis://, rediss:// or unix:// URL"
            raise ConfigurationError(msg, field="backend")
        config = CacheConfig(backend="redis", url=backend)
    elif isinstance(backend, CacheConfig):
        config = backend
    else:
        carried = getattr(backend, "config", None)
        if not isinstance(carried, CacheConfig):
            msg = (
                "backend must be None, a CacheConfig, a Redis URL, or an object "
                f"with a `config: CacheConfig` attribute; got {type(backend).__name__}"
            )
            raise TypeError(msg)
        config = carried
        # A service built around a backend object may keep a config that does
        # not describe it; limiting in-process (or elsewhere) would be silent.
        name = getattr(backend, "backend_name", config.backend)
        if name != config.backend:
            msg = (
                f"the cache service's backend is {name!r} but its config says "
                f"{config.backend!r}: pass backend=CacheConfig(...) for the Redis "
                "to limit with"
            )
            raise ConfigurationError(msg, field="backend")
    if config.backend == "memory":
        # The cache itself is in-process: so is the limit.
        return LOCAL_STORE, ""
    require_cache()
    from ._ratelimit_redis import store_for

    return store_for(config), config.key_prefix


def rate_limit(
    max_calls: int,
    time_window: float,
    *,
    key: str | Callable[..., str] | None = None,
    backend: RateLimitBackend = None,
    fail_open: bool = True,
) -> Callable[
    [Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]
]:
    """Admit at most `max_calls` calls per `time_window` seconds; refuse the rest.

    A refused call raises `RateLimitExceededError` before the function runs;
    its `retry_after` is the number of seconds until a call would be admitted,
    `remaining` is 0, and `details` hold `limit` and `window`. The window
    slides: any `time_window`-long interval holds at most `max_calls` admitted
    calls.

    Args:
        max_calls: Calls admitted per window (>= 1).
        time_window: Window length in seconds (> 0).
        key: The budget's name. Default: the function's dotted name. A string
            names a budget to share; a callable gets the call's arguments
            (`self` included, for methods) and returns the name, such as
            `lambda *args, **kwargs: f"search:{require_current_tenant()}"`.
        backend: `None` keeps the limit in this process. A `CacheConfig`, a
            Redis URL, or an object with a `config: CacheConfig` attribute (a
            `CacheService`) shares it through that Redis (Redis Cluster when
            the config says `redis-cluster`), under the config's `key_prefix`.
            A URL takes its other settings from `CacheConfig()` (environment,
            then defaults). A config whose backend is `memory` keeps the limit
            in this process.
        fail_open: When Redis fails: `True` lets the call through, `False`
            raises `ServiceError`. An outage is logged once when it starts;
            with `True` each call let through is also logged as a warning
            (logger `dotmac_core.ratelimit.fail_open`) and counted in
            `rate_limit_fail_opens()`. Use `False` for limits that
            protect security (logins, one-time codes).

    Raises:
        ConfigurationError: `max_calls`, `time_window` or a URL is invalid.
        TypeError: `backend` is of an unknown kind, or the decorated callable
            is not async.
    """
    _check(
        isinstance(max_calls, int)
        and not isinstance(max_calls, bool)
        and max_calls >= 1,
        "max_calls",
        "an int >= 1",
    )
    _check(0 < time_window < math.inf, "time_window", "finite and > 0")
    store, prefix = _resolve(backend)
    # The limit's figures are part of the stored key, so a changed limit starts
    # a fresh budget instead of misreading the old one.
    suffix = f":{max_calls}/{float(time_window)!r}s"
    window = float(time_window)
    details = {"limit": max_calls, "window": window}

    def decorate(
        func: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        _require_async(func, "rate_limit")
        default_name = f"{func.__module__}.{_name(func)}"

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if key is None:
                name = default_name
            elif isinstance(key, str):
                name = key
            else:
                name = key(*args, **kwargs)
            # The hash tag keeps every limit under one key on one cluster slot.
            stored = f"{prefix}ratelimit:{{{name}}}{suffix}"
            try:
                decision = await store.hit(stored, max_calls, window)
            except ServiceError as exc:
                if fail_open:
                    _FAIL_OPENS.record(str(exc))
                    # Every call let through unchecked is a warning: the limit
                    # is not enforced, which matters more than log volume.
                    _fail_open_log.warning(
                        "rate limit %r not checked (%s); call let through "
                        "(fail_open=True, %d so far)",
                        name,
                        exc,
                        _FAIL_OPENS.count,
                    )
                    return await func(*args, **kwargs)
                raise
            if not decision.allowed:
                msg = (
                    f"rate limit of {max_calls} calls per {window:g} s exceeded; "
                    f"retry in {decision.retry_after:.3f} s"
                )
                raise RateLimitExceededError(
                    msg,
                    retry_after=decision.retry_after,
                    remaining=decision.remaining,
                    details=details,
                )
            return await func(*args, **kwargs)

        return wrapper

    return decorate


async def close_rate_limiters() -> None:
    """Close the Redis connections rate limits opened in the running event loop.

    Call it at shutdown (and after tests), in the loop that used the limits. A
    later limited call connects again.
    """
    redis_stores = sys.modules.get(f"{__package__}._ratelimit_redis")
    if redis_stores is not None:  # else no limit ever used Redis
        await redis_stores.close_all()
