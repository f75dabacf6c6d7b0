"""The variant registry: what each named variant is, and which emitter makes each format.

One frozen `VariantSpec` per variant in place of positional tuples, and one `FormatSpec` per artifact format
naming its emitter module and the runtime that opens it by default (kiln.core.runtime's registry), and a variant may
name another runtime for its format's file (an ONNX file opened by a second runtime). As torchao pairs one
config dataclass with one registered handler, a new variant is one row here, a new format one emitter module
and one row here, and the pipeline never changes. The emitters' interface (kiln.export.emitter) names these rows,
so this module names emitters only by module path, and the two do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.core.errors import RecipeError

PRECISIONS = ("fp32", "bf16", "int8")
PRUNING_METHODS = ("structured", "unstructured")
QUANTIZATION_MODES = ("auto", "static", "dynamic")  # auto: the model's own preference (ExportHints.int8_mode)


@dataclass(frozen=True)
class FormatSpec:
    name: str
    runtime: str  # a name in kiln.core.runtime's registry: the runtime its variants name unless they name another
    emitter: str  # a module with `EMITTER`, an Emitter (kiln.export.emitter.emitter_for loads it)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    format: str
    precision: str = "fp32"
    quantization: str | None = None
    pruning: str | None = None
    # The runtime that opens the file, a name in kiln.core.runtime's registry (tests/test_unit_recipe.py checks every
    # row's); left empty: the format's own (FormatSpec.runtime), filled in on construction.
    runtime: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise RecipeError(f"variant {self.name!r}: format {self.format!r} is unknown; use one of {', '.join(FORMATS)}")
        if not self.runtime:
            object.__setattr__(self, "runtime", FORMATS[self.format].runtime)
        if self.precision not in PRECISIONS:
            raise RecipeError(f"variant {self.name!r}: precision {self.precision!r} is not one of {PRECISIONS}")
        if self.quantization not in (None, *QUANTIZATION_MODES):
            raise RecipeError(f"variant {self.name!r}: quantization {self.quantization!r} is not one of {QUANTIZATION_MODES}")
        if self.pruning not in (None, *PRUNING_METHODS):
            raise RecipeError(f"variant {self.name!r}: pruning {self.pruning!r} is not one of {PRUNING_METHODS}")


FORMATS: dict[str, FormatSpec] = {f.name: f for f in (
    FormatSpec("torchscript", runtime="torchscript", emitter="kiln.export.emit_torchscript"),
    FormatSpec("onnx", runtime="onnxruntime", emitter="kiln.export.emit_onnx"),
    FormatSpec("pt2", runtime="aotinductor", emitter="kiln.export.emit_pt2"),
    FormatSpec("openvino", runtime="openvino", emitter="kiln.export.emit_openvino"),
)}

VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (
    VariantSpec("torchscript-fp32", "torchscript"),
    VariantSpec("torchscript-bf16", "torchscript", "bf16"),
    VariantSpec("onnx-fp32", "onnx"),
    VariantSpec("onnx-int8", "onnx", "int8", quantization="auto"),
    VariantSpec("onnx-int8-dynamic", "onnx", "int8", quantization="dynamic"),
    VariantSpec("pruned-onnx-fp32", "onnx", pruning="structured"),
    VariantSpec("pruned-onnx-int8", "onnx", "int8", quantization="auto", pruning="structured"),
    VariantSpec("onnx-int8-static", "onnx", "int8", quantization="static"),
    VariantSpec("pruned-torchscript-fp32", "torchscript", pruning="structured"),
    VariantSpec("sparse-onnx-fp32", "onnx", pruning="unstructured"),
    VariantSpec("pt2-fp32", "pt2"),
    VariantSpec("pt2-bf16", "pt2", "bf16"),
    VariantSpec("pt2-int8", "pt2", "int8", quantization="dynamic"),
    VariantSpec("pruned-pt2-fp32", "pt2", pruning="structured"),
    VariantSpec("pruned-pt2-bf16", "pt2", "bf16", pruning="structured"),
    VariantSpec("ov-fp32", "openvino"),
    VariantSpec("ov-bf16", "openvino", "bf16"),
    VariantSpec("ov-int8", "openvino", "int8", quantization="static"),  # NNCF quantizes statically only
)}


def variant_spec(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise RecipeError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]
