"""Key layout and encodings: injective, tag-safe, stable across processes.

Tenant ids given to `TenantAwareCacheManager` obey the tenancy rules.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from enum import Enum
from typing import Any

import pytest
from pydantic import BaseModel
from redis.crc import key_slot

from dotmac_core import ConfigurationError, ValidationError
from dotmac_core.cache import (
    MemoryBackend,
    TenantAwareCacheManager,
    create_cache_service,
)
from dotmac_core.cache._keys import (
    ArgumentBinder,
    Keyspace,
    default_key,
    encode_name,
    key_function,
)

from .test_tenancy import HOSTILE_IDS

ROOT = Keyspace("dotmac:")


def _hash_tag(key: str) -> str | None:
    """The part of `key` Redis Cluster hashes (its first non-empty `{...}`)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start < 0 or end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


class Color(Enum):
    """An enum argument."""

    RED = "red"


class Point(BaseModel):
    """A model argument."""

    x: int


def test_plain_keys_are_the_prefix_plus_the_key() -> None:
    """A plain key is stored as prefix + key, readable in redis-cli."""
    assert ROOT.key("user:1") == "dotmac:user:1"


def test_user_keys_cannot_reach_reserved_names() -> None:
    """A user key starting with `#` is stored with one more `#`."""
    namespace = ROOT.namespace("users")
    assert ROOT.key("#ns:users") == "dotmac:##ns:users"
    assert ROOT.key("#ns:users") not in namespace.generations
    assert ROOT.lock_key("k") == "dotmac:#lock:k"
    assert ROOT.key("#lock:k") != ROOT.lock_key("k")


def test_namespace_and_tenant_layout() -> None:
    """Namespaces and tenants are child keyspaces, each with a generation key."""
    users = ROOT.namespace("users")
    assert users.key("1") == "dotmac:#ns:users:1"
    assert users.generations == ("dotmac:#ns:users",)
    acme = ROOT.tenant("acme")
    assert acme.key("user:1") == "dotmac:#tenant:{acme}:user:1"
    nested = acme.namespace("users")
    assert nested.generations == (
        "dotmac:#tenant:{acme}",
        "dotmac:#tenant:{acme}:#ns:users",
    )


@pytest.mark.parametrize(
    "tenant", ["acme", "a:b", "{a}", "a}b", "}{", "a b", "a%b", "é", "x" * 64]
)
def test_one_tenant_shares_one_slot(tenant: str) -> None:
    """Every key of a tenant, generation included, hashes by the tenant's tag."""
    space = ROOT.tenant(tenant).namespace("ns")
    keys = [
        *space.generations,
        space.key("k"),
        space.key("{other}"),
        space.lock_key("k"),
    ]
    assert {_hash_tag(k) for k in keys} == {encode_name(tenant)}
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_tenant_encoding_is_injective() -> None:
    """Tenant ids that differ never produce the same keys."""
    ids = ["a", "a:b", "a%3Ab", "a b", "a+b", "{a}", "%7Ba%7D", "é", "e\u0301"]
    keys = {ROOT.tenant(t).key("k") for t in ids}
    assert len(keys) == len(ids)
    assert len({encode_name(t) for t in ids}) == len(ids)


def test_default_keys_tag_types() -> None:
    """Arguments of different types or shapes never share a default key."""
    values: list[Any] = [
        1,
        "1",
        1.0,
        True,
        None,
        "None",
        [1],
        (1,),
        {1},
        frozenset({1}),
        {"1": 1},
        {1: 1},
        uuid.UUID(int=1),
        str(uuid.UUID(int=1)),
        date(2024, 1, 1),
        "2024-01-01",
        Color.RED,
        "red",
        Point(x=1),
        {"x": 1},
        'a","b',
    ]
    keys = [default_key("m.f", {"v": v}, 0) for v in values]
    assert len(set(keys)) == len(values)
    # Two arguments never read as one argument with a separator in it.
    assert default_key("m.f", {"a": "x,y"}, 0) != default_key(
        "m.f", {"a": "x", "b": "y"}, 0
    )


def test_default_keys_are_stable_for_equal_values() -> None:
    """Equal dicts and sets give equal keys whatever their order."""
    assert default_key("m.f", {"d": {"a": 1, "b": 2}}, 0) == default_key(
        "m.f", {"d": {"b": 2, "a": 1}}, 0
    )
    assert default_key("m.f", {"s": {3, 1, 2}}, 0) == default_key(
        "m.f", {"s": {1, 2, 3}}, 0
    )


def test_long_default_keys_are_hashed() -> None:
    """A long argument list is replaced by its SHA-256, keeping keys short."""
    key = default_key("m.f", {"v": "x" * 1000}, 0)
    assert key.startswith("m.f:sha256=")
    assert len(key) < 100
    assert key != default_key("m.f", {"v": "x" * 1001}, 0)


def test_unserialisable_argument_needs_a_template() -> None:
    """An argument with no stable form makes the default key fail loudly."""
    with pytest.raises(ConfigurationError, match="key template"):
        default_key("m.f", {"v": object()}, 0)


async def _method(self: object, user_id: str, limit: int = 10) -> None:
    """A function shaped like a method."""


