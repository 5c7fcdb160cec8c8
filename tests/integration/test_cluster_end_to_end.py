"""Cache, tenant cache manager and rate limiter together on the 6-node cluster.

What the servers say, not what the client believes:

- every key of one tenant (entries, generations, namespaces, the tenant's
  rate limits) is in one slot, by `CLUSTER KEYSLOT` on the keys a `SCAN` of
  every master finds;
- no multi-key command crossed slots: no node's `CROSSSLOT` count in
  `INFO errorstats` moves, and with `fail_open=False` a client-side refusal
  (`RedisClusterException`) would have raised;
- a master killed under a concurrent workload costs no call an error: the
  cache computes, the rate limiter lets calls through (`fail_open=True`), and
  the same objects serve from Redis again after the failover.

The cluster is the session's shared one. The failover test kills a master
that has a linked replica and waits for a healthy cluster before it ends, as
`test_cache_cluster_failover` does, so the two run in either order.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from dotmac_core import CacheConfig, RateLimitExceededError, tenant_scope
from dotmac_core import _ratelimit_redis as redis_store
from dotmac_core.cache import (
    TenantAwareCacheManager,
    cached,
    create_cache_service,
)
from dotmac_core.ratelimit import close_rate_limiters, rate_limit, rate_limit_fail_opens
from dotmac_core.tenancy import get_current_tenant

from ..redis_servers import ClusterNode, RedisCluster

pytestmark = pytest.mark.redis

T = TypeVar("T")

#: Seconds the whole outage may last before the failover test gives up.
RECOVERY_LIMIT = 60.0
#: Deadline of one call during the failover; calls stay far below it.
CALL_DEADLINE = 5.0
#: Tenants per master, so every master (the killed one too) serves some.
TENANTS_PER_MASTER = 3
#: Concurrent tasks of the failover workload.
TASKS = 4

_TENANT_TAG = re.compile(rb"#tenant:\{([^}]*)\}")
_LIMIT_TAG = re.compile(rb"ratelimit:\{([^}]*)\}")
_CROSSSLOT = re.compile(r"errorstat_CROSSSLOT:count=(\d+)")


class Workload:
    """An application on the cluster: a cache, its tenant manager, two limits.

    Every function records its runs in `computed`, so a test tells a value
    computed (a miss, or the cache failing open) from a hit.
    """

    def __init__(self, urls: list[str], prefix: str, *, fail_open: bool) -> None:
        config = CacheConfig(
            key_prefix=prefix,
            fail_open=fail_open,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            circuit_breaker_reset=0.5,
        )
        self.prefix = prefix
        self.cache = create_cache_service("redis-cluster", url=urls, config=config)
        self.tenants = TenantAwareCacheManager(self.cache)
        self.computed: Counter[str] = Counter()
        computed = self.computed

        @cached(ttl=300, key="profile:{n}", cache=self.cache, tenant=True)
        async def profile(n: int) -> dict[str, int]:
            computed[f"{get_current_tenant()}:profile:{n}"] += 1
            return {"n": n}

        @cached(ttl=300, key="report:{n}", cache=self.tenants, namespace="reports")
        async def report(n: int) -> dict[str, int]:
            computed[f"{get_current_tenant()}:report:{n}"] += 1
            await asyncio.sleep(0.01)  # concurrent misses overlap: single flight
            return {"n": n}

        @cached(ttl=300, key="item:{n}", cache=self.cache, namespace="items", lock=True)
        async def item(n: int) -> dict[str, int]:
            computed[f"item:{n}"] += 1
            return {"n": n}

        # Named by the tenant id: its counters share the tenant's slot.
        @rate_limit(1_000_000, 60, key=lambda t: t, backend=self.cache, fail_open=True)
        async def quota(tenant: str) -> str:
            return tenant

        @rate_limit(2, 60, key=lambda t: t, backend=self.cache, fail_open=False)
        async def strict(tenant: str) -> str:
            return tenant

        self.profile, self.report, self.item = profile, report, item
        self.quota, self.strict = quota, strict

    async def aclose(self) -> None:
        """Remove this run's keys and close every client it opened."""
        try:
            await self.cache.clear()
        finally:
            await self.cache.aclose()
            await close_rate_limiters()
            settings = redis_store.RedisSettings.from_config(self.cache.config)
            redis_store._STORES.pop(settings, None)


def _prefix() -> str:
    return f"dotmac-test:{uuid.uuid4().hex[:12]}:"


