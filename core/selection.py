"""The one default-variant policy: the fastest measured variant whose verified figures fit the budget.

Pure: it takes a manifest and measured rows and returns the choice with its reasons, so `kiln bench --select`,
`kiln export --select` and `--variant auto` at serving time all choose by the same rule. Where nothing fits, the
fp32 default stays (`kiln.core.manifest.fp32_default`), never a lossy variant chosen without a measurement.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from kiln.core.bench_row import BenchRow
from kiln.core.errors import UnstableMeasurement, UsageError
from kiln.core.manifest import EAGER, Manifest, fp32_default

DEFAULT_SELECT_BATCH_SIZE = 16
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points
DEFAULT_MIN_COSINE = 0.99
# The worst cosine allowed between an item's answer alone and inside a batch (the manifest's batch_invariance):
# below it, served answers depend on concurrent traffic. fp32, bf16, static INT8 and per-token INT8 measure
# 0.9999-1.0; ONNX Runtime's dynamic INT8 (one activation scale per batch) measured 0.9956 on MiniLM.
DEFAULT_MIN_BATCH_INVARIANCE = 0.999


def choose(manifest: Manifest, report: dict[str, Any], batch_size: int, max_accuracy_drop: float | None = None,
           min_cosine: float | None = None, min_batch_invariance: float | None = None,
           accept_unstable: bool = False) -> dict[str, Any]:
    """The fastest measured variant whose manifest figures fit the budget, at `batch_size`.

    Classifiers (with a reference accuracy) are held to accuracy >= eager - drop; a min cosine is
    applied too when given. Other tasks are held to cosine_min >= min_cosine (default 0.99). Every task is held
    to batch_invariance >= min_batch_invariance (default 0.999) where the manifest measured it.
    """
    reference = manifest.reference_accuracy
    budget: dict = {}
    if reference is not None:
        budget["max_accuracy_drop"] = DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
        budget["min_accuracy"] = reference - budget["max_accuracy_drop"] / 100.0
    elif max_accuracy_drop is not None and min_cosine is None:
        raise UsageError(f"{manifest.model!r} ({manifest.task}) has no accuracy figure, so --max-accuracy-drop "
                         "does not apply; give a budget with --min-cosine, e.g. 0.99")
    if min_cosine is not None or reference is None:
        budget["min_cosine"] = DEFAULT_MIN_COSINE if min_cosine is None else min_cosine
    budget["min_batch_invariance"] = (DEFAULT_MIN_BATCH_INVARIANCE if min_batch_invariance is None
                                      else min_batch_invariance)
    rows = {r.variant: r for r in map(BenchRow.from_record, report["results"]) if r.batch_size == batch_size}
    if not rows:
        raise UsageError(f"batch size {batch_size} was not measured; add it to --batch-sizes")
    unstable = [name for name, row in rows.items() if not row.stable]
    if unstable and not accept_unstable:
        raise UnstableMeasurement(
            f"the measurements of {', '.join(unstable)} at batch {batch_size} are unstable (their rounds disagree: "
            "see the table's notes), so no default was chosen and the manifest is unchanged (bench.json records the "
            "run); re-run on a quiet machine, or pass --accept-unstable to choose anyway")
    fits: list[BenchRow] = []
    rejected: dict[str, str] = {}
    for name, row in rows.items():
        if name == EAGER:
            continue
        why = []
        if reference is not None:  # the budget then has min_accuracy
            if row.accuracy is None:
                why.append("no accuracy figure in the manifest")
            elif row.accuracy < budget["min_accuracy"] - 1e-9:
                why.append(f"accuracy {row.accuracy * 100:.2f}% is "
                           f"{(reference - row.accuracy) * 100:.2f} points below eager")
        if "min_cosine" in budget:
            if row.cosine_min is None:
                why.append("no cosine_min figure in the manifest")
            elif row.cosine_min < budget["min_cosine"]:
                why.append(f"cosine_min {row.cosine_min:.5f} < {budget['min_cosine']}")
        invariance = row.batch_invariance
        if invariance is not None and invariance < budget["min_batch_invariance"]:
            why.append(f"batch_invariance {invariance:.6f} < {budget['min_batch_invariance']} (its answers depend on "
                       "the requests batched with it)")
        if why:
            rejected[name] = "; ".join(why)
        else:
            fits.append(row)
    fits.sort(key=_p50)
    described = ", ".join(f"{k} {v:g}" for k, v in budget.items() if k != "min_accuracy")
    if fits:
        best = fits[0]
        chosen, default = best.variant, best.variant
        speedup = best.speedup_vs_eager
        reason = (f"fastest of {len(fits)} variant(s) within budget ({described}) at batch {batch_size}: "
                  f"p50 {_p50(best):.3f} ms" + (f", {speedup:.2f}x eager fp32" if speedup else ""))
    else:
        chosen, default = None, fp32_default(manifest.variants) or manifest.default_variant
        reason = f"no measured variant fits the budget ({described}) at batch {batch_size}; kept the fp32 default"
    return {
        "batch_size": batch_size,
        "budget": budget,
        "chosen": chosen,
        "default_variant": default,
        "reason": reason,
        "measured_p50_ms": {name: row.p50_ms for name, row in rows.items()},
        "rejected": rejected,
        "threads": report["settings"]["threads"],
        "cpu_model": report["machine"]["cpu_model"],
        # The machine the choice was made on: kiln serve and kiln.load compare it with theirs.
        "machine": {"cpu_model": report["machine"]["cpu_model"], "isa": report["machine"].get("isa", {}),
                    "usable_cpus": report["machine"].get("usable_cpus"),
                    "fingerprint": report["machine"].get("fingerprint")},
        "stable": all(r.stable for r in rows.values()),
        "selected_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _p50(row: BenchRow) -> float:
    """A measured row's p50; a row the policy compares was measured, so a missing one is a malformed report."""
    if row.p50_ms is None:
        raise UsageError(f"the report's row for {row.variant} at batch {row.batch_size} has no p50_ms; re-run kiln bench")
    return row.p50_ms
