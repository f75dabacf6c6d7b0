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

from kiln.models.signature import Signature


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
            text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {text[:300]}")
            path.unlink(missing_ok=True)
    raise RuntimeError("; ".join(errors))


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
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        return {"optimizer": "onnxruntime.transformers", "fused": fused}
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {"optimizer": "onnxruntime", "level": "basic"}
