r"""dotmac_core against the raw drivers, SQLAlchemy Core and peer libraries.

Run it from a clone, in the project's virtual environment:

    python -m benchmarks                      # SQLite file in a temp dir + memory cache
    python -m benchmarks --quick              # the same, short (under a minute)
    python -m benchmarks --db postgresql://postgres@127.0.0.1/test \\
        --redis redis://127.0.0.1:6379/0      # PostgreSQL and Redis

Every operation runs for the raw driver (asyncpg / aiosqlite / redis-py),
SQLAlchemy Core with a prebuilt statement on the same engine, dotmac_core
(tenant and soft-delete scoping on) and any peer library that is installed.
Implementations are interleaved within each repetition; the table shows
medians and the speed ratio to the raw driver, and is written with a JSON
record and a chart to `--out` (default `benchmarks/results/`). Progress goes
to stderr. `--profile OP` runs dotmac_core's side of OP under cProfile instead.
On PostgreSQL the run creates the tables `dotmac_bench_item` and
`dotmac_bench_bulk` and drops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from ._harness import Timing, measure, progress
from ._ops_cache import cache_memory, cache_redis
from ._ops_db import DB_OPERATIONS
from ._ops_peers import PEERS, add_peers, peer_versions
from ._ops_units import IDLE_PAUSE, UNIT_OPERATIONS
from ._report import COLUMNS, OpResult, chart, markdown, targets
from ._setup import Sizes, close_bench, default_db, open_bench

if TYPE_CHECKING:
    from ._harness import Operation
    from ._setup import Bench

__all__ = ["main", "parse_args", "run"]

RESULTS = Path(__file__).resolve().parent / "results"
OPERATIONS = [*DB_OPERATIONS, *UNIT_OPERATIONS, "cache_redis", "cache_memory"]
_VERSIONED = (
    "dotmac-core",
    "sqlalchemy",
    "sqlmodel",
    "pydantic",
    "pydantic-core",
    "greenlet",
    "asyncpg",
    "aiosqlite",
    "redis",
    "hiredis",
    "advanced-alchemy",
    "fastcrud",
    "matplotlib",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument(
        "--db",
        help="database URL (postgresql://... or sqlite+aiosqlite:///file.db); "
        "default: a SQLite file in a temporary directory",
    )
    parser.add_argument("--redis", help="Redis URL: adds the Redis cache-hit operation")
    parser.add_argument(
        "--quick", action="store_true", help="short run: 3 repetitions, short samples"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions")
    parser.add_argument(
        "--sample-seconds", type=float, help="wall time of one sample (calibrated)"
    )
    parser.add_argument("--bulk-rows", type=int, help="rows of the bulk insert")
    parser.add_argument(
        "--idle-pause",
        type=float,
        help=f"seconds between groups of the idle_* operations (default "
        f"{IDLE_PAUSE:g}: past every idle threshold; 0.05 with --quick)",
    )
    parser.add_argument(
        "--ops",
        help="comma-separated operations to run (default: all): "
        + ",".join(OPERATIONS),
    )
    parser.add_argument(
        "--impls",
        help="comma-separated implementations (default: all available): "
        + ",".join(COLUMNS),
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="leave the peer libraries out"
    )
    parser.add_argument(
        "--profile",
        metavar="OPS",
        help="profile dotmac_core's side of these operations with cProfile "
        "(comma-separated) instead of timing; writes results/profile-OP.txt",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 9)
    args.sample_seconds = args.sample_seconds or (0.01 if args.quick else 0.25)
    args.bulk_rows = args.bulk_rows or (500 if args.quick else 10_000)
    if args.idle_pause is None:
        # --quick checks the harness only: its pause is too short to matter.
        args.idle_pause = 0.05 if args.quick else IDLE_PAUSE
    ops = args.profile or args.ops
    args.ops = ops.split(",") if ops else list(OPERATIONS)
    unknown = set(args.ops) - set(OPERATIONS)
    if unknown:
        parser.error(f"unknown operations: {', '.join(sorted(unknown))}")
    args.impls_given = args.impls is not None
    args.impls = args.impls.split(",") if args.impls else list(COLUMNS)
    return args


_PASSWORD = re.compile(r"(//[^:/@]*:)[^@]*@")


def _masked(argv: list[str]) -> list[str]:
    """Return the command line with any password in a URL replaced by `***`."""
    return [_PASSWORD.sub(r"\1***@", arg) for arg in argv]


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _source() -> dict[str, Any]:
    """Return the git commit of the measured dotmac_core, and whether it has edits."""
    import dotmac_core  # the package measured, wherever it was imported from

    folder = Path(dotmac_core.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, fixed arguments
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],  # noqa: S607 - as above
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"path": str(folder), "commit": None, "uncommitted_changes": None}
    return {"path": str(folder), "commit": commit, "uncommitted_changes": bool(status)}


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
        "load_average_at_start": list(os.getloadavg()),
    }


def _peers(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Return the peers to run and why the others are left out."""
    chosen, skipped = [], {}
    for key, version in peer_versions().items():
        if args.no_peers or key not in args.impls:
            skipped[key] = "not selected"
        elif version is None:
            skipped[key] = "not installed (see the `bench` extra)"
        else:
            chosen.append(key)
    return chosen, skipped


