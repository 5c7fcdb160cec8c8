"""Uses the decorators as users will; type-checked by mypy, never run.

Each `# type: ignore[code]` marks a call mypy must reject: with
`warn_unused_ignores` (part of --strict), an ignore that is not needed fails
the check, so these lines prove the wrapped signatures are kept.
"""

from __future__ import annotations

from dotmac_core import (
    CacheConfig,
    DotMacError,
    close_rate_limiters,
    is_transient,
    rate_limit,
    require_current_tenant,
    retry_on_failure,
    standard_exception_handler,
    testing,
    timeout,
)

CACHE = CacheConfig(backend="redis", url="redis://127.0.0.1:6379/0")


class UserService:
    """A service with the handbook's stacked decorators on its methods."""

    @standard_exception_handler
    @retry_on_failure(max_retries=3, backoff_factor=2.0)
    @timeout(seconds=30)
    async def api_call(self, user_id: int, *, fresh: bool = False) -> str:
        """The handbook's example, with arguments."""
        return f"{user_id}:{fresh}"

    @standard_exception_handler
    def render(self, name: str) -> bytes:
        """A sync method: the handler keeps it sync."""
        return name.encode()

    @retry_on_failure(exceptions=(KeyError, LookupError), jitter=False)
    def lookup(self, key: str) -> int:
        """A sync method retried on chosen errors."""
        return len(key)

    @rate_limit(5, 1, key=lambda self, *args, **kwargs: f"svc:{id(self)}")
    @retry_on_failure(
        exceptions=lambda exc: is_transient(exc) or isinstance(exc, OSError)
    )
    async def limited(self, payload: bytes) -> int:
        """A rate-limited method retried on a predicate."""
        return len(payload)


@rate_limit(max_calls=100, time_window=60)
async def api_endpoint() -> dict[str, str]:
    """The handbook's process-local limit."""
    return {"message": "success"}


@rate_limit(
    10,
    1.5,
    key=lambda user_id: f"search:{require_current_tenant()}:{user_id}",
    backend=CACHE,
    fail_open=False,
)
async def search(user_id: int) -> list[str]:
    """A per-tenant, per-user limit kept in Redis."""
    return [str(user_id)]


@timeout(0.5)
@rate_limit(1, 1, backend="redis://127.0.0.1:6379/0")
async def ping() -> None:
    """A limit on a Redis URL, stacked under a timeout."""


class CacheService:
    """Stands in for the cache service: anything with a `config` will do."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config


@rate_limit(3, 60, backend=CacheService(CACHE))
async def notify(user_id: int) -> None:
    """A limit sharing the cache's Redis."""


async def use_decorators() -> None:
    """The wrapped callables keep their parameter and return types."""
    service = UserService()
    text: str = await service.api_call(1, fresh=True)
    raw: bytes = service.render("x")
    size: int = service.lookup("k")
    count: int = await service.limited(b"abc")
    body: dict[str, str] = await api_endpoint()
    found: list[str] = await search(3)
    await ping()
    await notify(1)
    del text, raw, size, count, body, found

    await service.api_call("1")  # type: ignore[arg-type]
    await service.api_call(1, stale=True)  # type: ignore[call-arg]
    service.render(1)  # type: ignore[arg-type]
    await search()  # type: ignore[call-arg]
    wrong: int = await api_endpoint()  # type: ignore[assignment]
    not_awaited: str = service.api_call(1)  # type: ignore[assignment]
    del wrong, not_awaited


def use_testing() -> None:
    """The helpers for users' test suites."""
    testing.set_retries_enabled(False)
    with testing.retries_disabled():
        pass
    with testing.record_retry_delays() as delays:
        first: float = delays[0]
        assert first
    testing.reset_rate_limits()
    error: DotMacError | None = None
    assert error is None


async def shutdown() -> None:
    """Close the Redis connections the limits opened."""
    await close_rate_limiters()
