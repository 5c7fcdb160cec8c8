"""`--profile OPS`: where dotmac_core's time goes, per operation, from cProfile.

For each operation the dotmac_core implementation is warmed up, then run under
`cProfile` for about `--sample-seconds` x 8 of calls. The report groups the
functions' own time by area (SQLAlchemy ORM, engine, SQL compilation,
dotmac_core, pydantic, the driver, the event loop, waiting in `epoll` for the
server), lists the top functions, and counts driver round trips per call
(asyncpg protocol messages, or aiosqlite's hops to its thread). cProfile slows
Python down by a constant-ish factor, so read the shares, not the absolute
times; waiting for the server is then under-represented, not over.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import tempfile
import time
from typing import TYPE_CHECKING, Any

from ._harness import progress
from ._ops_peers import PEERS
from ._setup import close_bench, default_db, open_bench

if TYPE_CHECKING:
    import argparse

    from ._harness import Operation

__all__ = ["profile"]

#: (substring of the file path or built-in name, area), first match wins.
_AREAS: tuple[tuple[str, str], ...] = (
    ("select.epoll", "waiting for the server (epoll)"),
    ("_socket.socket", "socket send / recv system calls"),
    ("/dotmac_core/db/scoping", "dotmac_core scoping"),
    ("/dotmac_core/db/_validation", "dotmac_core validation"),
    ("/dotmac_core/db/transaction", "dotmac_core transactions"),
    ("/dotmac_core/", "dotmac_core other"),
    ("/sqlalchemy/orm/", "SQLAlchemy ORM"),
    ("/sqlalchemy/sql/", "SQLAlchemy SQL construction / compile cache"),
    ("/sqlalchemy/engine/", "SQLAlchemy engine"),
    ("/sqlalchemy/pool/", "SQLAlchemy pool"),
    ("/sqlalchemy/dialects/", "SQLAlchemy dialect adapter"),
    ("/sqlalchemy/ext/asyncio", "SQLAlchemy asyncio layer + greenlet"),
    ("/sqlalchemy/util/_concurrency", "SQLAlchemy asyncio layer + greenlet"),
    ("greenlet", "SQLAlchemy asyncio layer + greenlet"),
    ("/sqlalchemy/", "SQLAlchemy other"),
    ("/sqlmodel/", "SQLModel"),
    ("pydantic", "pydantic"),
    ("asyncpg", "asyncpg"),
    ("/aiosqlite/", "aiosqlite"),
    ("/redis/", "redis-py"),
    ("/asyncio/", "asyncio event loop"),
    ("/benchmarks/", "benchmark harness"),
    ("/lib/python3", "Python standard library (contextlib, uuid, typing, ...)"),
)

#: Calls that count requests to the server, and what to call them: socket
#: writes (asyncpg, redis-py: one per round trip) and jobs queued to an
#: aiosqlite connection's thread (one hop there and back each).
_ROUND_TRIPS: dict[str, str] = {
    "<method 'send' of '_socket.socket' objects>": "socket writes (round trips)",
    "/queue.py:put_nowait": "aiosqlite thread hops",
    "'put_nowait' of '_queue.SimpleQueue'": "aiosqlite thread hops",
}


def _area(where: str) -> str:
    for needle, area in _AREAS:
        if needle in where:
            return area
    return "Python built-ins" if where.startswith("~") else "other"


def _name(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename == "~":
        return f"~:{func}"
    parts = filename.split("/site-packages/")[-1].split("/work/main/")[-1]
    return f"{parts}:{func}" if line == 0 else f"{parts}:{line}:{func}"


def summarize(stats: pstats.Stats, calls: int, wall: float) -> str:
    """Return the per-area shares, round trips and top functions as text."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    areas: dict[str, float] = {}
    trips: dict[str, float] = {}
    total = 0.0
    for key, (_cc, ncalls, tottime, _ct, _callers) in table.items():
        where = f"{key[0]}:{key[2]}"
        area = _area(where)
        areas[area] = areas.get(area, 0.0) + tottime
        total += tottime
        for needle, label in _ROUND_TRIPS.items():
            # SQLAlchemy's pool queue has a put_nowait of its own: not a hop.
            if needle in where and "/sqlalchemy/" not in where:
                trips[label] = trips.get(label, 0) + ncalls / calls
    lines = [
        f"{calls} calls, {wall / calls * 1e6:.0f} µs per call under cProfile",
        "",
        "own time by area:",
    ]
    for area, seconds in sorted(areas.items(), key=lambda kv: -kv[1]):
        share = seconds / total if total else 0.0
        lines.append(f"  {share:6.1%}  {seconds / calls * 1e6:8.1f} µs/call  {area}")
    lines += ["", "requests to the server per call:"]
    lines += [f"  {n:5.2f}  {func}" for func, n in sorted(trips.items())] or [
        "  (none seen)"
    ]
    lines += [
        "",
        "dotmac_core functions by cumulative time (µs per call; reliable for",
        "plain functions, not for coroutines, which count each resumption):",
    ]
    own = [kv for kv in table.items() if "/dotmac_core/" in kv[0][0]]
    for key, (_cc, ncalls, _tt, cumtime, _callers) in sorted(
        own, key=lambda kv: -kv[1][3]
    )[:15]:
        lines.append(
            f"  {cumtime / calls * 1e6:7.1f}  {ncalls / calls:6.1f}x  {_name(key)}"
        )
    lines += ["", "top functions by own time (µs per call, calls per call):"]
    ranked = sorted(table.items(), key=lambda kv: -kv[1][2])[:30]
    for key, (_cc, ncalls, tottime, cumtime, _callers) in ranked:
        lines.append(
            f"  {tottime / calls * 1e6:7.1f}  {ncalls / calls:6.1f}x  "
            f"(cum {cumtime / calls * 1e6:7.1f})  {_name(key)}"
        )
    return "\n".join(lines)


async def _profile_op(op: Operation, impl: str, seconds: float) -> str:
    run = op.runs[impl]
    batch = op.fixed_calls or op.batch * max(1, 20 // op.batch)
    if op.reset is not None:
        await op.reset()
    start = time.perf_counter()
    await run(batch)  # warm-up and estimate
    per_call = (time.perf_counter() - start) / batch
    calls = op.fixed_calls or max(
        op.batch, int(seconds / per_call) // op.batch * op.batch
    )
    if op.reset is not None:
        await op.reset()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    await run(calls)
    profiler.disable()
    wall = time.perf_counter() - start
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    return f"## {op.title} ({impl})\n\n" + summarize(stats, calls, wall)


async def profile(args: argparse.Namespace) -> None:
    """Profile `args.ops` (dotmac_core, or `--impls`); print, and write a file each."""
    from .suite import _build  # the same operations the timing run builds

    impls = args.impls if args.impls_given else ["dotmac"]
    peers = [impl for impl in impls if impl in PEERS]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dotmac-bench-") as tmp:
        bench = await open_bench(args.db or default_db(tmp), args.bulk_rows)
        try:
            for key in args.ops:
                op, _, _ = await _build(key, bench, peers, args)
                texts = []
                try:
                    for impl in impls:
                        if impl in op.runs:
                            progress(f"profiling {op.title}: {impl}")
                            seconds = args.sample_seconds * 8
                            texts.append(await _profile_op(op, impl, seconds))
                finally:
                    for close in op.close:
                        await close()
                text = "\n\n".join(texts)
                (args.out / f"profile-{key}.txt").write_text(text + "\n")
                print(text + "\n")
        finally:
            await close_bench(bench)