def test_default_key_skips_self() -> None:
    """The default key leaves out a leading `self`, so instances share entries."""
    make = key_function(_method, None)
    assert make((object(), "u"), {}) == make((object(), "u"), {})
    assert make((object(), "u"), {}) == make((object(),), {"user_id": "u"})
    assert make((None, "u"), {}) != make((None, "u", 11), {})


def test_template_keys_read_like_fstrings() -> None:
    """A template key equals the f-string with the same text."""
    make = key_function(_method, "user:{user_id}:{limit}")
    assert make((None, "u1"), {}) == "user:u1:10"
    assert make((None,), {"user_id": "u1", "limit": 3}) == "user:u1:3"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("user:{missing}", "'missing'"),
        ("user:{}", "must name arguments"),
        ("user:{0}", "must name arguments"),
        ("user:{user_id", "invalid"),
    ],
)
def test_bad_templates_fail_at_decoration(template: str, problem: str) -> None:
    """A template naming a missing argument (or malformed) fails at once."""
    with pytest.raises(ConfigurationError, match=problem):
        key_function(_method, template)


async def _complex(a: int, /, b: int, *args: int, c: int = 3, **kw: int) -> None:
    """Positional-only and variadic parameters."""


async def _plain(a: int, b: int = 2, *, c: int, d: int = 4) -> None:
    """Plain and keyword-only parameters."""


@pytest.mark.parametrize(
    ("func", "args", "kwargs"),
    [
        (_plain, (1,), {"c": 3}),
        (_plain, (1, 5), {"c": 3, "d": 0}),
        (_plain, (), {"a": 1, "c": 3}),
        (_complex, (1, 2, 9, 9), {"x": 1}),
        (_complex, (1,), {"b": 2, "c": 5}),
    ],
)
def test_binder_agrees_with_signature_bind(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """The fast binder returns what `inspect.Signature.bind` would."""
    signature = inspect.signature(func)
    expected = signature.bind(*args, **kwargs)
    expected.apply_defaults()
    assert ArgumentBinder(signature).bind(args, kwargs) == dict(expected.arguments)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1,), {}),
        ((1, 2, 3), {"c": 1}),
        ((1,), {"a": 1, "c": 3}),
        ((1,), {"c": 1, "z": 2}),
    ],
)
def test_binder_rejects_bad_calls_like_a_call_would(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Missing, duplicate or unknown arguments raise `TypeError`."""
    with pytest.raises(TypeError):
        ArgumentBinder(inspect.signature(_plain)).bind(args, kwargs)


async def _nested(user: Point, ids: list[int]) -> None:
    """Arguments reached into by a template."""


def test_templates_reach_into_arguments() -> None:
    """`{user.x}` and `{ids[0]}` work as in an f-string; the root is checked."""
    make = key_function(_nested, "p:{user.x}:{ids[1]}")
    assert make((Point(x=4), [7, 8]), {}) == "p:4:8"
    with pytest.raises(ConfigurationError, match="'usr'"):
        key_function(_nested, "p:{usr.x}")


def _tenant_calls(
    tenants: TenantAwareCacheManager, tenant: Any
) -> list[Callable[[], Awaitable[object]]]:
    """One call of each TenantAwareCacheManager method for `tenant`."""

    async def build() -> int:
        return 1

    return [
        lambda: tenants.get("k", tenant_id=tenant),
        lambda: tenants.set("k", 1, tenant_id=tenant),
        lambda: tenants.exists("k", tenant_id=tenant),
        lambda: tenants.delete("k", tenant_id=tenant),
        lambda: tenants.get_many(["k"], tenant_id=tenant),
        lambda: tenants.set_many({"k": 1}, tenant_id=tenant),
        lambda: tenants.delete_many(["k"], tenant_id=tenant),
        lambda: tenants.get_or_set("k", build, tenant_id=tenant),
        lambda: tenants.invalidate_namespace("ns", tenant_id=tenant),
        lambda: tenants.invalidate_tenant(tenant),
    ]


@pytest.mark.parametrize("bad", [*HOSTILE_IDS, "", " acme", "acme\n"])
async def test_cache_tenant_ids_follow_the_tenancy_rules(bad: object) -> None:
    """Each tenant cache method refuses what tenant_scope() refuses; nothing written."""
    backend = MemoryBackend()
    tenants = TenantAwareCacheManager(create_cache_service(backend))
    for call in _tenant_calls(tenants, bad):
        with pytest.raises(ValidationError) as info:
            await call()
        assert info.value.field == "tenant_id"
    assert len(backend) == 0


async def test_cache_tenant_ids_are_keyed_by_their_plain_text() -> None:
    """A str subclass id reaches the same keys as its plain string, nothing else."""

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

        def __str__(self) -> str:
            return "other"

    tenants = TenantAwareCacheManager(create_cache_service(MemoryBackend()))
    for good in ["acme", "café", "a:b{c}*", "acme corp", "x" * 64]:
        await tenants.set("k", good, tenant_id=good)
        assert await tenants.get("k", tenant_id=good) == good
    await tenants.set("k", "sneaky", tenant_id=Sneaky("acme"))
    assert await tenants.get("k", tenant_id="acme") == "sneaky"
    assert await tenants.get("k", tenant_id="other") is None
