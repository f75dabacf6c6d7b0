"""ONNX artifacts: export with dynamic batch (and sequence) axes, then optimize for ONNX Runtime.

Transformers are exported from a module built with eager attention: only that graph lets ONNX
Runtime's transformer optimizer fuse Attention, SkipLayerNorm and BiasGelu. Other models get ONNX
Runtime's basic graph optimizations (constant folding, Conv+BN fusion) saved into the file; the
hardware-specific levels are applied when a session loads it.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

from kiln.core.errors import ExportError, one_line
from kiln.core.signature import Signature
from kiln.export import precision, quantize
from kiln.export.emitter import EmitJob, EmitResult


def dynamic_axes(signature: Signature) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in (*signature.inputs, *signature.outputs):
        named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        if named:
            axes[spec.name] = named
    return axes


def export_onnx(module, example_inputs: tuple, path: Path, signature: Signature, opset: int) -> dict:
    """Plain export; the TorchScript-based exporter first (it keeps fusable patterns), dynamo second."""
    import torch

    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                kwargs = dict(
                    input_names=signature.input_names,
                    output_names=signature.output_names,
                    opset_version=opset,
                    dynamo=dynamo,
                )
                if dynamo:
                    kwargs["dynamic_shapes"] = {
                        name: {i: torch.export.Dim.AUTO for i in axes}
                        for name, axes in dynamic_axes(signature).items() if name in signature.input_names
                    }
                    kwargs["external_data"] = False
                    kwargs["verbose"] = False
                else:
                    kwargs["dynamic_axes"] = dynamic_axes(signature)
                # The dynamo exporter narrates its steps on stdout; keep the CLI's output to kiln's own.
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(module.eval(), example_inputs, str(path), **kwargs)
            import onnx

            onnx.checker.check_model(str(path))
            return {"exporter": "dynamo" if dynamo else "torchscript", "opset": opset}
        except Exception as exc:  # keep both reasons: the second is often the real one
            text = re.sub(r"\x1b\[[0-9;]*m", "", one_line(exc))
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {text[:300]}")
            path.unlink(missing_ok=True)
    raise RuntimeError("; ".join(errors))


FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization")


def fused_op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {op: sum(1 for n in graph.node if n.op_type == op) for op in FUSED_OPS}


def optimize_onnx(source: Path, target: Path, transformer: dict | None = None) -> dict:
    """Write an ONNX Runtime-optimized copy of `source` to `target`."""
    if transformer:
        from onnxruntime.transformers.optimizer import optimize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(
                str(source),
                model_type=transformer.get("model_type", "bert"),
                num_heads=transformer.get("num_heads", 0),
                hidden_size=transformer.get("hidden_size", 0),
                opt_level=1,
            )
        optimized.save_model_to_file(str(target))
        # Only the optimizer's BERT model class counts what it fused; the others say nothing, so kiln counts.
        counted = getattr(optimized, "get_fused_operator_statistics", None)
        fused = counted() if counted else fused_op_counts(target)
        return {"optimizer": "onnxruntime.transformers", "model_type": transformer.get("model_type", "bert"),
                "fused": {k: v for k, v in fused.items() if v}}
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {"optimizer": "onnxruntime", "level": "basic"}


class OnnxEmitter:
    """fp32: export once per eager source and optimize (shared by the variants that start from it); INT8: quantize
    that optimized graph, in the variant's mode or the model's preferred one."""

    def base_graph(self, job: EmitJob) -> tuple[Path, dict]:
        pruning = job.spec.pruning
        cache = job.shared.setdefault("onnx_base", {})
        if pruning in cache:
            return cache[pruning]
        hints = job.bundle.hints
        raw = job.scratch / f"{pruning or 'base'}.raw.onnx"
        optimized = job.scratch / f"{pruning or 'base'}.opt.onnx"
        setup = hints.onnx_module or contextlib.nullcontext
        try:
            with setup(job.module) as module:
                info = export_onnx(module, job.example_inputs(), raw, job.bundle.signature, job.recipe.opset)
            info.update(optimize_onnx(raw, optimized, hints.onnx_optimizer or None))
            raw.unlink()
        except Exception as exc:
            raise ExportError(f"ONNX export of {job.bundle.name!r} failed: {exc}; "
                              "check that the model is traceable, or export only TorchScript variants") from exc
        cache[pruning] = (optimized, info)
        return cache[pruning]

    def emit(self, job: EmitJob) -> EmitResult:
        import shutil

        base, info = self.base_graph(job)
        config = precision.workflow(job.spec, job.bundle.hints)  # an INT8 workflow of kiln.export.quantize, or None
        quant_info = None
        try:
            if config is None:
                shutil.copyfile(base, job.target)
            else:
                quant_info = precision.apply(config, base, job.target, job.bundle)
        except Exception as exc:
            raise ExportError(f"quantization of {job.spec.name} failed: {one_line(exc, 300)}; "
                              "drop the INT8 variant or try onnx-int8-dynamic") from exc
        if quant_info is not None:
            quant_info["int8_nodes"] = quantize.int8_node_counts(job.target)
        return EmitResult(dict(info), quant_info)


EMITTER = OnnxEmitter()
