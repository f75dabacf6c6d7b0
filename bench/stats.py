"""The statistics of a benchmark, kept pure so they can be tested on injected timings.

A cell (one variant at one batch size) is measured in several interleaved rounds. Its figure is the median of
the per-round p50s; its spread is their min-max and coefficient of variation. A cell whose rounds disagree by
more than the threshold is unstable: one round ran on a machine that was not the same machine as the others
(another process on the cores, thermal or frequency drift, a noisy neighbour on a shared VM), so no single
figure describes it and no choice should be made from it.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

DEFAULT_MAX_SPREAD = 0.20  # (max - min) / median of the per-round p50s above which a cell is unstable
MIN_CALLS_PER_ROUND = 5  # fewer timed calls in a round make its p50 itself noisy


def summarize_calls(latencies_ms: list[float], batch_size: int) -> dict[str, Any]:
    """One round of one cell: percentiles of the calls and throughput over the time spent in them."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
        "mean_ms": float(values.mean()), "min_ms": float(values.min()),
        "items_per_s": float(batch_size * len(values) / (values.sum() / 1e3)),
        "iterations": len(values),
    }


def combine_rounds(rounds: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """A cell's figures over its rounds: medians, and the spread of the per-round p50s."""
    p50s = [r["p50_ms"] for r in rounds]
    median = float(statistics.median(p50s))
    mean = float(statistics.fmean(p50s))
    return {
        "p50_ms": median,
        "p90_ms": float(statistics.median(r["p90_ms"] for r in rounds)),
        "p99_ms": float(statistics.median(r["p99_ms"] for r in rounds)),
        "mean_ms": float(statistics.fmean(r["mean_ms"] for r in rounds)),
        "min_ms": float(min(r["min_ms"] for r in rounds)),
        "items_per_s": batch_size * 1000.0 / median if median > 0 else 0.0,
        "iterations": int(sum(r["iterations"] for r in rounds)),
        "rounds": len(rounds),
        "p50_min_ms": float(min(p50s)),
        "p50_max_ms": float(max(p50s)),
        "p50_by_round_ms": [round(p, 6) for p in p50s],
        "spread": (max(p50s) - min(p50s)) / median if median > 0 else 0.0,
        "cv": float(statistics.pstdev(p50s) / mean) if len(p50s) > 1 and mean > 0 else 0.0,
    }


def unstable_reasons(cell: dict[str, Any], rounds: list[dict[str, Any]], max_spread: float,
                     load: dict[str, Any] | None = None) -> list[str]:
    """Why a cell cannot be trusted, in words that name the likely cause; empty when it can."""
    reasons = []
    if len(rounds) > 1 and cell["spread"] > max_spread:
        cause = "the machine changed between rounds: thermal or frequency drift, or a noisy neighbour on a shared VM"
        if load and load.get("busy"):
            cause = (f"another process was using the cores ({load['other_cores']:.2f} cores' worth of CPU time went "
                     f"to processes other than kiln's during the run; load average {load['max']:.2f} on "
                     f"{load['cpus']} CPUs)")
        reasons.append(f"per-round p50s differ by {cell['spread']:.0%} of their median (over {max_spread:.0%}): "
                       f"{cause}")
    few = min(r["iterations"] for r in rounds)
    if few < MIN_CALLS_PER_ROUND:
        reasons.append(f"only {few} timed call(s) in a round: too few calls; raise --max-seconds")
    return reasons


OTHER_CORES_BUSY = 0.3  # CPU time of other processes, in cores, above which the run shared its cores


def load_summary(before: tuple[float, float, float], after: tuple[float, float, float], cpus: int,
                 own_threads: int, other_cores: float | None = None) -> dict[str, Any]:
    """The load around the run, and whether something else used the cores.

    `other_cores` is the machine's busy CPU time during the rounds minus kiln's own processes', per second of
    wall time (from /proc/stat and /proc/PID/stat): a direct measure, where the load average lags by a minute."""
    peak = max(before[0], after[0])
    busy = other_cores > OTHER_CORES_BUSY if other_cores is not None else peak > own_threads + 0.75
    return {"before": list(before), "after": list(after), "max": peak, "cpus": cpus, "own": own_threads,
            "other_cores": other_cores, "busy": busy}


def machine_busy_seconds(stat_text: str, ticks_per_second: float) -> float:
    """Seconds of non-idle CPU time since boot, all CPUs, from /proc/stat's first line."""
    fields = [int(x) for x in stat_text.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0  # a hypervisor's other guests: time this VM did not get
    return (sum(fields[:8]) - idle - steal) / ticks_per_second


def process_cpu_seconds(stat_text: str, ticks_per_second: float) -> float:
    """utime + stime of one process (and its reaped children) from /proc/PID/stat."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks_per_second


def settled(latencies_ms: list[float], window: int = 5, tolerance: float = 0.05) -> bool:
    """Whether the last `window` calls' median is within `tolerance` of the `window` before them: warm-up is over
    when caches, allocators and lazily compiled kernels have stopped changing the latency."""
    if len(latencies_ms) < 2 * window:
        return False
    last = statistics.median(latencies_ms[-window:])
    previous = statistics.median(latencies_ms[-2 * window:-window])
    return abs(last - previous) <= tolerance * previous
