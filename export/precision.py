"""Precision and quantization workflows: one frozen config type per workflow and one registered handler per type.

This is the shape of torchao's `_QUANTIZE_CONFIG_HANDLER`: which workflow a variant gets is one row of `WORKFLOWS`
(format, precision, quantization mode -> config), and how a config is applied is the handler registered for its
type. The emitters ask `workflow(spec, hints)` and call `apply(config, ...)`; none of them branches on a precision
name, so a new workflow (NNCF INT8 for OpenVINO) is one config type, one `@register` handler and one row here.

Two kinds of handler exist, by what they transform:
- module workflows (`Bf16Weights`, `TorchaoInt8`): `handler(config, module) -> module`, a changed copy of the eager
  module an emitter then exports; their handlers live here, shared by every emitter that starts from eager torch.
- file workflows (`OnnxDynamicInt8`, `OnnxStaticInt8`): `handler(config, source, target, bundle) -> dict`, which
  writes `target` from an exported `source` and returns the manifest's `quantization` record; their handlers live
  beside the library they call (kiln.export.quantize), registered when it is imported (its format's emitter does).
- OpenVINO model workflows (`InferencePrecision`, `NncfInt8`): `handler(config, model, job) -> (model, record)`,
  on an `openvino.Model` in memory; registered by kiln.export.ov_quantize, which the OpenVINO emitter imports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kiln.core.errors import ExportError, ToolchainMissing

if TYPE_CHECKING:
    from kiln.export.variants import VariantSpec
    from kiln.models.base import ExportHints


@dataclass(frozen=True)
class Bf16Weights:
    """Weights in bfloat16; inputs cast in and outputs back to float32 inside the module, so the signature holds."""


@dataclass(frozen=True)
class TorchaoInt8:
    """torchao's dynamic INT8: INT8 weights per channel, activations quantized per token at run time."""

    activations: str = "symmetric"  # or "asymmetric": a zero point per token (ExportHints.int8_activations)

    def record(self) -> dict[str, Any]:
        return {"mode": "dynamic", "library": "torchao", "weights": "int8 per channel",
                "activations": f"int8 per token (row), {self.activations}"}


@dataclass(frozen=True)
class OnnxDynamicInt8:
    """ONNX Runtime's dynamic INT8 of MatMul/Gemm; nodes whose names match `keep_fp32` stay fp32."""

    keep_fp32: str | None = None


@dataclass(frozen=True)
class OnnxStaticInt8:
    """ONNX Runtime's static QDQ INT8, activation ranges calibrated on the model's calibration set."""

    calibration_batch: int = 16


@dataclass(frozen=True)
class InferencePrecision:
    """OpenVINO's bf16: the weights stay fp32 in the IR, the CPU plugin computes in `precision` (a hint, recorded in
    the IR by the emitter): no transformation of the graph."""

    precision: str = "bf16"


@dataclass(frozen=True)
class NncfInt8:
    """NNCF static INT8 of an OpenVINO model, calibrated on the model's calibration set, with a bounded accuracy
    control: where the quantized model misses the variant's cosine budget on calibration items it was not fitted on,
    the layers that cost the most are kept in higher precision (NNCF's `ignored_scope`), a few at a time, for at
    most `max_steps` steps (kiln.export.ov_quantize)."""

    model_type: str = "transformer"  # nncf.ModelType, or "" for a convnet/MLP
    max_steps: int = 6  # accuracy-control steps after the plain quantization
    fraction_per_step: float = 1 / 12  # of the quantized layers kept in higher precision at each step
    subset_size: int = 300  # calibration items NNCF collects statistics on (all of kiln's, usually fewer)

    def record(self) -> dict[str, Any]:
        return {"mode": "static", "library": "nncf", "model_type": self.model_type or None,
                "weights": "int8 per channel, symmetric", "activations": "int8 per tensor (calibrated ranges)",
                "max_steps": self.max_steps, "fraction_per_step": round(self.fraction_per_step, 4)}


