r"""`python -m benchmarks.replicas`: a primary and a hot standby, through dotmac_core.

    python -m benchmarks.replicas \
        --primary postgresql://postgres@127.0.0.1:5432/app \
        --replica postgresql://postgres@127.0.0.1:5433/app \
        [--kill 'pg_ctl -D /srv/standby -m immediate stop' \
         --restart 'pg_ctl -D /srv/standby -w start']

Measures, with the library's defaults:

- replica lag: a row inserted on the primary (asyncpg, no toolkit), polled
  on the standby until visible; and how many reads issued right after the
  commit missed it;
- stale reads through the toolkit: a context that writes and reads at once,
  with read-your-writes (`Database(primary, replicas=[replica])`) and
  without (reading the replica's own `Database`);
- cost per call: `get_by_id` and `create` (pooled and in a
  `TransactionManager`) with and without replicas configured (medians of
  interleaved batches);
- with `--kill` / `--restart`: reads of 8 tasks while the standby is killed,
  their latency before / during / after, errors, and the time until reads
  are served by the standby again after it restarts.

Creates and drops the table `dotmac_replica_item` on the primary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import shlex
import statistics
import subprocess
import time
from typing import TYPE_CHECKING, Any

from sqlmodel import Field

from dotmac_core import AsyncRepository, Database, DBBaseModel, TransactionManager

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

LAG_SAMPLES = 300
STALE_TRIES = 1000
BATCH = 200
REPETITIONS = 7


class ReplicaItem(DBBaseModel, table=True):
    """A row of the replica benchmark."""

    __tablename__ = "dotmac_replica_item"

    name: str = Field(max_length=40)
    value: int = 0


class Items(AsyncRepository[ReplicaItem]):
    """Rows of `ReplicaItem`."""


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(pick(0.99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


async def _fresh(work: Callable[[], Awaitable[Any]]) -> Any:
    """`work` in a context of its own (a new request)."""
    return await asyncio.create_task(work(), context=contextvars.Context())


async def lag(primary: Database, replica: str) -> dict[str, Any]:
    """Visibility lag of a row `create` committed, polled on the standby (asyncpg)."""
    import asyncpg

    items = Items(db=primary)
    reader = await asyncpg.connect(_dsn(replica))
    query = f"SELECT 1 FROM {ReplicaItem.__tablename__} WHERE id = $1"  # noqa: S608 - our table
    lags: list[float] = []
    missed = 0
    try:
        for i in range(LAG_SAMPLES):
            made = await items.create({"name": f"lag-{i}", "value": i})
            committed = time.perf_counter()
            first = True
            while await reader.fetchval(query, made.id) is None:
                missed += first
                first = False
            lags.append(time.perf_counter() - committed)
    finally:
        await reader.close()
    return {"samples": LAG_SAMPLES, "missed_at_once": missed, **_quantiles(lags)}


async def stale(routed: Database) -> dict[str, int]:
    """Write then read at once in one context: with and without read-your-writes."""
    items = Items(db=routed)
    direct = Items(db=routed.replicas[0])
    counts = {"tries": STALE_TRIES, "stale_with": 0, "stale_without": 0}

    async def one(i: int) -> None:
        made = await items.create({"name": f"ryw-{i}", "value": i})
        if await items.get_by_id(made.id) is None:
            counts["stale_with"] += 1
        other = await items.create({"name": f"raw-{i}", "value": i})
        if await direct.get_by_id(other.id) is None:
            counts["stale_without"] += 1

    for i in range(STALE_TRIES):
        await _fresh(lambda i=i: one(i))
    return counts


async def costs(primary: str, replica: str) -> dict[str, Any]:
    """Median seconds per call, with and without replicas, batches interleaved."""
    plain = Database(primary)
    routed = Database(primary, replicas=[replica])
    seeded = await Items(db=plain).create({"name": "seed"})
    await asyncio.sleep(0.5)  # replayed by then (lag is milliseconds)

    def ops(db: Database) -> dict[str, Callable[[int], Awaitable[Any]]]:
        items = Items(db=db)

        async def unit(i: int) -> None:
            async with TransactionManager(db):
                await items.create({"name": f"u{i}", "value": i})

        return {
            "get": lambda _i: _fresh(lambda: items.get_by_id(seeded.id)),
            "create": lambda i: _fresh(lambda: items.create({"name": f"c{i}"})),
            "transaction_create": lambda i: _fresh(lambda: unit(i)),
        }

    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(REPETITIONS):
            for label, db in (("primary_only", plain), ("with_replica", routed)):
                for name, op in ops(db).items():
                    started = time.perf_counter()
                    for i in range(BATCH):
                        await op(i)
                    per_call = (time.perf_counter() - started) / BATCH
                    samples.setdefault(name, {}).setdefault(label, []).append(per_call)
    finally:
        await plain.dispose()
        await routed.dispose()
    report: dict[str, Any] = {}
    for name, by_label in samples.items():
        medians = {k: statistics.median(v) for k, v in by_label.items()}
        report[name] = {
            **{f"{k}_us": round(v * 1e6, 1) for k, v in medians.items()},
            "ratio": round(medians["with_replica"] / medians["primary_only"], 2),
        }
    return report


async def failover(routed: Database, kill: str, restart: str) -> dict[str, Any]:
    """Reads while the standby is killed and restarted; where they are served."""
    items = Items(db=routed)
    made = await items.create({"name": "failover"})
    await asyncio.sleep(0.5)
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    phase = "before"
    errors = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal errors
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await items.get_by_id(made.id)
            except Exception:  # noqa: BLE001 - counted
                errors += 1
            phases[phase].append(time.perf_counter() - started)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(_fresh(reader)) for _ in range(8)]
    await asyncio.sleep(1.0)
    phase = "during"
    await asyncio.to_thread(subprocess.run, shlex.split(kill), check=True)
    await asyncio.sleep(2.0)
    phase = "after"
    await asyncio.to_thread(subprocess.run, shlex.split(restart), check=True)
    restarted = time.perf_counter()
    back = None
    replica = routed._replica_set.members[0] if routed._replica_set else None
    while replica is not None and time.perf_counter() - restarted < 30:
        if replica.healthy:  # a probe found it reachable: reads go there again
            back = time.perf_counter() - restarted
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*tasks)
    return {
        "errors": errors,
        "readmitted_after_restart_s": None if back is None else round(back, 2),
        **{f"{k}_calls": len(v) for k, v in phases.items()},
        **{k: _quantiles(v) for k, v in phases.items() if v},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; the report as a dict."""
    setup = Database(args.primary)
    table = ReplicaItem.__table__  # type: ignore[attr-defined]  # SQLModel's table
    async with setup.engine.begin() as conn:
        await conn.run_sync(table.create, checkfirst=True)
    report: dict[str, Any] = {}
    try:
        await asyncio.sleep(0.5)
        report["lag"] = await lag(setup, args.replica)
        routed = Database(args.primary, replicas=[args.replica])
        try:
            report["stale"] = await stale(routed)
            if args.kill and args.restart:
                report["failover"] = await failover(routed, args.kill, args.restart)
        finally:
            await routed.dispose()
        report["costs"] = await costs(args.primary, args.replica)
    finally:
        async with setup.engine.begin() as conn:
            await conn.run_sync(table.drop)
        await setup.dispose()
    return report


def main() -> None:
    """Parse the arguments, run, print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--primary", required=True, help="primary's URL")
    parser.add_argument("--replica", required=True, help="hot standby's URL")
    parser.add_argument("--kill", help="shell command that kills the standby")
    parser.add_argument("--restart", help="shell command that starts it again")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
