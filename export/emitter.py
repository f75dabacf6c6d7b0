"""The one interface every artifact format's emitter implements: an `EmitJob` in, files and an `EmitResult` out.

The pipeline hands each emitter the eager module the variant starts from (pruned or not), the model's bundle
(signature, examples, calibration data, export hints) and where to write; it never knows which format it is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.export.variants import FORMATS, VariantSpec

if TYPE_CHECKING:
    from kiln.export.recipe import Recipe
    from kiln.models.base import ModelBundle


@dataclass
class EmitJob:
    spec: VariantSpec
    module: Any  # the eager torch module this variant is made from (after pruning, where it is pruned)
    bundle: "ModelBundle"
    recipe: "Recipe"
    target: Path  # the artifact file to write (the one its runtime opens); others beside it: EmitResult.companions
    scratch: Path  # a folder for intermediate files, removed before publishing
    shared: dict[str, Any] = field(default_factory=dict)  # per-export cache across variants (e.g. an fp32 base graph)

    def example_inputs(self, batch: int = 2) -> tuple[Any, ...]:
        return example_inputs(self.bundle, batch)


def example_inputs(bundle: "ModelBundle", batch: int = 2) -> tuple[Any, ...]:
    """Real examples as torch tensors in signature order; a batch of 2 keeps the batch dimension dynamic."""
    import numpy as np
    import torch

    examples = bundle.examples(batch)
    return tuple(torch.from_numpy(np.ascontiguousarray(examples[n])) for n in bundle.signature.input_names)


@dataclass
class EmitResult:
    build: dict[str, Any]  # how the artifact was made (exporter, optimizer, fused ops...)
    quantization: dict[str, Any] | None = None
    # Further files the artifact is made of, written beside `target` and named `<target's stem>.<anything>` (an
    # OpenVINO model's weights `.bin` beside its `.xml`): each is hashed into the manifest and checked before a load.
    companions: list[Path] = field(default_factory=list)


class Emitter(Protocol):
    def emit(self, job: EmitJob) -> EmitResult:
        """Write `job.target` (and any companions it names); raise ExportError with what failed and what to do."""
        ...


def emitter_for(spec: VariantSpec) -> Emitter:
    """The emitter of the variant's format, imported only when a variant of that format is made (so torch and
    onnx load only when needed)."""
    emitter: Emitter = importlib.import_module(FORMATS[spec.format].emitter).EMITTER
    return emitter