HANDLERS: dict[type, Callable[..., Any]] = {}
Handler = TypeVar("Handler", bound=Callable[..., Any])

# (format, precision, quantization mode after "auto" is resolved) -> the workflow's config, made from the model's
# export hints. fp32 without quantization has no workflow. A row names an existing config type; a new one is
# `@register`ed where its library is called.
WORKFLOWS: dict[tuple[str, str, str | None], Callable[["ExportHints"], Any]] = {
    ("torchscript", "bf16", None): lambda hints: Bf16Weights(),
    ("pt2", "bf16", None): lambda hints: Bf16Weights(),
    ("pt2", "int8", "dynamic"): lambda hints: TorchaoInt8(hints.int8_activations),
    ("onnx", "int8", "dynamic"): lambda hints: OnnxDynamicInt8(hints.int8_keep_fp32),
    ("onnx", "int8", "static"): lambda hints: OnnxStaticInt8(),
    ("openvino", "bf16", None): lambda hints: InferencePrecision("bf16"),
    ("openvino", "int8", "static"): lambda hints: NncfInt8(
        model_type="transformer" if hints.onnx_optimizer else ""),
}


def register(config_type: type) -> Callable[[Handler], Handler]:
    """Register the handler that applies configs of `config_type` (one handler per type)."""

    def decorate(handler: Handler) -> Handler:
        HANDLERS[config_type] = handler
        return handler

    return decorate


def workflow(spec: "VariantSpec", hints: "ExportHints") -> Any | None:
    """The config of the variant's precision workflow (None: plain fp32); "auto" quantization is the model's own
    preferred mode (ExportHints.int8_mode)."""
    mode = hints.int8_mode if spec.quantization == "auto" else spec.quantization
    if spec.precision == "fp32" and mode is None:
        return None
    row = WORKFLOWS.get((spec.format, spec.precision, mode))
    if row is None:
        known = ", ".join(f"{f} {p}" + (f" {m}" if m else "") for f, p, m in WORKFLOWS)
        raise ExportError(f"variant {spec.name!r}: no {spec.precision} workflow"
                          + (f" with {mode} quantization" if mode else "") + f" for the {spec.format} format; "
                          f"kiln has: {known}")
    return row(hints)


def apply(config: Any, *subject: Any) -> Any:
    """Run the handler registered for `config`'s type on `subject` (a module, or source, target and bundle)."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ExportError(f"no handler is registered for {type(config).__name__}; import the module that registers "
                          "it (its format's emitter) before applying it")
    return handler(config, *subject)


@register(Bf16Weights)
def bf16_copy(config: Bf16Weights, module: Any) -> Any:
    """A bfloat16 copy of `module` that takes and returns float32 (a client never sees the difference)."""
    import torch
    from torch import nn

    class BFloat16Module(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            cast = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
            return self.inner(*cast).float()

    return BFloat16Module(copy.deepcopy(module).to(torch.bfloat16)).eval()


@register(TorchaoInt8)
def torchao_int8_copy(config: TorchaoInt8, module: Any) -> Any:
    """torchao's dynamic INT8 of a copy of `module`.

    Per-row activation scales keep an item's answer independent of the items batched with it, unlike ONNX
    Runtime's dynamic INT8, whose one scale per tensor is computed over the whole batch. Asymmetric activations
    (a zero point per token) spend the 8 bits on the range a GELU output really has: on MiniLM they took the worst
    item's cosine to fp32 from 0.978 to 0.992 (README), for about 9% more time at batch 16.
    """
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        from torchao.quantization.quant_primitives import MappingType
    except ImportError as exc:
        raise ToolchainMissing("pt2-int8 needs torchao, which is not installed; pip install torchao, or leave out "
                               "the pt2-int8 variant") from exc
    quantized = copy.deepcopy(module).eval()
    mapping = MappingType.ASYMMETRIC if config.activations == "asymmetric" else MappingType.SYMMETRIC
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping))
    return quantized
