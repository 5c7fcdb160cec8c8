"""A Redis Cluster master killed under load: how long calls fall open, what they cost.

Needs `redis-server` and `redis-cli` on the PATH:

    python -m benchmarks.cluster_failover --runs 3

Each run starts a fresh 6-node cluster (3 masters, 3 replicas) on free
loopback ports with `cluster-node-timeout` as given, runs `--tasks` tasks
that each call, per tenant in turn, a `@cached(tenant=True)` function, the
tenant manager's `get_many` and `set`, and a `@rate_limit` (on the cluster,
`fail_open=True`), then SIGKILLs a master that has a linked replica. A call
*falls open* when it is answered without Redis: a cache operation counted in
`CacheService.fail_opens`, a limit call in `rate_limit_fail_opens()`.

Reported per run: the failover time (from the kill to the last call that fell
open; after it every call was served by Redis), the time until the replica
served the dead master's slots (`CLUSTER SLOTS`, `cluster_state:ok`), how many
calls fell open, and p50 / p99 latency of the calls started before the kill,
during the failover and after.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import random
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from dotmac_core import CacheConfig, tenant_scope
from dotmac_core.cache import TenantAwareCacheManager, cached, create_cache_service
from dotmac_core.ratelimit import close_rate_limiters, rate_limit, rate_limit_fail_opens

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator

TENANTS = [f"tenant-{n}" for n in range(12)]


# --- the cluster ------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """`count` consecutive free ports whose bus ports (+10000) are free too."""
    for _ in range(200):
        base = random.randint(20000, 29000)
        ports = list(range(base, base + count))
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    msg = "no free port range for the cluster"
    raise RuntimeError(msg)


def _cli(port: int, *args: str) -> str:
    result = subprocess.run(  # noqa: S603 - fixed tool, our own arguments
        ["redis-cli", "-p", str(port), *args],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout


@dataclass
class Cluster:
    """Six redis-server processes forming one cluster."""

    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def live(self) -> list[int]:
        """Ports of the nodes still running."""
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def start(self, directory: Path, node_timeout_ms: int) -> None:
        """Start the nodes, join them, and wait for a healthy cluster."""
        for port in self.ports:
            node = directory / str(port)
            node.mkdir()
            config = node / "redis.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ncluster-enabled yes\n"
                f"cluster-config-file nodes.conf\n"
                f"cluster-node-timeout {node_timeout_ms}\n"
                f'appendonly no\nsave ""\ndir {node}\nlogfile {node}/redis.log\n'
            )
            self.processes[port] = subprocess.Popen(  # noqa: S603
                ["redis-server", str(config)],  # noqa: S607
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in self.ports:
            while "PONG" not in _cli(port, "ping"):
                time.sleep(0.05)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        _cli(
            self.ports[0],
            "--cluster",
            "create",
            *nodes,
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        )
        self.wait_ok(30.0)

    def is_ok(self) -> bool:
        """Whether every live node reports `cluster_state:ok`."""
        return all("cluster_state:ok" in _cli(p, "cluster", "info") for p in self.live)

    def took_over(self, dead: int) -> bool:
        """Whether live masters serve every slot again, none of them on `dead`."""
        slots = _cli(self.live[0], "cluster", "slots").split()
        return str(dead) not in slots and self.is_ok()

    def wait_ok(self, limit: float) -> None:
        """Wait until the cluster is ok and every live replica is linked."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            replication = [_cli(p, "info", "replication") for p in self.live]
            linked = all(
                "role:master" in r or "master_link_status:up" in r for r in replication
            )
            if linked and self.is_ok():
                return
            time.sleep(0.1)
        msg = "the cluster did not become healthy"
        raise TimeoutError(msg)

    def victim(self) -> int:
        """A master with a linked replica."""
        for port in self.live:
            info = _cli(port, "info", "replication")
            if "role:master" in info and "connected_slaves:1" in info:
                return port
        msg = "no master with a linked replica"
        raise RuntimeError(msg)

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self.processes[port].kill()
        self.processes[port].wait(timeout=10)

    def stop(self) -> None:
        """Stop every node."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            proc.wait(timeout=10)


# --- the workload -------------------------------------------------------------------


@dataclass
class Sample:
    """One call: when it started (monotonic), how long it took."""

    started: float
    seconds: float


@dataclass
class Run:
    """What one run measured (times are `time.monotonic()`)."""

    killed_at: float = 0.0
    cluster_ok_at: float = 0.0
    #: End of the latest call that saw a fail-open counter grow.
    last_fell_open_at: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    #: (cache operations, limit calls) answered without Redis, counted when
    #: the run started, at the kill, at the last fall-open, and at the end.
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)


async def _workload(
    cluster: Cluster, victim: int, run: Run, args: argparse.Namespace
) -> None:
    urls = [f"redis://127.0.0.1:{p}" for p in cluster.live]
    prefix = f"bench-failover:{random.getrandbits(32):08x}:"
    config = CacheConfig(
        key_prefix=prefix,
        socket_timeout=args.timeout,
        socket_connect_timeout=args.timeout,
        circuit_breaker_reset=args.breaker_reset,
    )
    cache = create_cache_service("redis-cluster", url=urls, config=config)
    tenants = TenantAwareCacheManager(cache)

    @cached(ttl=300, key="profile:{n}", cache=cache, tenant=True)
    async def profile(n: int) -> dict[str, int]:
        return {"n": n}

    @rate_limit(10**9, 60, key=lambda t: t, backend=cache)
    async def quota(tenant: str) -> None:
        return None

    limits = rate_limit_fail_opens()
    stop = asyncio.Event()
    seen = run.counts["start"] = (cache.fail_opens.count, limits.count)

    async def timed(call: Awaitable[object]) -> None:
        nonlocal seen
        started = time.monotonic()
        await call
        ended = time.monotonic()
        run.samples.append(Sample(started, ended - started))
        # A call that fails open never suspends; a real request yields at
        # least once, and so does this one, or the tasks starve the loop.
        await asyncio.sleep(0)
        # One task runs at a time: a counter that grew since the last call
        # ended grew during a call that ends now or has just ended.
        counts = (cache.fail_opens.count, limits.count)
        if counts != seen:
            seen = counts
            if run.killed_at:
                run.last_fell_open_at = ended
                run.counts["last"] = counts

    async def loop(offset: int) -> None:
        n = offset
        while not stop.is_set():
            for tenant in TENANTS:
                n += 1
                with tenant_scope(tenant):
                    await timed(profile(n % 8))
                await timed(tenants.get_many(["seen", "other"], tenant_id=tenant))
                await timed(tenants.set("seen", n, tenant_id=tenant))
                await timed(quota(tenant))

    tasks = [asyncio.create_task(loop(i * 1000)) for i in range(args.tasks)]
    try:
        await asyncio.sleep(args.before)
        run.counts["kill"] = (cache.fail_opens.count, limits.count)
        run.killed_at = time.monotonic()
        cluster.kill(victim)
        # Until the cluster is ok again and no call fell open for `after` s.
        while True:
            await asyncio.sleep(0.05)
            if not run.cluster_ok_at and await asyncio.to_thread(
                cluster.took_over, victim
            ):
                run.cluster_ok_at = time.monotonic()
            fell = run.last_fell_open_at
            now = time.monotonic()
            if run.cluster_ok_at and fell and now - fell > args.after:
                break
            if now - run.killed_at > 120:
                msg = "calls still fell open 120 s after the kill"
                raise TimeoutError(msg)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        run.counts["end"] = (cache.fail_opens.count, limits.count)
        await cache.clear()
        await cache.aclose()
        await close_rate_limiters()


def _percentiles(samples: Iterator[Sample]) -> tuple[int, float, float]:
    millis = sorted(s.seconds * 1000 for s in samples)
    if len(millis) < 2:
        return len(millis), float("nan"), float("nan")
    cuts = statistics.quantiles(millis, n=100, method="inclusive")
    return len(millis), cuts[49], cuts[98]


def _report(runs: list[Run]) -> None:
    print("| run | failover (kill to last fall-open) | replica serves the slots |")
    print("|---|---:|---:|")
    for i, run in enumerate(runs, 1):
        failover = run.last_fell_open_at - run.killed_at
        cluster_ok = run.cluster_ok_at - run.killed_at
        print(f"| {i} | {failover:.2f} s | {cluster_ok:.2f} s |")
    print()
    print(
        "| run | phase | calls | p50 ms | p99 ms | cache ops fell open "
        "| limit calls let through |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for i, run in enumerate(runs, 1):
        end = run.last_fell_open_at
        phases = {
            "before": (float("-inf"), run.killed_at),
            "during": (run.killed_at, end),
            "after": (end, float("inf")),
        }
        marks = ["start", "kill", "last", "end"]
        for k, (phase, (start, stop)) in enumerate(phases.items()):
            count, p50, p99 = _percentiles(
                s for s in run.samples if start <= s.started < stop
            )
            first, last = run.counts[marks[k]], run.counts[marks[k + 1]]
            print(
                f"| {i} | {phase} | {count} | {p50:.2f} | {p99:.2f} "
                f"| {last[0] - first[0]} | {last[1] - first[1]} |"
            )


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--before", type=float, default=2.0, help="seconds of load")
    parser.add_argument(
        "--after", type=float, default=2.0, help="quiet seconds that end a run"
    )
    parser.add_argument("--node-timeout", type=int, default=2000, help="ms")
    parser.add_argument("--timeout", type=float, default=1.0, help="socket timeouts")
    parser.add_argument("--breaker-reset", type=float, default=5.0)
    args = parser.parse_args()
    # One warning per call let through unchecked: tens of thousands here.
    logging.getLogger("dotmac_core.ratelimit.fail_open").disabled = True
    print(
        f"Python {platform.python_version()}, redis-py {redis.__version__}, "
        f"{_cli(0, '--version').strip()}; {args.tasks} tasks, "
        f"cluster-node-timeout {args.node_timeout} ms, socket timeouts "
        f"{args.timeout} s, circuit_breaker_reset {args.breaker_reset} s\n"
    )
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cluster-failover-") as directory:
            cluster = Cluster(_ports(6))
            try:
                cluster.start(Path(directory), args.node_timeout)
                run = Run()
                asyncio.run(_workload(cluster, cluster.victim(), run, args))
                runs.append(run)
            finally:
                cluster.stop()
    _report(runs)


if __name__ == "__main__":
    main()
