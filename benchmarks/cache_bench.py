"""Cost of a `@cached` hit against a bare redis-py GET + JSON decode of the same value.

Run it with a Redis server at hand:

    python -m benchmarks.cache_bench --redis redis://127.0.0.1:6379/0

Every variant reads the same ~1 KB JSON value. The variants are timed in
interleaved rounds (each round runs every variant once, in a rotating order),
so drift in the machine's load hits them all alike; the table shows the median
of the rounds, in microseconds per call, and the ratio to the bare redis-py
baseline. Two loads: one task calling in a loop (latency, dominated by the
round trip), and many tasks at once (where the Python work per call shows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as redis_asyncio
from pydantic import BaseModel

from dotmac_core import CacheConfig
from dotmac_core.cache import CacheService, cached, create_cache_service


class Item(BaseModel):
    """One line of the benchmark value."""

    sku: str
    title: str
    quantity: int
    price_cents: int


class Order(BaseModel):
    """The benchmark value: about 1 KB of JSON."""

    id: str
    customer: str
    status: str
    items: list[Item]


def _order() -> Order:
    items = [
        Item(
            sku=f"SKU-{i:05d}", title=f"Product number {i}", quantity=i, price_cents=999
        )
        for i in range(11)
    ]
    return Order(
        id=str(uuid.UUID(int=7)), customer="Ada Lovelace", status="open", items=items
    )


Call = Callable[[], Awaitable[Any]]


def _variants(
    bare: redis_asyncio.Redis, raw_key: str, remote: CacheService, local: CacheService
) -> dict[str, Call]:
    @cached(ttl=3600, key="bench:dict", cache=remote)
    async def redis_dict() -> dict[str, Any]:
        return _order().model_dump()

    @cached(ttl=3600, key="bench:model", cache=remote)
    async def redis_model() -> Order:
        return _order()

    @cached(ttl=3600, key="bench:dict", cache=local)
    async def memory_dict() -> dict[str, Any]:
        return _order().model_dump()

    async def bare_json() -> Any:
        return json.loads(await bare.get(raw_key))

    async def bare_model() -> Order:
        return Order.model_validate_json(await bare.get(raw_key))

    return {
        "redis-py GET + json.loads (baseline)": bare_json,
        "@cached hit, Redis, -> dict": redis_dict,
        "redis-py GET + Order.model_validate_json": bare_model,
        "@cached hit, Redis, -> Order (pydantic)": redis_model,
        "@cached hit, memory, -> dict": memory_dict,
    }


async def _time(call: Call, calls: int, tasks: int) -> float:
    """Microseconds per call for `calls` calls spread over `tasks` tasks."""
    per_task = calls // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return (time.perf_counter() - start) / (per_task * tasks) * 1e6


async def _measure(
    variants: dict[str, Call], rounds: int, calls: int, tasks: int
) -> dict[str, float]:
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm up: fill the caches, open the connections
        await _time(variants[name], max(tasks, 50), tasks)
    for round_no in range(rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(await _time(variants[name], calls, tasks))
    return {name: statistics.median(values) for name, values in samples.items()}


def _table(title: str, medians: dict[str, float]) -> str:
    baseline = next(iter(medians.values()))
    lines = [
        f"**{title}**",
        "",
        "| variant | median µs/call | ratio to baseline |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {value:.1f} | {value / baseline:.2f} |"
        for name, value in medians.items()
    ]
    return "\n".join(lines)


async def run(url: str, rounds: int, calls: int, tasks: int) -> None:
    """Run the benchmark against the Redis server at `url` and print a table."""
    prefix = f"dotmac-bench:{uuid.uuid4().hex[:8]}:"
    remote = create_cache_service(
        "redis", url=url, config=CacheConfig(key_prefix=prefix, max_connections=tasks)
    )
    local = create_cache_service("memory", config=CacheConfig(key_prefix=prefix))
    bare = redis_asyncio.Redis.from_url(url, max_connections=tasks)
    raw_key = f"{prefix}raw"
    value = _order().model_dump_json().encode()
    await bare.set(raw_key, value)
    try:
        variants = _variants(bare, raw_key, remote, local)
        server = (await bare.info("server"))["redis_version"]
        one = await _measure(variants, rounds, calls, 1)
        many = await _measure(variants, rounds, calls, tasks)
    finally:
        await remote.clear()
        await bare.delete(raw_key)
        await bare.aclose()
        await remote.aclose()
    print(
        f"value: {len(value)} bytes of JSON; {rounds} interleaved rounds of "
        f"{calls} calls; Python {platform.python_version()}, redis-py "
        f"{redis.__version__}, hiredis parser: {redis.utils.HIREDIS_AVAILABLE}, "
        f"Redis server {server}\n"
    )
    print(_table("1 task (latency)", one))
    print()
    print(_table(f"{tasks} concurrent tasks (per-call cost under load)", many))


def main() -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks")
    args = parser.parse_args()
    asyncio.run(run(args.redis, args.rounds, args.calls, args.tasks))


if __name__ == "__main__":
    main()
