"""OpenTelemetry spans for repository calls, transactions, the cache and rate limits.

`instrument()` wraps the methods from outside, as OpenTelemetry's own
instrumentations do: nothing in the data path changes, and `uninstrument()`
puts the original methods back. OpenTelemetry is imported only when
`instrument()` is called (the `otel` extra: `pip install 'dotmac-core[otel]'`).

Spans: `{Repository}.{method}` for each public `AsyncRepository` method,
`dotmac.transaction` for each `TransactionManager` block, `dotmac.cache.get`,
`.load`, `.set`, `.invalidate` and `.clear` (hits and misses as attributes),
and `dotmac.rate_limit` for each rate-limit decision; the Tracing page of the
docs lists their attributes.

Every span carries `dotmac.cache.fail_open = true` when the cache answered
without its backend, and `dotmac.tenant_id` when `tenant_attribute=True` and a
tenant is current. SQL statements are traced by the standard
`opentelemetry-instrumentation-sqlalchemy`; its spans nest under the
repository and transaction spans.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from typing import TYPE_CHECKING, Any

from .exceptions import MissingDependencyError
from .tenancy import get_current_tenant

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["instrument", "is_instrumented", "uninstrument"]

#: The originals replaced by `instrument()`: (owner, attribute, original).
_PATCHED: list[tuple[type[Any], str, Any]] = []
_PREFIX = "dotmac."
#: Set while a repository span is open: calls a method makes to another
#: (`get_one` to `list`) are part of the outer call, not spans of their own.
_IN_REPOSITORY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dotmac_in_repository", default=False
)


def is_instrumented() -> bool:
    """Return whether `instrument()` is in effect."""
    return bool(_PATCHED)


def _patch(owner: type[Any], name: str, wrapper: Callable[[Any], Any]) -> None:
    original = owner.__dict__[name]
    replacement = functools.wraps(original)(wrapper(original))
    _PATCHED.append((owner, name, original))
    setattr(owner, name, replacement)


def uninstrument() -> None:
    """Put back every method `instrument()` wrapped (a no-op when not instrumented)."""
    while _PATCHED:
        owner, name, original = _PATCHED.pop()
        setattr(owner, name, original)


def instrument(*, tracer_provider: Any = None, tenant_attribute: bool = False) -> None:
    """Trace repository calls, transactions, cache reads and writes, rate limits.

    Calling it again while instrumented changes nothing; `uninstrument()`
    first to change the options.

    Args:
        tracer_provider: An OpenTelemetry `TracerProvider`; the global one
            when omitted.
        tenant_attribute: Add the current tenant id as `dotmac.tenant_id`
            to every span (off by default: tenant ids may identify customers).

    Raises:
        MissingDependencyError: `opentelemetry-api` is not installed.
    """
    if _PATCHED:
        return
    try:
        from opentelemetry import trace
    except ImportError as exc:
        package = "opentelemetry-api"
        raise MissingDependencyError(package, "otel") from exc
    from . import __version__

    tracer = trace.get_tracer("dotmac_core", __version__, tracer_provider)
    _Instrumentation(tracer, tenant_attribute).install()


class _Instrumentation:
    """The wrappers, sharing one tracer and the tenant option."""

    def __init__(self, tracer: Any, tenant_attribute: bool) -> None:
        self.tracer = tracer
        self.tenant_attribute = tenant_attribute
        #: The span and context token of each open transaction block.
        self.open: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def install(self) -> None:
        self._repositories()
        self._transactions()
        self._cache()
        self._rate_limits()

    def attributes(self, **values: Any) -> dict[str, Any]:
        found = {f"{_PREFIX}{k}": v for k, v in values.items() if v is not None}
        if self.tenant_attribute:
            tenant = get_current_tenant()
            if tenant is not None:
                found[f"{_PREFIX}tenant_id"] = tenant
        return found

    # --- repositories ------------------------------------------------------------

    def _repositories(self) -> None:
        from .db.repository import AsyncRepository

        for name, member in inspect.getmembers(AsyncRepository):
            if name.startswith("_") or not inspect.iscoroutinefunction(member):
                continue
            _patch(AsyncRepository, name, functools.partial(self._repository, name))

    def _repository(self, method: str, original: Any) -> Any:
        async def traced(repo: Any, *args: Any, **kwargs: Any) -> Any:
            if _IN_REPOSITORY.get():
                return await original(repo, *args, **kwargs)
            attributes = self.attributes(
                model=repo.model.__name__, **{"repository.method": method}
            )
            token = _IN_REPOSITORY.set(True)
            try:
                with self.tracer.start_as_current_span(
                    f"{type(repo).__name__}.{method}", attributes=attributes
                ):
                    return await original(repo, *args, **kwargs)
            finally:
                _IN_REPOSITORY.reset(token)

        return traced

    # --- transactions --------------------------------------------------------------

    def _transactions(self) -> None:
        from .db.transaction import TransactionManager

        _patch(TransactionManager, "__aenter__", self._enter)
        _patch(TransactionManager, "__aexit__", self._exit)

    def _enter(self, original: Any) -> Any:
        from opentelemetry import context, trace

        async def traced(manager: Any) -> Any:
            span = self.tracer.start_span(
                "dotmac.transaction",
                attributes=self.attributes(
                    **{
                        "transaction.read_only": manager.read_only,
                        "transaction.isolation_level": manager.isolation_level,
                    }
                ),
            )
            token = context.attach(trace.set_span_in_context(span))
            try:
                entered = await original(manager)
            except BaseException as exc:
                context.detach(token)
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                span.end()
                raise
            span.set_attribute(f"{_PREFIX}transaction.nested", manager.is_nested)
            self.open[manager] = (span, token)
            return entered

        return traced

    def _exit(self, original: Any) -> Any:
        from opentelemetry import context, trace

        async def traced(manager: Any, *exc_info: Any) -> Any:
            span, token = self.open.pop(manager, (None, None))
            error: BaseException | None = exc_info[1] if len(exc_info) > 1 else None
            try:
                result = await original(manager, *exc_info)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if span is not None:
                    outcome = "rollback" if error is not None else "commit"
                    span.set_attribute(f"{_PREFIX}transaction.outcome", outcome)
                    if error is not None:
                        span.record_exception(error)
                        span.set_status(
                            trace.Status(trace.StatusCode.ERROR, type(error).__name__)
                        )
                    context.detach(token)
                    span.end()
            return result

        return traced

    # --- the cache ----------------------------------------------------------------

    def _cache(self) -> None:
        from .cache._engine import Engine

        _patch(Engine, "payloads", self._payloads)
        _patch(Engine, "load", self._load)
        for name, span in (
            ("write", "set"),
            ("invalidate", "invalidate"),
            ("clear", "clear"),
        ):
            _patch(Engine, name, functools.partial(self._cache_write, span))

    def _cache_span(self, engine: Any, name: str, **values: Any) -> Any:
        return self.tracer.start_as_current_span(
            f"{_PREFIX}cache.{name}",
            attributes=self.attributes(
                **{"cache.backend": engine.backend.name},
                **{f"cache.{k}": v for k, v in values.items()},
            ),
        )

    @staticmethod
    def _note_fail_open(engine: Any, before: int, span: Any) -> None:
        if engine.fail_opens.count != before:
            span.set_attribute(f"{_PREFIX}cache.fail_open", True)

    def _payloads(self, original: Any) -> Any:
        async def traced(engine: Any, space: Any, keys: Any) -> Any:
            before = engine.fail_opens.count
            with self._cache_span(engine, "get", keys=len(keys)) as span:
                found = await original(engine, space, keys)
                hits = sum(payload is not None for payload in found)
                span.set_attribute(f"{_PREFIX}cache.hits", hits)
                span.set_attribute(f"{_PREFIX}cache.misses", len(found) - hits)
                if len(found) == 1:
                    span.set_attribute(f"{_PREFIX}cache.hit", hits == 1)
                self._note_fail_open(engine, before, span)
                return found

        return traced

    def _load(self, original: Any) -> Any:
        async def traced(
            engine: Any,
            space: Any,
            key: Any,
            codec: Any,
            factory: Callable[[], Awaitable[Any]],
            *args: Any,
        ) -> Any:
            computed = False

            async def tracked() -> Any:
                nonlocal computed
                computed = True
                return await factory()

            before = engine.fail_opens.count
            with self._cache_span(engine, "load", keys=1) as span:
                value = await original(engine, space, key, codec, tracked, *args)
                span.set_attribute(f"{_PREFIX}cache.hit", not computed)
                self._note_fail_open(engine, before, span)
                return value

        return traced

    def _cache_write(self, name: str, original: Any) -> Any:
        async def traced(engine: Any, *args: Any, **kwargs: Any) -> Any:
            # write(space, mapping, ...), invalidate(keys, ...), clear(prefix)
            keys: int | None = None
            if name == "set" and len(args) > 1:
                keys = len(args[1])
            elif name == "invalidate" and args:
                keys = len(args[0])
            before = engine.fail_opens.count
            with self._cache_span(engine, name, keys=keys) as span:
                result = await original(engine, *args, **kwargs)
                self._note_fail_open(engine, before, span)
                return result

        return traced

    # --- rate limits ----------------------------------------------------------------

    def _rate_limits(self) -> None:
        from ._ratelimit_store import LocalWindowStore

        stores: list[type[Any]] = [LocalWindowStore]
        try:
            from ._ratelimit_redis import RedisWindowStore
        except ImportError:  # pragma: no cover - the redis extra is not installed
            pass
        else:
            stores.append(RedisWindowStore)
        for store in stores:
            _patch(store, "hit", self._hit)

    def _hit(self, original: Any) -> Any:
        async def traced(store: Any, key: str, limit: int, window: float) -> Any:
            attributes = self.attributes(
                **{
                    "rate_limit.key": key,
                    "rate_limit.limit": limit,
                    "rate_limit.window": window,
                }
            )
            with self.tracer.start_as_current_span(
                f"{_PREFIX}rate_limit", attributes=attributes
            ) as span:
                decision = await original(store, key, limit, window)
                span.set_attribute(f"{_PREFIX}rate_limit.allowed", decision.allowed)
                span.set_attribute(f"{_PREFIX}rate_limit.remaining", decision.remaining)
                span.set_attribute(
                    f"{_PREFIX}rate_limit.retry_after", decision.retry_after
                )
                return decision

        return traced
