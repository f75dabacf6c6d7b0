"""bench.png: latency against batch size per variant, and speed against quality with the Pareto front.

Two panels because they answer two questions: how each format scales with batch size, and which
formats are worth considering at all (a point off the front is slower *and* no better than another).
"""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points that no other point beats on both latency (lower) and quality (higher)."""
    front = []
    for name, latency, quality in points:
        dominated = any(
            (lat <= latency and qual >= quality) and (lat < latency or qual > quality)
            for other, lat, qual in points if other != name
        )
        if not dominated:
            front.append(name)
    return front


def quality_of(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    if value is None:
        return None
    return value * 100.0 if metric == "accuracy" else value


def plot(report: dict, path: Path, scatter_batch: int) -> None:
    """Write the two-panel figure to `path` (PNG). Matplotlib is imported here: only bench needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "cosine_min"
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    settings = report["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)

    for name in variants:
        cells = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["batch_size"])
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "eager-fp32" else {}
        p50 = [c["p50_ms"] for c in cells]
        # Error bars: the min-max of the per-round p50s (the spread the table reports); a hollow marker: unstable.
        low = [max(0.0, c["p50_ms"] - c.get("p50_min_ms", c["p50_ms"])) for c in cells]
        high = [max(0.0, c.get("p50_max_ms", c["p50_ms"]) - c["p50_ms"]) for c in cells]
        line = left.errorbar([c["batch_size"] for c in cells], p50, yerr=[low, high], marker="o", capsize=3,
                             label=name, **style)
        unstable = [c for c in cells if not c.get("stable", True)]
        if unstable:
            left.scatter([c["batch_size"] for c in unstable], [c["p50_ms"] for c in unstable], s=120,
                         facecolors="none", edgecolors=line[0].get_color(), linewidths=2, zorder=4)
    batch_sizes = sorted({r["batch_size"] for r in rows})
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(batch_sizes)
    left.set_xticklabels([str(b) for b in batch_sizes])
    left.set_xlabel("batch size")
    left.set_ylabel("p50 latency per call (ms, log)")
    left.set_title("latency vs batch size")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    at = [r for r in rows if r["batch_size"] == scatter_batch]
    points = [(r["variant"], r["p50_ms"], quality_of(r, metric)) for r in at]
    points = [p for p in points if p[2] is not None]
    front = set(pareto_front(points))
    default = report.get("selection", {}).get("default_variant", report.get("default_variant"))
    for index, (name, latency, quality) in enumerate(sorted(points, key=lambda p: p[1])):
        on_front = name in front
        right.scatter([latency], [quality], s=60 if on_front else 35, marker="*" if name == default else "o",
                      color="tab:red" if on_front else "tab:gray", zorder=3)
        # Staggered offsets keep labels of variants with equal figures apart.
        right.annotate(name + (" (default)" if name == default else ""), (latency, quality),
                       textcoords="offset points", xytext=(5, 4 + 9 * (index % 3)), fontsize=8)
    line = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if len(line) > 1:
        right.plot([p[1] for p in line], [p[2] for p in line], color="tab:red", linewidth=1,
                   label="Pareto front", zorder=2)
        right.legend(fontsize=8)
    right.set_xscale("log")
    right.margins(x=0.15, y=0.2)  # room for the labels
    right.set_xlabel(f"p50 latency at batch {scatter_batch} (ms, log)")
    right.set_ylabel("accuracy (%)" if metric == "accuracy" else "min cosine to eager fp32")
    right.set_title("speed vs accuracy" if metric == "accuracy" else "speed vs parity")
    right.grid(True, alpha=0.3)

    seq = f", seq_len {settings['seq_len']}" if settings.get("seq_len") else ""
    if not report.get("stable", True):
        seq += "; UNSTABLE run (circled cells)"
    fig.suptitle(f"kiln bench: {report['model']} ({report['machine']['cpu_model']}, "
                 f"{settings['threads']} threads{seq})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
