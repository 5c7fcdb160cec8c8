"""Kill a Redis Cluster master mid-test: the cache keeps answering, then recovers.

The cluster is the session's shared one. The killed master stays dead; its
replica takes over its slots (cluster-node-timeout is 2 s, so failover takes a
few seconds). The test waits for a healthy cluster before it ends, so later
tests see all slots served.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from dotmac_core import CacheConfig
from dotmac_core.cache import cached, create_cache_service

from ..redis_servers import ClusterNode, RedisCluster

pytestmark = pytest.mark.redis

#: Seconds the whole outage may last before the test gives up.
RECOVERY_LIMIT = 60.0


def _has_linked_replica(node: ClusterNode) -> bool:
    info = node.cli("info", "replication")
    return "connected_slaves:1" in info and "state=online" in info


async def _owner_ports(urls: list[str], keys: list[str]) -> dict[str, int]:
    """Port of the master serving each key, asked of the cluster itself."""
    client = ClusterClient.from_url(urls[0])
    try:
        await client.initialize()
        return {key: client.get_node_from_key(key).port for key in keys}
    finally:
        await client.aclose()


async def test_cache_answers_through_a_master_failure_and_recovers(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Killing a master: every call still answers (fail open), then caching resumes."""
    await asyncio.to_thread(redis_cluster.wait_healthy)
    prefix = f"dotmac-test:{uuid.uuid4().hex[:12]}:"
    config = CacheConfig(
        key_prefix=prefix,
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        circuit_breaker_reset=0.5,
    )
    cache = create_cache_service("redis-cluster", url=redis_cluster.urls, config=config)
    calls: dict[str, int] = {}

    @cached(ttl=300, key="item:{n}", cache=cache)
    async def item(n: int) -> dict[str, int]:
        calls[str(n)] = calls.get(str(n), 0) + 1
        return {"n": n}

    numbers = list(range(30))
    owners = await _owner_ports(
        redis_cluster.urls, [f"{prefix}item:{n}" for n in numbers]
    )
    candidates = [
        node
        for node in redis_cluster.masters()
        if _has_linked_replica(node) and node.port in owners.values()
    ]
    if not candidates:
        pytest.skip("no master with a linked replica is left in the shared cluster")
    victim = candidates[0]
    on_victim = [n for n in numbers if owners[f"{prefix}item:{n}"] == victim.port]

    try:
        for n in numbers:
            assert await item(n) == {"n": n}
        assert all(count == 1 for count in calls.values())  # all cached now

        with caplog.at_level(logging.INFO, logger="dotmac_core.cache"):
            redis_cluster.kill_master(victim)
            deadline = time.monotonic() + RECOVERY_LIMIT
            recovered = False
            while time.monotonic() < deadline and not recovered:
                for n in numbers:
                    with anyio.fail_after(2):  # a deadline; calls stay well below
                        assert await item(n) == {"n": n}
                # Recovered once the entries of the dead master's keys can be
                # written and read again (on the promoted replica).
                present = [await cache.exists(f"item:{n}") for n in on_victim]
                recovered = all(present)
                await asyncio.sleep(0.2)
        assert recovered, "the cache did not recover after the failover"
        # Keys on the dead master were recomputed (fail open), not lost calls.
        assert all(calls[str(n)] >= 2 for n in on_victim)

        # After recovery every call is a hit again.
        before = dict(calls)
        for n in numbers:
            assert await item(n) == {"n": n}
        assert calls == before
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # one per outage, not one per call
    finally:
        await asyncio.to_thread(redis_cluster.wait_healthy, RECOVERY_LIMIT)
        await cache.clear()
        await cache.aclose()
