"""The export report a user reads after `kiln export`: every variant's figures, the default, and the notes that
change a decision (unstructured sparsity buys no speed; bf16 emulated on this CPU)."""

from __future__ import annotations

from kiln.core.console import format_table
from kiln.core.machine import bf16_native
from kiln.core.manifest import Manifest


def format_report(manifest: Manifest) -> str:
    rows = [("variant", "format", "precision", "pruning", "MB", "accuracy", "cosine_min", "max_abs_err",
             "batch_invariance")]
    for v in manifest.variants:
        rows.append((
            v.name + (" *" if v.name == manifest.default_variant else ""),
            v.format, v.precision, v.pruning_method or "-",
            f"{v.total_bytes / 1e6:.2f}",
            f"{v.accuracy * 100:.2f}%" if v.accuracy is not None else "-",
            f"{v.cosine_min:.5f}" if v.cosine_min is not None else "-",
            f"{v.max_abs_error:.3g}" if v.max_abs_error is not None else "-",
            f"{v.batch_invariance['cosine_min']:.6f}" if v.batch_invariance else "-",
        ))
    lines = [f"{manifest.model} -> {manifest.folder}  (* = default variant)", format_table(rows, len(rows[0]))]
    if manifest.reference_accuracy is not None:
        lines.append(f"eager fp32 accuracy: {manifest.reference_accuracy * 100:.2f}% on "
                     f"{manifest.reference['items']} held-out items")
    if manifest.source.get("family"):
        lines.append(f"family: {manifest.source['family']}")
    if manifest.reference.get("note"):
        lines.append(f"note: {manifest.reference['note']}")
    lines.append("batch_invariance: the worst cosine between an item run alone and inside a batch of others "
                 "(1.0: answers do not depend on the requests batched with them)")
    for skipped in manifest.skipped:
        lines.append(f"left out: {skipped['variant']}: {skipped['reason']}")
    for v in manifest.variants:
        note = (v.pruning or {}).get("note")
        if note:
            lines.append(f"note: {v.name}: {note}")
    if any(v.precision == "bf16" for v in manifest.variants) and not bf16_native():
        lines.append("note: this CPU has neither AVX512-BF16 nor AMX: bf16 runs emulated here and is slower than "
                     "fp32; `kiln bench` measures how much")
    return "\n".join(lines)
