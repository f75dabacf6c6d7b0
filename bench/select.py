"""The one default-variant policy, used by `kiln bench --select` and `kiln export --select` alike.

The fastest measured variant whose verified figures fit the budget becomes the manifest's default; where none
fits, the fp32 default stays (`kiln.core.manifest.fp32_default`), never a lossy variant chosen without a
measurement. Only `default_variant` and `selection` change, written atomically, and only if the artifacts did
not change while they were being measured.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from kiln.core.console import Progress, to_stderr
from kiln.core.errors import ManifestError, UsageError
from kiln.core.manifest import EAGER, Manifest, fp32_default, read_manifest

DEFAULT_SELECT_BATCH_SIZE = 16
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points
DEFAULT_MIN_COSINE = 0.99
# The worst cosine allowed between an item's answer alone and inside a batch (the manifest's batch_invariance):
# below it, served answers depend on concurrent traffic. fp32, bf16, static INT8 and per-token INT8 measure
# 0.9999-1.0; ONNX Runtime's dynamic INT8 (one activation scale per batch) measured 0.9956 on MiniLM.
DEFAULT_MIN_BATCH_INVARIANCE = 0.999


def choose(manifest: Manifest, report: dict[str, Any], batch_size: int, max_accuracy_drop: float | None = None,
           min_cosine: float | None = None, min_batch_invariance: float | None = None) -> dict[str, Any]:
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
    rows = {r["variant"]: r for r in report["results"] if r["batch_size"] == batch_size}
    if not rows:
        raise UsageError(f"batch size {batch_size} was not measured; add it to --batch-sizes")
    fits, rejected = [], {}
    for name, row in rows.items():
        if name == EAGER:
            continue
        why = []
        if "min_accuracy" in budget:
            if row.get("accuracy") is None:
                why.append("no accuracy figure in the manifest")
            elif row["accuracy"] < budget["min_accuracy"] - 1e-9:
                why.append(f"accuracy {row['accuracy'] * 100:.2f}% is "
                           f"{(reference - row['accuracy']) * 100:.2f} points below eager")
        if "min_cosine" in budget:
            if row.get("cosine_min") is None:
                why.append("no cosine_min figure in the manifest")
            elif row["cosine_min"] < budget["min_cosine"]:
                why.append(f"cosine_min {row['cosine_min']:.5f} < {budget['min_cosine']}")
        invariance = row.get("batch_invariance")
        if invariance is not None and invariance < budget["min_batch_invariance"]:
            why.append(f"batch_invariance {invariance:.6f} < {budget['min_batch_invariance']} (its answers depend on "
                       "the requests batched with it)")
        if why:
            rejected[name] = "; ".join(why)
        else:
            fits.append(row)
    fits.sort(key=lambda r: r["p50_ms"])
    described = ", ".join(f"{k} {v:g}" for k, v in budget.items() if k != "min_accuracy")
    if fits:
        best = fits[0]
        chosen, default = best["variant"], best["variant"]
        reason = (f"fastest of {len(fits)} variant(s) within budget ({described}) at batch {batch_size}: "
                  f"p50 {best['p50_ms']:.3f} ms, {best['speedup_vs_eager']:.2f}x eager fp32")
    else:
        chosen, default = None, fp32_default(manifest.variants) or manifest.default_variant
        reason = f"no measured variant fits the budget ({described}) at batch {batch_size}; kept the fp32 default"
    return {
        "batch_size": batch_size,
        "budget": budget,
        "chosen": chosen,
        "default_variant": default,
        "reason": reason,
        "measured_p50_ms": {name: row["p50_ms"] for name, row in rows.items()},
        "rejected": rejected,
        "threads": report["settings"]["threads"],
        "cpu_model": report["machine"]["cpu_model"],
        "selected_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def apply_selection(folder: str | Path, selection: dict[str, Any], hashes: dict[str, str]) -> None:
    """Re-read the manifest, set default_variant and selection, save atomically (Manifest.save)."""
    manifest = read_manifest(folder)
    default = selection["default_variant"]
    entry = next((v for v in manifest.variants if v.name == default), None)
    if entry is None or (default in hashes and entry.sha256 != hashes[default]):
        raise ManifestError(f"{folder} changed while it was being measured (variant {default!r}); "
                            "run kiln bench --select again")
    manifest.default_variant = default
    manifest.selection = selection
    manifest.save()  # write_json_atomic keeps the file's mode, so a server running as another user still reads it
    read_manifest(folder)  # what a server will read must still be valid


def select_default(folder: str | Path, max_accuracy_drop: float | None = None, min_cosine: float | None = None,
                   batch_size: int = DEFAULT_SELECT_BATCH_SIZE, threads: int | None = None,
                   progress: Progress = to_stderr, min_batch_invariance: float | None = None) -> dict[str, Any]:
    """Measure every variant at one batch size and make the fastest within budget the default (`export --select`)."""
    from kiln.bench.driver import BenchSettings, measure

    settings = BenchSettings(batch_sizes=(batch_size,), threads=threads)
    report = measure(folder, settings, progress)
    selection = choose(read_manifest(folder), report, batch_size, max_accuracy_drop, min_cosine, min_batch_invariance)
    apply_selection(folder, selection, report["hashes"])
    progress(f"[kiln] select: default variant {selection['default_variant']}: {selection['reason']}")
    return selection