async def _spread_tenants(urls: list[str], prefix: str) -> dict[str, int]:
    """`TENANTS_PER_MASTER` tenant ids per master: {tenant: port of its master}."""
    client = ClusterClient.from_url(urls[0])
    try:
        await client.initialize()
        chosen: dict[str, int] = {}
        per_port: Counter[int] = Counter()
        masters = len({n.port for n in client.get_primaries()})
        for n in range(1000):
            tenant = f"t{n}"
            port = client.get_node_from_key(f"{prefix}#tenant:{{{tenant}}}").port
            if per_port[port] < TENANTS_PER_MASTER:
                per_port[port] += 1
                chosen[tenant] = port
            if len(chosen) == masters * TENANTS_PER_MASTER:
                return chosen
    finally:
        await client.aclose()
    msg = "could not spread tenants over the masters"
    raise AssertionError(msg)


async def _keys_by_slot(cluster: RedisCluster, prefix: str) -> dict[bytes, int]:
    """Every key under `prefix` on every master, with the server's `CLUSTER KEYSLOT`."""
    slots: dict[bytes, int] = {}
    for node in cluster.masters():
        client = redis.Redis.from_url(node.url)
        try:
            async for key in client.scan_iter(match=f"{prefix}*", count=1000):
                slots[key] = int(
                    await client.execute_command("CLUSTER", "KEYSLOT", key)
                )
        finally:
            await client.aclose()
    return slots


def _crossslot_errors(cluster: RedisCluster) -> dict[int, int]:
    """`CROSSSLOT` errors each live node has answered so far, by port."""
    counts = {}
    for node in cluster.nodes:
        if node.is_alive():
            found = _CROSSSLOT.search(node.cli("info", "errorstats"))
            counts[node.port] = int(found.group(1)) if found else 0
    return counts


async def _exercise_tenant(w: Workload, tenant: str) -> None:
    """Every operation of the tenant manager, `@cached` and a limit, for one tenant."""
    tenants = w.tenants
    await tenants.set("seen", 1, tenant_id=tenant)
    assert await tenants.get("seen", tenant_id=tenant) == 1
    assert await tenants.exists("seen", tenant_id=tenant)
    await tenants.set_many({"a": 1, "b": 2, "c": 3}, tenant_id=tenant)
    found = await tenants.get_many(["a", "b", "c", "absent"], tenant_id=tenant)
    assert found == {"a": 1, "b": 2, "c": 3}
    await tenants.delete_many(["a", "b"], tenant_id=tenant)
    await tenants.delete("c", tenant_id=tenant)
    assert await tenants.get_many(["a", "b", "c"], tenant_id=tenant) == {}

    # A namespace of the tenant, invalidated in one write.
    await tenants.set_many({"x": 1, "y": 2}, tenant_id=tenant, namespace="pairs")
    assert await tenants.get("x", tenant_id=tenant, namespace="pairs") == 1
    await tenants.invalidate_namespace("pairs", tenant_id=tenant)
    assert await tenants.get_many(["x", "y"], tenant_id=tenant, namespace="pairs") == {}

    # Read-through: single flight in the process, and the cross-process lock.
    runs = Counter[str]()

    async def build() -> str:
        runs["build"] += 1
        await asyncio.sleep(0.02)
        return "built"

    values = await asyncio.gather(
        *(tenants.get_or_set("built", build, tenant_id=tenant) for _ in range(5))
    )
    assert values == ["built"] * 5
    assert (
        await tenants.get_or_set("locked", build, lock=True, tenant_id=tenant)
        == "built"
    )
    assert runs["build"] == 2

    with tenant_scope(tenant):
        results = await asyncio.gather(*(w.report(1) for _ in range(5)), w.profile(1))
        assert results == [{"n": 1}] * 6
        assert w.computed[f"{tenant}:report:1"] == 1  # five callers, one run
        await w.profile.invalidate(1)
        assert await w.profile(1) == {"n": 1}
        assert w.computed[f"{tenant}:profile:1"] == 2

    # Clearing the tenant: one write, every entry a miss.
    await tenants.invalidate_tenant(tenant_id=tenant)
    assert await tenants.get("seen", "gone", tenant_id=tenant) == "gone"
    assert await tenants.get_or_set("built", build, tenant_id=tenant) == "built"

    assert await w.quota(tenant) == tenant
    assert await w.strict(tenant) == tenant


async def _exercise_shared(w: Workload) -> None:
    """The plain service's multi-key operations, on keys spread over every slot."""
    cache = w.cache
    mapping = {f"k{n}": n for n in range(40)}
    await cache.set_many(mapping)
    assert await cache.get_many([*mapping, "absent"]) == mapping
    await cache.set_many(mapping, namespace="spread")
    assert await cache.get_many(mapping, namespace="spread") == mapping
    await cache.invalidate_namespace("spread")
    assert await cache.get_many(mapping, namespace="spread") == {}
    await cache.delete_many(mapping)
    assert await cache.get_many(mapping) == {}
    # A namespaced @cached with the lock: generation, entry and lock keys sit
    # in three slots; single flight and the lock must not send them together.
    results = await asyncio.gather(*(w.item(n % 5) for n in range(20)))
    assert results == [{"n": n % 5} for n in range(20)]
    await w.item.invalidate(0)
    assert await w.item(0) == {"n": 0}


