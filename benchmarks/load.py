r"""`python -m benchmarks.load`: many concurrent tasks over one small pool.

    python -m benchmarks.load                                   # SQLite file, temp dir
    python -m benchmarks.load --db postgresql://postgres@127.0.0.1/test \\
        --seconds 30 --tasks 1000 --pool 20

1,000 tasks run for 30 s, each repeating a mix of calls through dotmac_core's
public API with the library's defaults, except the pool (`pool_size=--pool`,
`max_overflow=0`): reads (`get_by_id`), writes (`create`, `update`), pages
(`list_paginated`) and units of work (`TransactionManager`: a read, an update
and a create). It reports throughput, latency per kind (p50 / p99 / max),
the wait for a pool connection (from the start of a call to its first
checkout, by the pool's `checkout` event), errors, and lost writes: every
acknowledged write is counted back from the database afterwards. Each task
updates only the row it owns, so the last value it was told was written must
be the one stored. Creates and drops the table `dotmac_load_item`. Exits 1
if any call failed or any acknowledged write is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select
from sqlmodel import Field

from dotmac_core import (
    AsyncRepository,
    Database,
    DatabaseConfig,
    DBBaseModel,
    TransactionManager,
)

#: Share of each kind of call in the mix.
MIX = {"read": 50, "create": 10, "update": 15, "page": 15, "unit": 10}
SEED_ROWS = 1000
PAGE_SIZE = 20


class LoadItem(DBBaseModel, table=True):
    """A row of the load run."""

    __tablename__ = "dotmac_load_item"

    name: str = Field(max_length=40, index=True)
    value: int = 0


class LoadItems(AsyncRepository[LoadItem]):
    """Rows of `LoadItem`."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load")
    parser.add_argument("--db", help="database URL (default: a SQLite temp file)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=20, help="pool_size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the record here")
    return parser.parse_args(argv)


def _quantiles(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max in milliseconds."""
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50": round(at(0.5) * 1000, 1),
        "p99": round(at(0.99) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


class Load:
    """One run: the tasks, what they were told, what they measured."""

    def __init__(self, db: Database, args: argparse.Namespace) -> None:
        self.db = db
        self.args = args
        self.items = LoadItems(db=db)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.waits: list[float] = []
        #: The waits of each task's first call: all of them ask at once, while
        #: the pool opens its connections and prepares its first statements.
        self.first_waits: list[float] = []
        self.errors: Counter[str] = Counter()
        self.created: set[str] = set()  # names of acknowledged creates
        self.values: dict[Any, int] = {}  # owned row id -> last acknowledged value
        self.seeded: list[Any] = []
        self._asked: dict[asyncio.Task[Any], tuple[float, bool]] = {}
        self.missing: dict[str, int] = {}

    def _on_checkout(self, *_args: Any) -> None:
        task = asyncio.current_task()
        asked = self._asked.pop(task, None) if task is not None else None
        if asked is not None:
            started, first = asked
            (self.first_waits if first else self.waits).append(
                time.perf_counter() - started
            )

    async def seed(self) -> None:
        """Create the table and the rows the tasks read, page and own."""
        async with self.db.engine.begin() as conn:
            await conn.run_sync(LoadItem.__table__.drop, checkfirst=True)  # type: ignore[attr-defined]
            await conn.run_sync(LoadItem.__table__.create)  # type: ignore[attr-defined]
        made = await self.items.create_many(
            [{"name": f"seed-{i}", "value": 0} for i in range(SEED_ROWS)]
        )
        self.seeded = [row.id for row in made]

    async def worker(self, number: int, stop: float) -> None:
        """Repeat calls of the mix until `stop`."""
        rng = random.Random(self.args.seed * 100_003 + number)
        kinds, weights = list(MIX), list(MIX.values())
        own = self.seeded[number % len(self.seeded)] if number < SEED_ROWS else None
        me = asyncio.current_task()
        if me is None:
            return
        step = 0
        while time.perf_counter() < stop:
            step += 1
            kind = rng.choices(kinds, weights)[0]
            if kind in ("update", "unit") and own is None:
                kind = "read"
            started = time.perf_counter()
            self._asked[me] = (started, step == 1)
            try:
                await self._call(kind, rng, number, step, own)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.errors[f"{kind}: {type(exc).__name__}: {exc}"[:160]] += 1
            else:
                self.latency[kind].append(time.perf_counter() - started)
            finally:
                self._asked.pop(me, None)

    async def _call(
        self, kind: str, rng: random.Random, number: int, step: int, own: Any
    ) -> None:
        items = self.items
        if kind == "read":
            await items.get_by_id(rng.choice(self.seeded))
        elif kind == "create":
            name = f"new-{number}-{step}"
            await items.create({"name": name, "value": step})
            self.created.add(name)
        elif kind == "update":
            await items.update(own, {"value": step})
            self.values[own] = step
        elif kind == "page":
            await items.list_paginated(page=rng.randint(1, 20), size=PAGE_SIZE)
        else:
            name = f"new-{number}-{step}"
            async with TransactionManager(self.db):
                await items.get_by_id(own)
                await items.update(own, {"value": step})
                await items.create({"name": name, "value": step})
            self.values[own] = step
            self.created.add(name)

    async def lost_writes(self) -> int:
        """Acknowledged writes the database does not have."""
        async with self.db.read_session() as session:
            names = set(
                await session.scalars(
                    select(LoadItem.name).where(LoadItem.name.like("new-%"))  # type: ignore[attr-defined]
                )
            )
            found = await session.exec(  # type: ignore[call-overload]
                select(LoadItem.id, LoadItem.value).where(
                    LoadItem.name.like("seed-%")  # type: ignore[attr-defined]
                )
            )
            stored: dict[Any, int] = dict(found.all())
            total = int(
                await session.scalar(select(func.count()).select_from(LoadItem)) or 0
            )
        self.missing = {
            "creates": len(self.created - names),
            "updates": sum(
                1 for id_, value in self.values.items() if stored.get(id_) != value
            ),
            "unexpected rows": total - SEED_ROWS - len(names),
        }
        return sum(abs(n) for n in self.missing.values())

    async def drop(self) -> None:
        """Drop the run's table."""
        async with self.db.engine.begin() as conn:
            await conn.run_sync(LoadItem.__table__.drop, checkfirst=True)  # type: ignore[attr-defined]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load; its record."""
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite+aiosqlite:///{Path(tmp) / 'load.db'}"
        db = Database(DatabaseConfig(url=url, pool_size=args.pool, max_overflow=0))
        load = Load(db, args)
        try:
            await load.seed()
            pool = db.engine.sync_engine.pool
            event.listen(pool, "checkout", load._on_checkout)
            print(
                f"{args.tasks} tasks, {args.seconds:g} s, pool {args.pool} on "
                f"{db.dialect}...",
                file=sys.stderr,
            )
            started = time.perf_counter()
            stop = started + args.seconds
            await asyncio.gather(*(load.worker(n, stop) for n in range(args.tasks)))
            elapsed = time.perf_counter() - started
            event.remove(pool, "checkout", load._on_checkout)
            lost = await load.lost_writes()
        finally:
            await load.drop()
            await db.dispose()
    calls = sum(len(v) for v in load.latency.values())
    return {
        "command": "python -m benchmarks.load " + " ".join(sys.argv[1:]),
        "dialect": db.dialect,
        "tasks": args.tasks,
        "seconds": round(elapsed, 1),
        "pool_size": args.pool,
        "calls": calls,
        "throughput": round(calls / elapsed, 1),
        "latency_ms": {k: _quantiles(load.latency[k]) for k in MIX},
        "calls_by_kind": {k: len(load.latency[k]) for k in MIX},
        "pool_wait_ms": _quantiles(load.waits + load.first_waits),
        "pool_wait_first_call_ms": _quantiles(load.first_waits),
        "pool_wait_later_calls_ms": _quantiles(load.waits),
        # First come, first served: a call waits for the calls of the other
        # tasks that asked before it, served at the measured rate.
        "fifo_wait_ms": round((args.tasks - args.pool) / (calls / elapsed) * 1000, 1),
        "errors": dict(load.errors),
        "lost_writes": lost,
        "lost_by_kind": load.missing,
        "acknowledged_writes": len(load.created) + len(load.values),
    }


def report(record: dict[str, Any]) -> str:
    """The record as a Markdown table."""
    lines = [
        f"{record['tasks']} tasks for {record['seconds']} s over a pool of "
        f"{record['pool_size']} ({record['dialect']}): {record['calls']} calls, "
        f"**{record['throughput']} calls/s**",
        "",
        "| kind | calls | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, q in record["latency_ms"].items():
        count = record["calls_by_kind"][kind]
        lines.append(f"| {kind} | {count} | {q['p50']} | {q['p99']} | {q['max']} |")
    for name, key in (
        ("pool wait", "pool_wait_ms"),
        ("pool wait, first call of each task", "pool_wait_first_call_ms"),
        ("pool wait, later calls", "pool_wait_later_calls_ms"),
    ):
        wait = record[key]
        lines.append(f"| {name} | | {wait['p50']} | {wait['p99']} | {wait['max']} |")
    later = record["pool_wait_later_calls_ms"]["p99"]
    fifo = record["fifo_wait_ms"]
    lines += [
        "",
        f"first come, first served: {fifo} ms a call; later calls' p99 is "
        f"{later / fifo if fifo else 0:.2f}x that",
    ]
    lines += [
        "",
        f"errors: {sum(record['errors'].values())}, lost writes: "
        f"{record['lost_writes']} of {record['acknowledged_writes']} acknowledged "
        f"{record['lost_by_kind']}",
    ]
    lines += [f"- {n} x {what}" for what, n in record["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the load benchmark and print its table."""
    args = parse_args(argv)
    record = asyncio.run(run(args))
    print(report(record))
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2))
    if record["errors"] or record["lost_writes"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
