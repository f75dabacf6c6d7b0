"""What the export pipeline needs to know about a model, whatever its source.

A zoo model and a user's `package.module:factory` model both become a `ModelBundle`: the fp32 eager module plus
what is needed to verify it (signature, held-out data, task metric) and to rebuild it later (its source), so the
pipeline never special-cases a model. How the model is best exported (INT8 mode, nodes kept in fp32, the module
built for ONNX, the transformer optimizer's settings, the recommended variants) is a separate `ExportHints`, as
optimum keeps an `OnnxConfig` per architecture beside the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import ModelSourceError
from kiln.core.signature import Signature

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

    def batches(self, size: int) -> Iterator["Dataset"]:
        for start in range(0, len(self), size):
            yield self.take(slice(start, start + size))


@dataclass(frozen=True)
class ExportHints:
    """Per-model export choices; the defaults suit a small convnet or MLP."""

    recommended_variants: tuple[str, ...] = ("torchscript-fp32", "onnx-fp32", "onnx-int8")
    # "static" (calibrated QDQ) suits convnets; "dynamic" suits transformers, whose activations vary per input.
    int8_mode: str = "static"
    # torchao INT8 (pt2-int8): how activations are quantized per token. "asymmetric" (a zero point) suits inputs that
    # are far from symmetric around 0, as a transformer's GELU outputs are; "symmetric" is torchao's default.
    int8_activations: str = "symmetric"
    # Regex of graph node names kept in fp32 by INT8 quantization (the layers most sensitive to it).
    int8_keep_fp32: str | None = None
    # A context that sets the given eager module up for ONNX export and restores it after (a transformer switched to
    # the attention implementation ONNX Runtime fuses), so the model is loaded once, not once per format.
    onnx_module: Callable[[Any], AbstractContextManager[Any]] | None = None
    # ONNX Runtime's transformer optimizer settings, e.g. {"model_type": "bert", "num_heads": 12, "hidden_size": 384}.
    onnx_optimizer: dict[str, Any] = field(default_factory=dict)
    # Recipe values this model needs unless the user sets them: a family's opset, its tolerances ({"tolerances": {
    # "int8_cosine_min": 0.98}}); under a --recipe file's values and every flag.
    recipe_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceRequest:
    """What the user named and gave: the reference plus the flags a source may need. It lives here, beside the
    bundle, because every source takes one and the registry (kiln.models.registry) imports every source."""

    reference: str
    checkpoint: str | Path | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    data: str | Path | None = None
    name: str | None = None
    task: str | None = None  # overrides what a source detects (a Hugging Face folder's task)


# Inputs of a given batch size, padded to a given sequence length for text models (None: the model's own length).
ExampleBatch = Callable[[int, "int | None"], Arrays]


@dataclass
class ModelBundle:
    name: str
    module: Any  # torch.nn.Module in eval mode, fp32
    signature: Signature
    task: str
    source: dict[str, Any]  # how to rebuild the module: {"zoo": name} or {"factory": ..., "checkpoint": ...}
    calibration: Dataset
    evaluation: Dataset
    training: Dataset | None = None  # for fine-tuning after structured pruning
    preprocessing: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)  # copied into the artifact folder
    hints: ExportHints = field(default_factory=ExportHints)
    example_batch: ExampleBatch | None = None  # real examples of a batch size (and sequence length), for tracing/bench
    # Trains a (pruned) module in place for some epochs on `training`; needed for structured pruning.
    fine_tune: Callable[[Any, int], None] | None = None
    # Why a figure could not be measured, for the manifest and the report ("task accuracy: not measured ...").
    data_note: str | None = None
    # The texts behind `evaluation` (text models), so a failed check can name the item it was worst on.
    evaluation_texts: list[str] | None = None

    def examples(self, batch_size: int, seq_len: int | None = None) -> Arrays:
        if self.example_batch is not None:
            return self.example_batch(batch_size, seq_len)
        data = self.evaluation
        index = np.arange(batch_size) % len(data)
        return {k: v[index] for k, v in data.inputs.items()}


def unsafe_pickle(what: str, fix: str) -> ModelSourceError:
    """The refusal for a pickle weights file that holds more than tensors. torch's own message advises
    `weights_only=False`, which would run whatever code the file carries: kiln never says so and never does it."""
    return ModelSourceError(f"{what} is a pickle that holds more than plain tensors, and kiln will not load pickle "
                            f"weights it cannot load safely (unpickling them could run code from the file); {fix}")
