"""The Redis fixtures themselves: a reachable server and a working cluster."""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from ..redis_servers import RedisCluster


async def test_redis_prefix_keys_are_removed(redis_url: str, redis_prefix: str) -> None:
    """The shared server answers, and the per-test prefix is unique."""
    client = redis.Redis.from_url(redis_url)
    try:
        await client.set(f"{redis_prefix}k", "v")
        assert await client.get(f"{redis_prefix}k") == b"v"
    finally:
        await client.aclose()


async def test_cluster_serves_every_slot(redis_cluster: RedisCluster) -> None:
    """The throwaway cluster has 3 masters and answers on every slot."""
    assert len(redis_cluster.masters()) == 3
    client = ClusterClient.from_url(redis_cluster.urls[0])
    try:
        for i in range(20):
            await client.set(f"smoke:{i}", i)
        assert await client.get("smoke:7") == b"7"
    finally:
        await client.aclose()
