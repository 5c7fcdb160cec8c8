"""`@cached` on the memory backend: checks at decoration, cache choice, typing."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from dotmac_core import ConfigurationError, tenant_scope
from dotmac_core.cache import (
    BoundCachedFunction,
    CachedFunction,
    CacheService,
    TenantAwareCacheManager,
    cached,
    configure_cache,
    create_cache_service,
)
from dotmac_core.cache.service import _reset_default_cache


@pytest.fixture(autouse=True)
def _no_default_cache() -> Iterator[None]:
    """Each test starts and ends without a registered default cache."""
    _reset_default_cache()
    yield
    _reset_default_cache()


@pytest.fixture
def cache() -> CacheService:
    """A memory cache."""
    return create_cache_service("memory")


@cached(key="forward")
async def make_later() -> Later:
    """Decorated before `Later` exists: its annotation resolves at first call."""
    return Later(value=1)


class Later(BaseModel):
    """Defined after the function that returns it is decorated."""

    value: int


def test_sync_functions_are_refused() -> None:
    """Decorating a plain function fails at decoration time."""
    with pytest.raises(ConfigurationError, match="async"):

        @cached(ttl=5)
        def plain() -> int:  # type: ignore[arg-type]
            return 1


def test_template_must_name_arguments() -> None:
    """A template naming a missing argument fails at decoration time."""
    with pytest.raises(ConfigurationError, match="'user'"):

        @cached(key="user:{user}")
        async def load(user_id: str) -> int:
            return 1


def test_return_types_without_json_form_are_refused() -> None:
    """A return annotation pydantic cannot serialise fails at decoration time."""
    with pytest.raises(ConfigurationError, match="return type"):

        @cached()
        async def connect() -> socket.socket:
            return socket.socket()


async def test_forward_references_resolve_at_first_call(cache: CacheService) -> None:
    """A return type defined after decoration is resolved when first called."""
    configure_cache(cache)
    assert await make_later() == Later(value=1)
    assert await make_later() == Later(value=1)  # a hit, decoded as `Later`
    assert await cache.get("forward") == {"value": 1}


async def test_unresolvable_annotations_fail_at_first_call(
    cache: CacheService,
) -> None:
    """A return type that never resolves raises `ConfigurationError` when called."""

    @cached(cache=cache)
    async def make() -> Missing:  # type: ignore[name-defined]  # noqa: F821
        return 1

    with pytest.raises(ConfigurationError, match="Missing"):
        await make()


async def test_wrapper_keeps_the_function_identity(cache: CacheService) -> None:
    """Name, docstring, signature and awaitability match the wrapped function."""

    async def get_user(user_id: str, *, fresh: bool = False) -> dict[str, str]:
        """Load a user."""
        return {"id": user_id}

    wrapped = cached(cache=cache)(get_user)
    assert isinstance(wrapped, CachedFunction)
    assert wrapped.__name__ == "get_user"
    assert wrapped.__doc__ == "Load a user."
    assert wrapped.__wrapped__ is get_user  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(get_user)
    assert inspect.iscoroutinefunction(wrapped.__call__)
    assert "get_user" in repr(wrapped)


async def test_unannotated_functions_cache_plain_json(cache: CacheService) -> None:
    """Without a return annotation, hits return the JSON form."""

    @cached(cache=cache, key="t")
    async def load():  # type: ignore[no-untyped-def]
        return (1, 2)

    assert await load() == (1, 2)
    assert await load() == [1, 2]


async def test_cache_choice_order(cache: CacheService) -> None:
    """`cache=` wins, then the first argument's `cache`, then the default."""
    default = configure_cache(backend="memory")
    other = create_cache_service("memory")

    class Service:
        def __init__(self, own: object) -> None:
            self.cache = own

        @cached(key="a")
        async def implicit(self) -> str:
            return "implicit"

        @cached(key="b", cache=other)
        async def explicit(self) -> str:
            return "explicit"

    await Service(cache).implicit()
    await Service(cache).explicit()
    await Service("not a cache").implicit()
    assert await cache.get("a") == "implicit"
    assert await other.get("b") == "explicit"
    assert await default.get("a") == "implicit"
    assert await cache.get("b") is None


async def test_no_cache_anywhere_is_a_configuration_error() -> None:
    """Without `cache=`, `self.cache` or a default, a call says what to do."""

    @cached()
    async def load() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="configure_cache"):
        await load()


async def test_methods_bind_invalidate(cache: CacheService) -> None:
    """`instance.method.invalidate(args)` drops the entry of `instance.method(args)`."""
    calls = 0

    class Service:
        def __init__(self) -> None:
            self.cache = cache

        @cached(ttl=30)
        async def load(self, user_id: str, limit: int = 5) -> int:
            nonlocal calls
            calls += 1
            return calls

    first, second = Service(), Service()
    assert isinstance(Service.load, CachedFunction)
    assert isinstance(first.load, BoundCachedFunction)
    assert "bound" in repr(first.load)
    assert await first.load("u") == 1
    assert await second.load("u", limit=5) == 1  # the default key skips `self`
    await second.load.invalidate("u")
    assert await first.load("u") == 2
    await Service.load.invalidate(first, user_id="u")
    assert await first.load("u") == 3


async def test_bad_calls_raise_type_error_before_any_cache_work(
    cache: CacheService,
) -> None:
    """A call with wrong arguments raises `TypeError`, as the function would."""

    @cached(cache=cache)
    async def load(user_id: str) -> str:
        return user_id

    with pytest.raises(TypeError):
        await load()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await load("a", "b")  # type: ignore[call-arg]


async def test_namespaces_on_decorated_functions(cache: CacheService) -> None:
    """`@cached(namespace=...)` entries go with `invalidate_namespace`."""
    calls = 0

    @cached(cache=cache, namespace="reports", key="r:{n}")
    async def report(n: int) -> int:
        nonlocal calls
        calls += 1
        return n

    await report(1)
    await report(1)
    await cache.invalidate_namespace("reports")
    await report(1)
    assert calls == 2


async def test_tenant_manager_in_self_cache(cache: CacheService) -> None:
    """A `TenantAwareCacheManager` as `self.cache` scopes every entry by tenant."""

    class Service:
        def __init__(self) -> None:
            self.cache = TenantAwareCacheManager(cache)

        @cached(key="k")
        async def load(self) -> str | None:
            from dotmac_core import get_current_tenant

            return get_current_tenant()

    service = Service()
    with tenant_scope("a"):
        assert await service.load() == "a"
    with tenant_scope("b"):
        assert await service.load() == "b"
        await service.load.invalidate()
    with tenant_scope("a"):
        assert await service.load() == "a"
