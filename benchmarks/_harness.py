"""The timing engine: calibrated batches, interleaved repetitions, medians.

An `Operation` holds one `Run` per implementation; `run(n)` performs `n` calls.
`measure()` first warms every implementation up and sizes its batch so that
one sample takes about `Settings.sample_seconds`; then each repetition runs
every implementation once, in an order that rotates from one repetition to
the next, so drift in the machine's load hits all of them alike. A sample is
the batch's wall time divided by its calls; the result is the median sample.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "Measurement",
    "Operation",
    "Run",
    "Timing",
    "loop",
    "measure",
    "progress",
    "spread",
    "spread_over_tasks",
]

Run: TypeAlias = Callable[[int], Awaitable[None]]
"""Type of an implementation: `await run(n)` performs `n` calls."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long to measure: repetitions and the wall time of one sample."""

    repeats: int
    sample_seconds: float
    min_calls: int = 5
    max_calls: int = 200_000
    warmup_calls: int = 20


@dataclass
class Operation:
    """One measured operation and the implementations that perform it."""

    key: str
    """Stable identifier (`get_held`), used in JSON and by `--ops`."""
    title: str
    """What a reader sees in the table."""
    runs: dict[str, Run]
    """Implementation key (`raw`, `core`, `dotmac`, ...) to its `run(n)`."""
    what: dict[str, str] = field(default_factory=dict)
    """Implementation key to one line saying what it runs per call."""
    per: str = "call"
    """What one call is: `call`, or `10,000 rows` for the bulk insert."""
    batch: int = 1
    """Calls per sample are a multiple of this (the task count when concurrent)."""
    fixed_calls: int | None = None
    """Calls per sample when they must not be calibrated (the bulk insert: 1)."""
    repeats: int | None = None
    """Repetitions for this operation, when not the run's default."""
    reset: Callable[[], Awaitable[None]] | None = None
    """Untimed housekeeping before every sample (emptying the bulk table)."""
    close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Untimed cleanup once the operation is measured."""


@dataclass
class Measurement:
    """Samples of one implementation of one operation, in seconds per call."""

    calls: int
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float:
        """The median sample, seconds per call."""
        return statistics.median(self.samples)


def spread(samples: list[float]) -> float:
    """Return the interquartile range relative to the median (0.05 is 5 %)."""
    if len(samples) < 4:  # too few for quartiles: use the whole range
        return (max(samples) - min(samples)) / statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / statistics.median(samples)


def progress(message: str, *, end: str = "\n") -> None:
    """Write a progress line to stderr (the table goes to stdout)."""
    sys.stderr.write(message + end)
    sys.stderr.flush()


def loop(call: Callable[[int], Awaitable[Any]]) -> Run:
    """Return a `run(n)` that awaits `call(0)` ... `call(n - 1)` one after another."""

    async def run(n: int) -> None:
        for i in range(n):
            await call(i)

    return run


def spread_over_tasks(call: Callable[[int], Awaitable[Any]], tasks: int) -> Run:
    """Return a `run(n)` that splits `n` calls over `tasks` concurrent tasks."""

    async def worker(start: int, count: int) -> None:
        for i in range(start, start + count):
            await call(i)

    async def run(n: int) -> None:
        each = n // tasks
        await asyncio.gather(*(worker(k * each, each) for k in range(tasks)))

    return run


async def _sample(op: Operation, run: Run, n: int) -> float:
    if op.reset is not None:
        await op.reset()
    # Start every sample from a clean heap, so one implementation's garbage
    # is not collected on another's clock; collections during a sample count.
    gc.collect()
    start = time.perf_counter()
    await run(n)
    return (time.perf_counter() - start) / n


def _round_up(value: float, step: int) -> int:
    return max(step, math.ceil(value / step) * step)


async def _calibrate(op: Operation, timing: Timing) -> dict[str, Measurement]:
    """Warm each implementation up and choose its calls per sample."""
    results: dict[str, Measurement] = {}
    for impl, run in op.runs.items():
        try:
            if op.fixed_calls is not None:
                await _sample(op, run, op.fixed_calls)  # warm-up, discarded
                results[impl] = Measurement(calls=op.fixed_calls)
                continue
            n = _round_up(timing.warmup_calls, op.batch)
            await _sample(op, run, n)  # warm-up: connections, statement caches
            per_call = await _sample(op, run, n)
            wanted = min(
                max(timing.sample_seconds / per_call, timing.min_calls),
                timing.max_calls,
            )
            results[impl] = Measurement(calls=_round_up(wanted, op.batch))
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            results[impl] = Measurement(calls=0, error=f"{type(exc).__name__}: {exc}")
            progress(f"    {impl}: failed in warm-up ({results[impl].error})")
    return results


async def measure(op: Operation, timing: Timing) -> dict[str, Measurement]:
    """Measure every implementation of `op`; return their samples by key."""
    results = await _calibrate(op, timing)
    impls = [impl for impl in op.runs if results[impl].error is None]
    repeats = op.repeats or timing.repeats
    for rep in range(repeats):
        shift = rep % len(impls) if impls else 0
        for impl in impls[shift:] + impls[:shift]:
            result = results[impl]
            if result.error is not None:
                continue
            try:
                result.samples.append(await _sample(op, op.runs[impl], result.calls))
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                result.error = f"{type(exc).__name__}: {exc}"
                progress(f"\n    {impl}: failed ({result.error})")
        progress(f" {rep + 1}" if rep else f"  repetitions: {rep + 1}", end="")
    return results
