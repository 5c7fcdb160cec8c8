"""The report: a Markdown table, the JSON record and the ratio chart.

Ratios are speed ratios to the raw driver, computed from medians of the same
run: `median(raw) / median(implementation)`. 1.00 is the raw driver's speed,
0.50 half of it; above 1.00 is faster than the baseline (COPY against
executemany, for instance).
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._harness import spread

if TYPE_CHECKING:
    from pathlib import Path

    from ._harness import Measurement, Operation

__all__ = [
    "COLUMNS",
    "PEER_FACTOR",
    "RAW_TARGETS",
    "OpResult",
    "chart",
    "markdown",
    "targets",
]

#: Implementation key to its column heading, in table order.
COLUMNS: dict[str, str] = {
    "raw": "raw driver",
    "raw_copy": "asyncpg COPY",
    "core": "SQLAlchemy Core",
    "orm": "SQLAlchemy ORM bulk",
    "dotmac": "dotmac_core",
    "sqlmodel": "SQLModel session",
    "advanced_alchemy": "advanced-alchemy",
    "fastcrud": "fastcrud",
}

#: Target: dotmac_core's minimum speed ratio to the raw driver, library defaults.
#: Every single-statement operation 0.8; calls in a `TransactionManager` 0.7;
#: the bulk insert 0.9 of the faster of COPY and executemany; a cached hit 0.95.
RAW_TARGETS: dict[str, float] = {
    "get_held": 0.8,
    "get_pool": 0.8,
    "insert": 0.8,
    "update": 0.8,
    "bulk": 0.9,
    "page_total": 0.8,
    "page_no_total": 0.8,
    "offset_deep": 0.8,
    "keyset_deep": 0.8,
    "tx_get": 0.7,
    "tx_insert": 0.7,
    "tx_update": 0.7,
    "tx_unit": 0.7,
    "page_total_big": 0.8,
    "member_page_total": 0.8,
    "member_keyset": 0.8,
    "idle_get": 0.8,
    "idle_write": 0.8,
    "cache_redis": 0.95,
    "cache_memory": 0.95,
}
#: Target: dotmac_core at least this many times the best peer's speed
#: (PostgreSQL), and never below it (SQLite). Peers whose call is already
#: Core-level (SQLAlchemy's ORM bulk INSERT) need only be matched.
PEER_FACTOR = {"postgresql": 2.0, "sqlite": 1.0}
CORE_LEVEL_PEERS = ("orm",)
#: A cell whose samples' interquartile range exceeds this share of the median.
NOISY = 0.25

_PEERS = ("sqlmodel", "advanced_alchemy", "fastcrud", "orm")

_COLOURS = {
    "dotmac": "#1f5fbf",
    "core": "#f28e2b",
    "raw_copy": "#9c9c9c",
    "orm": "#e15759",
    "sqlmodel": "#59a14f",
    "advanced_alchemy": "#b07aa1",
    "fastcrud": "#9c755f",
}


@dataclass
class OpResult:
    """One operation's measurements, ready to report."""

    op: Operation
    results: dict[str, Measurement]
    raw_label: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, impl: str) -> float | None:
        """Median seconds per call of `impl`, or `None` if it has no samples."""
        result = self.results.get(impl)
        if result is None or result.error is not None or not result.samples:
            return None
        return result.median

    def ratio(self, impl: str) -> float | None:
        """Speed of `impl` relative to the raw driver (medians)."""
        base, value = self.median("raw"), self.median(impl)
        if base is None or value is None:
            return None
        return base / value

    def paired(self, impl: str) -> list[float]:
        """Per-repetition ratios to raw: each repetition's raw sample / impl sample.

        The implementations of one repetition ran back to back, so these
        ratios cancel slow drift in the machine's load; their spread says how
        firm the ratio of medians is.
        """
        base, other = self.results.get("raw"), self.results.get(impl)
        if base is None or other is None or other.error or base.error:
            return []
        return [b / o for b, o in zip(base.samples, other.samples, strict=False)]

    def to_json(self) -> dict[str, Any]:
        """Return this operation as a JSON-ready dict."""
        impls: dict[str, Any] = {}
        for impl, result in self.results.items():
            entry: dict[str, Any] = {
                "label": self.raw_label if impl == "raw" else COLUMNS.get(impl, impl),
                "what": self.op.what.get(impl, ""),
                "calls_per_sample": result.calls,
                "error": result.error,
            }
            median = self.median(impl)
            if median is not None:
                entry |= {
                    "median_us": round(median * 1e6, 2),
                    "ops_per_second": round(1 / median, 1),
                    "ratio_to_raw": _round(self.ratio(impl)),
                    "ratio_per_repetition": [round(r, 3) for r in self.paired(impl)],
                    "spread_iqr": round(spread(result.samples), 3),
                    "samples_us": [round(s * 1e6, 2) for s in result.samples],
                }
            impls[impl] = entry
        return {
            "key": self.op.key,
            "title": self.op.title,
            "per": self.op.per,
            "baseline": self.raw_label,
            "seconds": round(self.seconds, 1),
            "implementations": impls,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _quartiles(values: list[float]) -> list[float] | None:
    """Return the first and third quartiles of `values` (`None` for fewer than 2)."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [round(q1, 3), round(q3, 3)]


def _time(seconds: float) -> str:
    micro = seconds * 1e6
    if micro >= 10_000:
        return f"{micro / 1000:,.0f} ms"
    if micro >= 100:
        return f"{micro:,.0f} µs"
    return f"{micro:.1f} µs"


def _baseline(res: OpResult) -> tuple[str, float | None, list[float]]:
    """The baseline dotmac_core is held to: raw, or the faster of raw and COPY."""
    mine = res.median("dotmac")
    options = [
        (median, impl)
        for impl in ("raw", "raw_copy")
        if (median := res.median(impl)) is not None
    ]
    if mine is None or not options:
        return "raw driver", None, []
    best, impl = min(options)
    pairs = _pairs(res, impl, "dotmac")
    label = "raw driver" if impl == "raw" else COLUMNS[impl]
    return label, best / mine, pairs


def _pairs(res: OpResult, base: str, other: str) -> list[float]:
    """Per-repetition speed ratios of `other` to `base` (samples back to back)."""
    a, b = res.results.get(base), res.results.get(other)
    if a is None or b is None or a.error or b.error:
        return []
    return [x / y for x, y in zip(a.samples, b.samples, strict=False)]


def targets(results: list[OpResult], dialect: str) -> list[dict[str, Any]]:
    """Evaluate the speed targets for dotmac_core on this run's medians.

    Two per operation: the ratio to the raw driver (`RAW_TARGETS`; on SQLite
    they say where physics allows, see docs/benchmarks.md), and the speed
    against the best peer measured (`PEER_FACTOR`).
    """
    rows: list[dict[str, Any]] = []
    for res in results:
        key = res.op.key
        goal = RAW_TARGETS.get(key)
        if goal is not None:
            label, ratio, pairs = _baseline(res)
            raw, base = (
                res.median("raw"),
                res.median("raw" if label == "raw driver" else "raw_copy"),
            )
            rows.append(
                {
                    "operation": key,
                    "title": res.op.title,
                    "kind": f"ratio to {label}",
                    "target": goal,
                    # Where the target lies on the chart's scale (ratio to raw).
                    "tick": goal * raw / base if raw and base else goal,
                    "value": ratio,
                    "range": _quartiles(pairs),
                    "met": None if ratio is None else ratio >= goal,
                }
            )
        mine = res.median("dotmac")
        peers = [(median, p) for p in _PEERS if (median := res.median(p)) is not None]
        if peers and mine is not None:
            best, peer = min(peers)
            factor = PEER_FACTOR.get(dialect, 1.0)
            if peer in CORE_LEVEL_PEERS:
                factor = 1.0
            speed = best / mine
            rows.append(
                {
                    "operation": key,
                    "title": res.op.title,
                    "kind": f"speed vs best peer ({COLUMNS[peer]})",
                    "target": factor,
                    "value": speed,
                    "range": _quartiles(_pairs(res, peer, "dotmac")),
                    "met": speed >= factor,
                }
            )
    return rows


def markdown(
    results: list[OpResult], header: list[str], goals: list[dict[str, Any]]
) -> str:
    """Return the report as Markdown: a header, the table, the targets."""
    used = [
        impl for impl in COLUMNS if any(res.median(impl) is not None for res in results)
    ]
    lines = [*header, ""]
    lines.append("| operation | " + " | ".join(COLUMNS[i] for i in used) + " |")
    lines.append("|---|" + "---:|" * len(used))
    for res in results:
        cells = []
        for impl in used:
            median = res.median(impl)
            measured = res.results.get(impl)
            if median is None or measured is None:
                cells.append("failed" if measured and measured.error else "—")
                continue
            ratio = res.ratio(impl)
            cell = f"{_time(median)} · {ratio:.2f}" if ratio else _time(median)
            noisy = spread(measured.samples) > NOISY
            cells.append(f"~{cell}" if noisy else cell)
        title = res.op.title + ("" if res.op.per == "call" else f" (per {res.op.per})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: median time per call · speed ratio to the raw driver "
        "(raw median / this median; 1.00 = the driver's speed). Raw driver: "
        + ", ".join(sorted({res.raw_label for res in results}))
        + f". ~: noisy, the samples' interquartile range is above {NOISY:.0%} "
        "of their median; read with care or rerun.",
    ]
    failures = [
        f"- {res.op.key} / {impl}: {m.error}"
        for res in results
        for impl, m in res.results.items()
        if m.error
    ]
    if failures:
        lines += ["", "Failed:", *failures]
    if goals:
        lines += [
            "",
            "Speed targets for dotmac_core:",
            "",
            "| operation | measure | target | this run | per-repetition IQR | met |",
            "|---|---|---:|---:|---:|---|",
        ]
        for goal in goals:
            value = "—" if goal["value"] is None else f"{goal['value']:.2f}"
            spread_ = goal["range"]
            iqr = "—" if spread_ is None else f"{spread_[0]:.2f} to {spread_[1]:.2f}"
            met = {True: "yes", False: "**no**", None: "—"}[goal["met"]]
            lines.append(
                f"| {goal['title']} | {goal['kind']} | "
                f"≥ {goal['target']:.2f} | {value} | {iqr} | {met} |"
            )
        lines += [
            "",
            "This run: ratio of medians. Per-repetition IQR: quartiles of the "
            "ratios taken within each repetition (back-to-back samples).",
        ]
    return "\n".join(lines) + "\n"


def chart(
    results: list[OpResult], title: str, path: Path, goals: list[dict[str, Any]]
) -> str | None:
    """Draw the ratio chart to `path`; return why not when matplotlib is absent."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    import matplotlib as mpl  # imported here: an optional tool, not a dependency

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    # dotmac_core first in each group, in the strongest colour.
    order = [
        "dotmac",
        "core",
        *(i for i in COLUMNS if i not in ("raw", "dotmac", "core")),
    ]
    impls = [i for i in order if any(res.ratio(i) is not None for res in results)]
    goal_at = {g["operation"]: g for g in goals if g["kind"].startswith("ratio to")}
    height = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(10, 0.8 * len(results) + 1.8))
    for n, impl in enumerate(impls):
        offset = (n - (len(impls) - 1) / 2) * height
        rows = [
            (row, ratio)
            for row, res in enumerate(results)
            if (ratio := res.ratio(impl)) is not None
        ]
        ax.barh(
            [row + offset for row, _ in rows],
            [ratio for _, ratio in rows],
            height=height * 0.9,
            label=COLUMNS[impl],
            color=_COLOURS.get(impl, "#bbbbbb"),
        )
        if impl == "dotmac":
            for row, res in enumerate(results):
                goal = goal_at.get(res.op.key)
                if goal is not None:
                    y = row + offset
                    ax.plot(
                        [goal.get("tick", goal["target"])] * 2,
                        [y - height * 0.8, y + height * 0.8],
                        color="black",
                        linewidth=2.5,
                    )
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels(
        [f"{res.op.title}\n(raw: {res.raw_label})" for res in results], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlabel(
        "speed ratio to the raw driver (medians; 1.0 = raw; black tick: speed target)"
    )
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
