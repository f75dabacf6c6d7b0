"""Pruning: structured (channels removed, a smaller dense model) and unstructured (zeros in place).

Only structured pruning makes a model faster on dense CPU kernels; unstructured magnitude pruning
leaves every tensor its shape, so its report says that it buys compressibility, not speed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from kiln.core.errors import RecipeError, UsageError
from kiln.export import verify
from kiln.models.base import ModelBundle

UNSTRUCTURED_NOTE = (
    "unstructured sparsity keeps every tensor dense: no speedup on dense CPU kernels and the same file size "
    "(it only compresses better)"
)


def _prunable(module):
    from torch import nn

    return [(m, "weight") for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


def sparsity(module) -> float:
    total = zeros = 0
    for layer, name in _prunable(module):
        weight = getattr(layer, name)
        total += weight.numel()
        zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0


def prune_unstructured_(module, amount: float) -> dict:
    """Global L1 magnitude pruning across every conv/linear weight, made permanent."""
    import torch.nn.utils.prune as torch_prune

    targets = _prunable(module)
    if not targets:
        raise RecipeError("the model has no Conv or Linear layers to prune; drop the pruned variants")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for layer, name in targets:
        torch_prune.remove(layer, name)
    return {"method": "unstructured", "amount": amount, "sparsity": round(sparsity(module), 4), "note": UNSTRUCTURED_NOTE}


def prune_structured(module, example_inputs: tuple, amount: float):
    """A copy of `module` with `amount` of its channels removed (torch-pruning's dependency graph).

    The output layer is kept whole so the model's signature does not change.
    """
    import torch
    import torch_pruning as tp
    from torch import nn

    pruned = copy.deepcopy(module).eval()
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in pruned.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    if not convs and len(linears) < 2:
        raise RecipeError("structured pruning needs conv layers or several linear layers; use unstructured pruning")
    ignored = linears[-1:]  # the classifier / output projection keeps its shape
    with torch.enable_grad():  # torch-pruning traces dependencies through autograd
        macs_before, params_before = tp.utils.count_ops_and_params(pruned, example_inputs)
        pruner = tp.pruner.MagnitudePruner(
            pruned,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            ignored_layers=ignored,
        )
        pruner.step()
        macs_after, params_after = tp.utils.count_ops_and_params(pruned, example_inputs)
    report = {
        "method": "structured",
        "amount": amount,
        "params_before": int(params_before),
        "params_after": int(params_after),
        "macs_before": int(macs_before),
        "macs_after": int(macs_after),
        "channels": {name: m.out_channels for name, m in pruned.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))},
    }
    return pruned, report


# The eager module each variant starts from, by pruning method (None: the model itself), with its report.
Sources = dict[str | None, tuple[Any, dict | None]]


def prepare_sources(bundle: ModelBundle, methods: set[str], amount: float, fine_tune_epochs: int,
                    reference: np.ndarray, example_inputs: tuple, progress: Callable[[str], None]) -> Sources:
    """Prune once per method the recipe needs (structured then fine-tuned; unstructured in place on a copy)."""
    sources: Sources = {None: (bundle.module, None)}
    labels = bundle.evaluation.labels if bundle.task == "classification" else None
    if "structured" in methods:
        progress(f"[kiln] prune: structured, {amount:.0%} of channels")
        pruned, report = prune_structured(bundle.module, example_inputs, amount)
        report["accuracy_before_fine_tune"] = verify.compare(
            reference, verify.eager_outputs(pruned, bundle), labels, bundle.task).get("accuracy")
        if fine_tune_epochs:
            if bundle.fine_tune is None:
                raise UsageError(
                    f"structured pruning of {bundle.name!r} needs fine-tuning data, which this model lacks; "
                    "set prune.fine_tune_epochs = 0 or drop the pruned variants"
                )
            progress(f"[kiln] fine-tune: {fine_tune_epochs} epoch(s) to recover accuracy")
            bundle.fine_tune(pruned, fine_tune_epochs)
        report["fine_tune_epochs"] = fine_tune_epochs
        pruned.eval()
        sources["structured"] = (pruned, report)
        progress(f"[kiln] prune: params {report['params_before']:,} -> {report['params_after']:,}, "
                 f"MACs {report['macs_before']:,} -> {report['macs_after']:,}")
    if "unstructured" in methods:
        sparse = copy.deepcopy(bundle.module)
        report = prune_unstructured_(sparse, amount)
        sparse.eval()
        sources["unstructured"] = (sparse, report)
        progress(f"[kiln] prune: unstructured, sparsity {report['sparsity']:.1%} ({UNSTRUCTURED_NOTE})")
    return sources
