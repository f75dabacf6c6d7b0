"""What the export pipeline needs to know about a model, whatever its source.

A zoo model and a user's `package.module:factory` model both become a `ModelBundle`: the fp32
eager module plus everything needed to verify it (signature, held-out data, task metric) and to
rebuild it later (its source), so the pipeline never special-cases a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kiln.models.signature import Signature

TASKS = ("classification", "embedding", "regression")

Arrays = dict[str, np.ndarray]


@dataclass
class Dataset:
    """Named input arrays (first axis = items) and optional labels."""

    inputs: Arrays
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: slice | np.ndarray) -> "Dataset":
        return Dataset(
            {k: v[index] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[index],
        )

    def batches(self, size: int):
        for start in range(0, len(self), size):
            yield self.take(slice(start, start + size))


@dataclass
class ModelBundle:
    name: str
    module: Any  # torch.nn.Module in eval mode, fp32
    signature: Signature
    task: str
    source: dict  # how to rebuild the module: {"zoo": name} or {"factory": ..., "checkpoint": ...}
    calibration: Dataset
    evaluation: Dataset
    training: Dataset | None = None  # for fine-tuning after structured pruning
    preprocessing: dict = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)  # copied into the artifact folder
    recommended_variants: tuple[str, ...] = ()
    # Builds a module for ONNX export when it differs from `module` (e.g. eager attention for fusion).
    onnx_module_factory: Callable[[], Any] | None = None
    onnx_optimizer: dict = field(default_factory=dict)  # e.g. {"model_type": "bert", "num_heads": 12, ...}
    example_batch: Callable[[int], Arrays] | None = None  # inputs of a given batch size, for tracing/benchmarks
    # "static" (calibrated QDQ) suits convnets; "dynamic" suits transformers, whose activations vary per input.
    int8_mode: str = "static"
    # Regex of graph node names kept in fp32 by INT8 quantization (the layers most sensitive to it).
    int8_keep_fp32: str | None = None
    # Trains a (pruned) module in place for some epochs on `training`; needed for structured pruning.
    fine_tune: Callable[[Any, int], None] | None = None

    def examples(self, batch_size: int) -> Arrays:
        if self.example_batch is not None:
            return self.example_batch(batch_size)
        data = self.evaluation
        index = np.arange(batch_size) % len(data)
        return {k: v[index] for k, v in data.inputs.items()}
