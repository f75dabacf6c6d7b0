"""One row of `kiln bench`'s results: a variant at one batch size, with its speed, its verified quality and where
its figures came from. The one type for every reader and writer of bench rows.

The bench driver builds these and writes their records (`to_record`) to bench.json; the selection policy
(kiln.core.selection), `--variant auto` (kiln.core.autoselect) and the deploy writers (kiln.deploy.common) read
them back with `from_record`. Only `variant` and `batch_size` are always there: a hand-made report, an older
bench.json or `--variant auto`'s quick measurement carries only the figures it has, and the rest stay None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    variant: str
    batch_size: int
    # Speed: medians over the rounds of each round's percentiles (kiln.bench.stats.combine_rounds).
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    items_per_s: float | None = None
    iterations: int | None = None
    rounds: int | None = None
    p50_min_ms: float | None = None
    p50_max_ms: float | None = None
    p50_by_round_ms: list[float] = field(default_factory=list)
    spread: float | None = None
    cv: float | None = None
    peak_rss_mb: float | None = None  # the worker's peak up to this batch size
    stable: bool = True
    unstable_reasons: list[str] = field(default_factory=list)
    # What the manifest says of the variant (measured at export): size, quality, what it is.
    bytes: int | None = None
    accuracy: float | None = None
    cosine_min: float | None = None
    format: str | None = None
    runtime: str | None = None
    precision: str | None = None
    pruning: str | None = None
    quantization: str | None = None
    batch_invariance: float | None = None
    # The roofline: GFLOP/s and the share of this machine's peak for the precision (emulated: BF16 without
    # native BF16 instructions).
    gflops_per_s: float | None = None
    pct_of_peak: float | None = None
    emulated: bool | None = None
    load_seconds: float | None = None
    speedup_vs_eager: float | None = None  # eager p50 / p50 at the same batch size

    def to_record(self) -> dict[str, Any]:
        """The row as bench.json holds it (every field, in this order)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BenchRow:
        """A row from bench.json or a hand-made report; keys this kiln does not know are ignored. A record without
        `variant` or `batch_size` raises TypeError."""
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})