@pytest.fixture
async def workload(redis_cluster: RedisCluster) -> AsyncIterator[Workload]:
    """A fail-closed workload on the healthy cluster: any Redis error raises."""
    await asyncio.to_thread(redis_cluster.wait_healthy)
    w = Workload(redis_cluster.urls, _prefix(), fail_open=False)
    yield w
    await w.aclose()


async def test_each_tenants_keys_share_one_slot(
    workload: Workload, redis_cluster: RedisCluster
) -> None:
    """SCAN every master: a tenant's keys, and a limit's keys, are in one slot."""
    tenants = await _spread_tenants(redis_cluster.urls, workload.prefix)
    for tenant in tenants:
        await _exercise_tenant(workload, tenant)
    await _exercise_shared(workload)
    for tenant in tenants:  # live entries, beside the generations, to scan
        await workload.tenants.set("kept", 1, tenant_id=tenant, namespace="ns")
        await workload.tenants.set("kept", 1, tenant_id=tenant)

    slots = await _keys_by_slot(redis_cluster, workload.prefix)
    tenant_slots: dict[bytes, set[int]] = {}
    tenant_keys: Counter[bytes] = Counter()
    limit_slots: dict[bytes, set[int]] = {}
    limit_keys: Counter[bytes] = Counter()
    for key, slot in slots.items():
        if found := _TENANT_TAG.search(key):
            tenant_slots.setdefault(found.group(1), set()).add(slot)
            tenant_keys[found.group(1)] += 1
        elif found := _LIMIT_TAG.search(key):
            limit_slots.setdefault(found.group(1), set()).add(slot)
            limit_keys[found.group(1)] += 1

    names = {t.encode() for t in tenants}
    assert set(tenant_slots) == names
    assert set(limit_slots) == names
    for name in names:
        # Generation, a namespace's generation, entries: several keys, one slot.
        assert tenant_keys[name] >= 4, tenant_keys
        assert len(tenant_slots[name]) == 1, (name, tenant_slots[name])
        # Two limits under the tenant's name: both keys, and in the tenant's slot.
        assert limit_keys[name] == 2, limit_keys
        assert limit_slots[name] == tenant_slots[name]
    # The tenants really are spread: each master serves some of them.
    assert len({slot for s in tenant_slots.values() for slot in s}) == len(names)
    assert workload.cache.fail_opens.count == 0


async def test_no_multi_key_command_crosses_slots(
    workload: Workload, redis_cluster: RedisCluster
) -> None:
    """Every multi-key operation, then `clear()`: no node answered CROSSSLOT."""
    # The counter counts: a cross-slot MGET sent by hand is one CROSSSLOT error.
    node = redis_cluster.masters()[0]
    before_probe = _crossslot_errors(redis_cluster)
    assert "CROSSSLOT" in node.cli("mget", "{a}1", "{b}2")
    assert _crossslot_errors(redis_cluster)[node.port] == before_probe[node.port] + 1

    before = _crossslot_errors(redis_cluster)
    limits_before = rate_limit_fail_opens().count
    tenants = await _spread_tenants(redis_cluster.urls, workload.prefix)
    # Tenants at once as well as one by one: the cluster client's fan-out
    # (mget_nonatomic, pipelines, split UNLINK) under concurrency.
    await asyncio.gather(*(_exercise_tenant(workload, t) for t in list(tenants)[:3]))
    for tenant in list(tenants)[3:]:
        await _exercise_tenant(workload, tenant)
    await _exercise_shared(workload)
    assert await _keys_by_slot(redis_cluster, workload.prefix)
    await workload.cache.clear()  # SCAN every master, UNLINK split per slot
    assert await _keys_by_slot(redis_cluster, workload.prefix) == {}

    assert _crossslot_errors(redis_cluster) == before
    # Nothing fell open: the cache and `strict` would have raised, `quota`
    # would have counted the call it let through.
    assert workload.cache.fail_opens.count == 0
    assert rate_limit_fail_opens().count == limits_before


def _has_linked_replica(node: ClusterNode) -> bool:
    info = node.cli("info", "replication")
    return "connected_slaves:1" in info and "state=online" in info


@dataclass
class Live:
    """The failover workload's state: call errors, and full rounds completed."""

    errors: list[BaseException] = field(default_factory=list)
    rounds: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def _bounded(call: Awaitable[T]) -> T:
    with anyio.fail_after(CALL_DEADLINE):  # a deadline only; calls stay far below
        return await call