async def _build(
    key: str, bench: Bench, peers: list[str], args: argparse.Namespace
) -> tuple[Operation, str, str | None]:
    """Return the operation, its raw baseline's name, and a server version."""
    if key == "cache_memory":
        return await cache_memory(), "dict + json.loads", None
    if key == "cache_redis":
        op, version = await cache_redis(args.redis)
        return op, "redis-py", version
    if key.startswith("idle_"):
        op = await UNIT_OPERATIONS[key](bench, args.idle_pause)  # type: ignore[call-arg]
    else:
        op = await (DB_OPERATIONS | UNIT_OPERATIONS)[key](bench)
    add_peers(op, bench, peers)
    if key == "bulk" or key.startswith("idle_"):
        op.repeats = min(args.repeats, 5)
    return op, bench.raw.name, None


def _select(op: Operation, impls: list[str]) -> None:
    """Keep the chosen implementations (the raw baseline always stays)."""
    op.runs = {k: v for k, v in op.runs.items() if k == "raw" or k in impls}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark as `args` says; return the JSON record."""
    started, clock = datetime.now(UTC), time.perf_counter()
    machine, source = _machine(), _source()
    ops = [k for k in args.ops if k != "cache_redis" or args.redis]
    peers, skipped = _peers(args)
    with tempfile.TemporaryDirectory(prefix="dotmac-bench-") as tmp:
        db_url = args.db or default_db(tmp)
        sizes = Sizes.quick() if args.quick else Sizes()
        progress(
            f"setting up {make_url(db_url).get_backend_name()}: seeding "
            f"{sizes.deep_rows + sizes.member_rows + 3_000:,} rows"
        )
        bench = await open_bench(db_url, args.bulk_rows, sizes)
        timing = Timing(
            repeats=args.repeats,
            sample_seconds=args.sample_seconds,
            # --quick checks the harness: a few calls are enough to warm up.
            min_calls=2 if args.quick else 5,
            warmup_calls=3 if args.quick else 20,
        )
        results: list[OpResult] = []
        redis_version = None
        try:
            for number, key in enumerate(ops, 1):
                try:
                    op, raw_label, version = await _build(key, bench, peers, args)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    skipped[key] = f"could not be set up: {type(exc).__name__}: {exc}"
                    progress(f"[{number}/{len(ops)}] {key}: {skipped[key]}")
                    continue
                redis_version = redis_version or version
                _select(op, args.impls)
                progress(
                    f"[{number}/{len(ops)}] {op.title}: "
                    f"{', '.join(op.runs)} ({time.perf_counter() - clock:.0f} s)"
                )
                begin = time.perf_counter()
                try:
                    measured = await measure(op, timing)
                finally:
                    for close in op.close:
                        await close()
                res = OpResult(op, measured, raw_label, time.perf_counter() - begin)
                results.append(res)
                ratio = res.ratio("dotmac")
                progress(
                    f" · done in {res.seconds:.0f} s"
                    + ("" if ratio is None else f"; dotmac_core {ratio:.2f} of raw")
                )
        finally:
            await close_bench(bench)
    machine["load_average_at_end"] = list(os.getloadavg())
    versions = _versions() | {
        f"{bench.dialect} server": bench.server_version,
        "redis server": redis_version,
    }
    return {
        "schema": 1,
        "command": "python -m benchmarks " + shlex.join(_masked(sys.argv[1:])),
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - clock, 1),
        "database": make_url(db_url).render_as_string(hide_password=True)
        if args.db
        else "sqlite (temporary file)",
        "dialect": bench.dialect,
        "dotmac_core_source": source,
        "cache": "redis"
        if any(res.op.key == "cache_redis" for res in results)
        else "memory",
        "machine": machine,
        "versions": versions,
        "settings": {
            "repeats": args.repeats,
            "sample_seconds": args.sample_seconds,
            "bulk_rows": args.bulk_rows,
            "sizes": bench.sizes.__dict__,
            "idle_pause": args.idle_pause,
            "quick": args.quick,
            "database_config": {
                name: getattr(bench.db.config, name)
                for name in (
                    "pool_size",
                    "max_overflow",
                    "pool_pre_ping",
                    "pool_recycle",
                    "statement_timeout",
                    "pgbouncer",
                )
            },
            "peers": peers,
            "server_settings": bench.server_settings,
        },
        "skipped": skipped,
        "goals": [],
        "operations": results,
    }


def _header(record: dict[str, Any]) -> list[str]:
    v = record["versions"]
    server = f"{record['dialect']} server"
    parts = [
        f"dotmac_core {v['dotmac-core']}",
        f"SQLAlchemy {v['sqlalchemy']}",
        f"SQLModel {v['sqlmodel']}",
        f"pydantic {v['pydantic']}",
    ]
    if record["dialect"] == "postgresql":
        parts += [f"asyncpg {v['asyncpg']}", f"PostgreSQL {v[server]}"]
    else:
        parts += [f"aiosqlite {v['aiosqlite']}", f"SQLite {v[server]}"]
    if v.get("redis server"):
        parts += [f"redis-py {v['redis']}", f"Redis {v['redis server']}"]
    for peer in ("advanced-alchemy", "fastcrud"):
        if record["skipped"].get(peer.replace("-", "_")) is None and v.get(peer):
            parts.append(f"{peer} {v[peer]}")
    machine = record["machine"]
    source = record["dotmac_core_source"]
    if source["commit"]:
        edits = " plus uncommitted edits" if source["uncommitted_changes"] else ""
        parts.insert(1, f"commit {source['commit'][:10]}{edits}")
    absent = [
        PEERS[key] for key, why in record["skipped"].items() if "installed" in why
    ]
    missing = (
        [f"Not installed, so not measured: {', '.join(absent)}."] if absent else []
    )
    missing += [
        f"Not measured: {key}, {why.rstrip('.')}."
        for key, why in record["skipped"].items()
        if why.startswith("could not")
    ]
    return [
        f"`{record['command']}`",
        "",
        f"{record['started_at']}, {record['duration_seconds']:.0f} s; "
        f"{record['settings']['repeats']} interleaved repetitions, medians; "
        f"{machine['cpu_count']} cores ({machine['cpu']}), {machine['python']}; "
        + ", ".join(parts)
        + ".",
        *missing,
    ]


def write(record: dict[str, Any], out: Path) -> str:
    """Write benchmarks.md, .json and ratios.png to `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    results: list[OpResult] = record["operations"]
    goals = targets(results, record["dialect"])
    record["goals"] = goals
    table = markdown(results, _header(record), goals)
    title = (
        f"dotmac_core vs raw driver: {record['dialect']}"
        f" + {record['cache']} ({record['started_at']})"
    )
    note = chart(results, title, out / "ratios.png", goals)
    record["chart"] = note or "ratios.png"
    if note:
        table += f"\n{note}\n"
    (out / "benchmarks.md").write_text(table)
    serial = record | {"operations": [res.to_json() for res in results]}
    (out / "benchmarks.json").write_text(json.dumps(serial, indent=2, default=str))
    return table


def main(argv: list[str] | None = None) -> None:
    """Run from the command line: timing (default) or profiling (`--profile`)."""
    args = parse_args(argv)
    if args.profile:
        from ._profile import profile  # imported here: only --profile needs it

        asyncio.run(profile(args))
        return
    record = asyncio.run(run(args))
    table = write(record, args.out)
    print(table)
    progress(f"written to {args.out}/ (benchmarks.md, benchmarks.json, ratios.png)")
