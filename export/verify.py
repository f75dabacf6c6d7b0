"""Parity and task accuracy of an artifact against the eager fp32 model, on held-out data.

Every figure is measured on real evaluation inputs, never assumed from the precision. Failures
are returned as sentences, so the pipeline can collect all of them and raise once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.core.runtime import Runtime, run_batched
from kiln.export.recipe import Tolerances
from kiln.models.base import ModelBundle


def eager_outputs(module: Any, bundle: ModelBundle) -> np.ndarray:
    """The eager module's first output on the held-out data, through the same adapter that runs TorchScript."""
    from kiln.core.runtimes.torchscript import TorchRuntime

    runtime = TorchRuntime(module, bundle.signature, "eager")
    return run_batched(runtime, bundle.evaluation.inputs)[bundle.signature.output_names[0]]


def measure(runtime: Runtime, bundle: ModelBundle, parity_reference: np.ndarray, reference: np.ndarray) -> dict:
    """Figures of an artifact: parity against the eager module it was made from (the pruned one, for pruned
    variants), task figures against the original eager fp32 model, so every variant is judged on one scale."""
    labels = bundle.evaluation.labels if bundle.task == "classification" else None
    outputs = run_batched(runtime, bundle.evaluation.inputs)[bundle.signature.output_names[0]]
    parity = compare(parity_reference, outputs, labels, bundle.task)
    task = compare(reference, outputs, labels, bundle.task)
    figures = {
        "max_abs_error": parity["max_abs_error"],
        "max_rel_error": parity["max_rel_error"],
        "parity_cosine_min": parity["cosine_min"],
        "cosine_min": task["cosine_min"],
    }
    if "top1_agreement" in parity:
        figures["top1_agreement"] = parity["top1_agreement"]
    if "accuracy" in task:
        figures["accuracy"] = task["accuracy"]
    figures["evaluation_items"] = parity["items"]
    figures["parity_worst_item"] = parity["worst_item"]  # where the cosine is lowest (popped before the manifest)
    figures["worst_item"] = task["worst_item"]
    figures["batch_invariance"] = batch_invariance(runtime, bundle.evaluation.inputs,
                                                   bundle.signature.output_names[0])
    return figures


INVARIANCE_ITEMS = 8
INVARIANCE_BATCH = 17


def batch_invariance(runtime: Runtime, inputs: dict[str, np.ndarray], output: str,
                     items: int = INVARIANCE_ITEMS, batch: int = INVARIANCE_BATCH) -> dict:
    """How much an item's answer depends on the items batched with it: each of `items` items run alone, and
    again inside a batch of `batch` (itself first, then the items after it), compared by cosine and max abs diff.

    A server batches concurrent requests, so a variant whose answers move with their neighbours (dynamic INT8 with
    one activation scale per tensor, computed over the whole batch) answers the same request differently under
    different traffic. Text inputs keep their dataset-wide padding, so only the batch's company differs.
    """
    count = len(next(iter(inputs.values())))
    picked = range(min(items, count))
    worst_cosine, worst_abs = 1.0, 0.0
    for index in picked:
        rows = [(index + k) % count for k in range(min(batch, count))]
        alone = runtime.run({k: v[index:index + 1] for k, v in inputs.items()})[output]
        together = runtime.run({k: v[rows] for k, v in inputs.items()})[output][:1]
        a = alone.reshape(-1).astype(np.float64)
        b = together.reshape(-1).astype(np.float64)
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        worst_cosine = min(worst_cosine, cosine)
        worst_abs = max(worst_abs, float(np.abs(a - b).max()))
    return {"cosine_min": worst_cosine, "max_abs_diff": worst_abs, "items": len(picked),
            "batch": min(batch, count)}


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, task: str) -> dict:
    """max_abs, max_rel (relative to the largest reference magnitude), cosine per item, top-1, accuracy."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    diff = np.abs(ref - cand)
    scale = max(float(np.abs(ref).max()), 1e-12)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(1) / np.maximum(norms, 1e-12)
    figures = {
        "max_abs_error": float(diff.max()),
        "max_rel_error": float(diff.max() / scale),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "worst_item": int(cosine.argmin()),
        "items": len(ref),
    }
    if task == "classification":
        figures["top1_agreement"] = float((ref.argmax(1) == cand.argmax(1)).mean())
        if labels is not None:
            figures["accuracy"] = float((cand.argmax(1) == labels).mean())
    return figures


def check(variant: str, precision: str, figures: dict, reference_accuracy: float | None,
          tolerances: Tolerances, task: str = "classification") -> list[str]:
    """Parity to the artifact's own eager source always; for embeddings also the cosine to eager fp32."""
    failures = []
    floor = tolerances.cosine_min(precision)
    if figures["parity_cosine_min"] < floor:
        failures.append(f"{variant}: cosine_min {figures['parity_cosine_min']:.5f} < {floor} to its eager model")
    elif task == "embedding" and figures["cosine_min"] < floor:
        failures.append(f"{variant}: cosine_min {figures['cosine_min']:.5f} < {floor} to eager fp32")
    if reference_accuracy is not None and "accuracy" in figures:
        drop = (reference_accuracy - figures["accuracy"]) * 100.0
        allowed = tolerances.accuracy_drop(precision)
        if drop > allowed:
            failures.append(
                f"{variant}: accuracy {figures['accuracy'] * 100:.2f}% is {drop:.2f} points below eager fp32 "
                f"({reference_accuracy * 100:.2f}%), more than the {allowed} allowed"
            )
    return failures
