"""Cache hits: `@cached` against a bare read and decode of the same 1 KB value.

- Redis (with `--redis`): `@cached` on a Redis `CacheService` against redis-py
  `GET` + `json.loads` (the value stored as plain JSON under its own key).
- Memory (always): `@cached` on the memory backend against `json.loads` of
  bytes held in a dict, the floor any in-process cache sits on.

Every call is a hit: each function is called once before timing, so the
entry exists; one task calls in a loop.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from dotmac_core import CacheConfig, cached, create_cache_service

from ._harness import Operation, loop

if TYPE_CHECKING:
    from dotmac_core import CacheService

__all__ = ["cache_memory", "cache_redis", "value_1kb"]


def value_1kb() -> dict[str, Any]:
    """Return the cached value: an order with 11 lines, 957 bytes of JSON."""
    return {
        "id": str(uuid.UUID(int=7)),
        "customer": "Ada Lovelace",
        "status": "open",
        "items": [
            {
                "sku": f"SKU-{i:05d}",
                "title": f"Product number {i}",
                "quantity": i,
                "price_cents": 999,
            }
            for i in range(11)
        ],
    }


def _compact(value: dict[str, Any]) -> bytes:
    """Return `value` as compact JSON: the same bytes the cache stores."""
    return json.dumps(value, separators=(",", ":")).encode()


def _cached_call(service: CacheService, key: str) -> Any:
    @cached(ttl=3600, key=key, cache=service)
    async def read_order() -> dict[str, Any]:
        return value_1kb()

    return read_order


async def cache_memory() -> Operation:
    """`@cached` hit on the memory backend vs `json.loads` from a dict."""
    prefix = f"dotmac-bench:{uuid.uuid4().hex[:8]}:"
    service = create_cache_service("memory", config=CacheConfig(key_prefix=prefix))
    read_order = _cached_call(service, "bench:order")
    await read_order()  # fill the entry
    store = {"order": _compact(value_1kb())}

    async def raw_call(_: int) -> None:
        json.loads(store["order"])

    async def dotmac_call(_: int) -> None:
        await read_order()

    return Operation(
        key="cache_memory",
        title="cached hit, 1 KB, memory backend",
        runs={"raw": loop(raw_call), "dotmac": loop(dotmac_call)},
        what={
            "raw": "`json.loads(store[key])` from a dict",
            "dotmac": "`@cached(key=...)` function on a memory `CacheService`",
        },
        close=[service.aclose],
    )


async def cache_redis(url: str) -> tuple[Operation, str]:
    """`@cached` hit on Redis vs redis-py `GET` + `json.loads`; and Redis's version."""
    import redis.asyncio as redis_asyncio  # imported here: only --redis runs need it

    prefix = f"dotmac-bench:{uuid.uuid4().hex[:8]}:"
    service = create_cache_service(
        "redis", url=url, config=CacheConfig(key_prefix=prefix)
    )
    client = redis_asyncio.Redis.from_url(url)
    raw_key = f"{prefix}raw-order"
    await client.set(raw_key, _compact(value_1kb()), ex=3600)
    read_order = _cached_call(service, "bench:order")
    await read_order()  # fill the entry
    version = str((await client.info("server"))["redis_version"])

    async def raw_call(_: int) -> None:
        json.loads(await client.get(raw_key) or b"null")

    async def dotmac_call(_: int) -> None:
        await read_order()

    async def close() -> None:
        await service.clear()
        await client.delete(raw_key)
        await client.aclose()
        await service.aclose()

    op = Operation(
        key="cache_redis",
        title="cached hit, 1 KB, Redis",
        runs={"raw": loop(raw_call), "dotmac": loop(dotmac_call)},
        what={
            "raw": "redis-py `GET` + `json.loads`",
            "dotmac": "`@cached(key=...)` function on a Redis `CacheService`",
        },
        close=[close],
    )
    return op, version
