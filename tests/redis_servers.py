"""Redis fixtures: the shared server, and a throwaway 6-node Redis Cluster.

Imported by `tests/conftest.py`. The cluster (3 masters + 3 replicas) runs on
free loopback ports in a temporary folder and is stopped at the end of the
session; tests may kill one of its masters (`RedisCluster.kill_master`).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("DOTMAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_NODES = 6


def _unavailable(what: str, url: str, exc: BaseException | str) -> None:
    from .conftest import service_unavailable

    if isinstance(exc, str):
        exc = RuntimeError(exc)
    service_unavailable(what, url, exc)


@pytest.fixture(scope="session")
async def redis_url() -> str:
    """URL of the shared Redis server, checked to answer PING."""
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable server
        _unavailable("Redis", REDIS_URL, exc)
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    import redis.asyncio as redis

    prefix = f"dotmac-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class ClusterNode:
    """One redis-server process of the test cluster."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """The node's `redis://` URL."""
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        """Run `redis-cli` against this node and return its output."""
        result = subprocess.run(  # noqa: S603 - fixed tool, our own arguments
            ["redis-cli", "-p", str(self.port), *args],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.replace("\r", "")

    def is_alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None


@dataclass
class RedisCluster:
    """A running local Redis Cluster: its nodes and startup URLs."""

    nodes: list[ClusterNode]
    directory: Path
    killed: list[ClusterNode] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        """Startup node URLs of the live nodes."""
        return [node.url for node in self.nodes if node.is_alive()]

    def masters(self) -> list[ClusterNode]:
        """The live nodes that currently serve slots as masters."""
        return [
            node
            for node in self.nodes
            if node.is_alive() and "role:master" in node.cli("info", "replication")
        ]

    def kill_master(self, node: ClusterNode | None = None) -> ClusterNode:
        """SIGKILL a master (the first, unless given) and return it."""
        target = node or self.masters()[0]
        target.process.kill()
        target.process.wait(timeout=10)
        self.killed.append(target)
        return target

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until the cluster is ok and every live replica is linked."""
        deadline = time.monotonic() + timeout
        live = [node for node in self.nodes if node.is_alive()]
        while time.monotonic() < deadline:
            infos = [node.cli("cluster", "info") for node in live]
            replication = [node.cli("info", "replication") for node in live]
            state_ok = all("cluster_state:ok" in info for info in infos)
            linked = all(
                "role:master" in rep or "master_link_status:up" in rep
                for rep in replication
            )
            if state_ok and linked:
                return
            time.sleep(0.2)
        msg = "Redis Cluster did not become healthy in time"
        raise TimeoutError(msg)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Consecutive-free ports whose cluster bus ports (+10000) are free too."""
    for _ in range(200):
        base = random.randint(20000, 29000)  # noqa: S311 - not security related
        ports = list(range(base, base + count))
        if all(_port_free(p) and _port_free(p + 10000) for p in ports):
            return ports
    msg = "no free port range for the Redis Cluster"
    raise RuntimeError(msg)


def _start_node(directory: Path, port: int) -> ClusterNode:
    node_dir = directory / str(port)
    node_dir.mkdir(parents=True)
    config = node_dir / "redis.conf"
    config.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                "cluster-enabled yes",
                f"cluster-config-file nodes-{port}.conf",
                "cluster-node-timeout 2000",
                "appendonly no",
                'save ""',
                f"dir {node_dir}",
                "daemonize no",
                f"logfile {node_dir / 'redis.log'}",
            ]
        )
        + "\n"
    )
    process = subprocess.Popen(  # noqa: S603 - fixed tool, our own config file
        ["redis-server", str(config)],  # noqa: S607
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return ClusterNode(port=port, process=process)


def _wait_pings(nodes: list[ClusterNode], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        while "PONG" not in node.cli("ping"):
            if time.monotonic() > deadline or not node.is_alive():
                msg = f"redis-server on port {node.port} did not start"
                raise RuntimeError(msg)
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisCluster]:
    """A 3-master, 3-replica Redis Cluster on free loopback ports, for the session."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unavailable("Redis Cluster", "redis-server", "redis-server is not installed")
    directory = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(CLUSTER_NODES)
    nodes = [_start_node(directory, port) for port in ports]
    cluster = RedisCluster(nodes=nodes, directory=directory)
    try:
        _wait_pings(nodes)
        create = subprocess.run(  # noqa: S603 - fixed tool, our own ports
            [  # noqa: S607
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{port}" for port in ports],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            msg = f"redis-cli --cluster create failed: {create.stdout}{create.stderr}"
            raise RuntimeError(msg)
        cluster.wait_healthy()
        yield cluster
    finally:
        for node in nodes:
            if node.is_alive():
                node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