async def _serve(w: Workload, tenant: str, n: int) -> None:
    """One request's calls: a miss may happen (failing open), a wrong value not."""
    with tenant_scope(tenant):
        assert await _bounded(w.profile(n % 4)) == {"n": n % 4}
        assert await _bounded(w.report(n % 4)) == {"n": n % 4}
    assert await _bounded(w.item(n % 8)) == {"n": n % 8}
    await _bounded(w.tenants.set("seen", n, tenant_id=tenant))
    seen = await _bounded(w.tenants.get("seen", tenant_id=tenant))
    assert seen is None or isinstance(seen, int)
    found = await _bounded(w.tenants.get_many(["seen", "absent"], tenant_id=tenant))
    assert set(found) <= {"seen"}
    assert await _bounded(w.quota(tenant)) == tenant  # let through if unchecked


async def _loop(w: Workload, tenants: list[str], live: Live, offset: int) -> None:
    n = offset
    while not live.stop.is_set():
        try:
            for tenant in tenants:
                n += 1
                await _serve(w, tenant, n)
                # Calls that fail open never suspend: let the other tasks run.
                await asyncio.sleep(0)
            live.rounds += 1
        except Exception as exc:  # noqa: BLE001 - collected, the test fails on it
            live.errors.append(exc)
            return


async def _served_by_redis(
    w: Workload, tenants: list[str], on_victim: list[str]
) -> bool:
    """One full round in which no call fell open, and the victim's keys are back."""
    cache_before = w.cache.fail_opens.count
    limits_before = rate_limit_fail_opens().count
    for n, tenant in enumerate(tenants):
        await _serve(w, tenant, n)
    present = [await w.tenants.exists("seen", tenant_id=t) for t in on_victim]
    return (
        all(present)
        and w.cache.fail_opens.count == cache_before
        and rate_limit_fail_opens().count == limits_before
    )


async def test_a_master_killed_mid_run_costs_no_call_an_error(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Cache, tenant manager and limits under load through a failover, then recovery."""
    await asyncio.to_thread(redis_cluster.wait_healthy)
    candidates = [n for n in redis_cluster.masters() if _has_linked_replica(n)]
    if not candidates:
        pytest.skip("no master with a linked replica is left in the shared cluster")
    victim = candidates[0]
    # The victim is the first startup node of both clients: the one they were
    # introduced to dies, and they must find the rest of the cluster alone.
    urls = [victim.url, *(u for u in redis_cluster.urls if u != victim.url)]
    w = Workload(urls, _prefix(), fail_open=True)
    placed = await _spread_tenants(urls[1:], w.prefix)
    tenants = list(placed)
    on_victim = [t for t, port in placed.items() if port == victim.port]
    live = Live()
    tasks: list[asyncio.Task[None]] = []
    try:
        with caplog.at_level(logging.INFO, logger="dotmac_core"):
            assert await _served_by_redis(w, tenants, on_victim)  # warm, all cached
            tasks = [
                asyncio.create_task(_loop(w, tenants, live, i * 1000))
                for i in range(TASKS)
            ]
            cache_before = w.cache.fail_opens.count
            limits_before = rate_limit_fail_opens().count
            redis_cluster.kill_master(victim)
            deadline = time.monotonic() + RECOVERY_LIMIT
            recovered = False
            while not recovered and not live.errors and time.monotonic() < deadline:
                recovered = await _served_by_redis(w, tenants, on_victim)
            live.stop.set()
            await asyncio.gather(*tasks)
        assert live.errors == []
        assert recovered, "calls were still served without Redis"
        # The outage was seen: calls on the dead master fell open, and ran.
        assert w.cache.fail_opens.count > cache_before
        assert rate_limit_fail_opens().count > limits_before
        assert live.rounds > 0

        # The same objects cache again: a second round is all hits...
        for n, tenant in enumerate(tenants):
            await _serve(w, tenant, n)
        computed = Counter(w.computed)
        for n, tenant in enumerate(tenants):
            await _serve(w, tenant, n)
        assert w.computed == computed
        # ... and count again: a limit of 2 on the dead master's slots refuses.
        tenant = on_victim[0]
        assert await w.strict(tenant) == tenant
        assert await w.strict(tenant) == tenant
        with pytest.raises(RateLimitExceededError):
            await w.strict(tenant)

        # One warning per outage and per component, not one per failed call.
        warned = Counter(
            r.name
            for r in caplog.records
            if r.levelno == logging.WARNING
            and r.name != "dotmac_core.ratelimit.fail_open"
        )
        assert warned == {"dotmac_core.cache": 1, "dotmac_core.ratelimit": 1}
    finally:
        live.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(redis_cluster.wait_healthy, RECOVERY_LIMIT)
        await w.aclose()
