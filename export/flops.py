"""FLOPs per item of the eager model, counted at export and again at the benchmark's shapes.

torch's FlopCounterMode counts the matrix multiplies and convolutions, the work that bounds a model's speed on a
CPU. The figure is per item at a given input shape; for text models it grows with the sequence length, so the
export records the length it counted at and `kiln bench` counts again at its own --seq-len.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def count_flops(module: Any, arrays: dict[str, np.ndarray], names: list[str]) -> float:
    """FLOPs per item of one forward pass over `arrays` (first axis = items)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tensors = [torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names]
    counter = FlopCounterMode(display=False)
    # The counter's module tracker hooks the gradients of inputs that require them; a parameter used as a layer's
    # input (DeBERTa-v2's relative-position table) has none under inference mode, so count with grads off.
    trained = [p for p in module.parameters() if p.requires_grad] if hasattr(module, "parameters") else []
    for parameter in trained:
        parameter.requires_grad_(False)
    try:
        with counter, torch.inference_mode():
            module(*tensors)
    finally:
        for parameter in trained:
            parameter.requires_grad_(True)
    return float(counter.get_total_flops()) / len(tensors[0])


def flops_record(module: Any, arrays: dict[str, np.ndarray], names: list[str], text: bool) -> dict[str, Any]:
    """What the manifest records: FLOPs per item and the shape they were counted at."""
    first = arrays[names[0]]
    return {"per_item": count_flops(module, arrays, names), "batch": len(first),
            "seq_len": int(first.shape[1]) if text and first.ndim >= 2 else None, "counter": "torch FlopCounterMode"}
