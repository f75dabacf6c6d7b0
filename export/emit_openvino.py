"""OpenVINO IR artifacts (`<variant>.xml` + `<variant>.bin`): fp32, bf16 (a precision hint) and NNCF static INT8.

The graph comes from the torch module through `openvino.convert_model`, once per eager source (shared by the
variants made from it). Measured on MiniLM (2-core AMD EPYC Zen 5, AVX-512 BF16/VNNI, 2 threads, seq 128), against
the two ONNX graphs kiln already makes: converted from torch, bf16 ran as fast as from kiln's ORT-fused ONNX (5.8
vs 5.3 ms at batch 1, 68 vs 67 ms at 16) and much faster than from the unfused ONNX export (7.6 / 125 ms: no
attention fusion), and its NNCF INT8 was the fastest (3.4 / 43 ms against 4.4 / 47 from the fused graph, the same
accuracy); NNCF's accuracy control on the ORT-fused graph, with its contrib ops, returned garbage (FINDINGS). A
module the converter cannot trace falls back to kiln's fused ONNX graph (recorded in `build.graph_source`).

The variant's precision is recorded in the IR (kiln.core.runtimes.openvino reads it), so the file says how it
runs. Batch and sequence stay dynamic. INT8 is kiln.export.ov_quantize's NncfInt8 workflow.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

from kiln.core.errors import ExportError, ToolchainMissing, one_line
from kiln.core.machine import bf16_native
from kiln.core.runtimes.openvino import PRECISION_KEY, telemetry_off
from kiln.core.signature import Signature
from kiln.export import ov_quantize, precision  # noqa: F401 - ov_quantize registers the OpenVINO workflows
from kiln.export.emitter import EmitJob, EmitResult


def name_and_shape(model: Any, signature: Signature) -> None:
    """The signature's names on the model's inputs and outputs (in order), and its dynamic dimensions as -1."""
    import openvino as ov

    if len(model.inputs) != len(signature.inputs) or len(model.outputs) < len(signature.outputs):
        raise ExportError(f"the converted graph has {len(model.inputs)} inputs and {len(model.outputs)} outputs, the "
                          f"signature {len(signature.inputs)} and {len(signature.outputs)}")
    shapes = {}
    for port, spec in zip(model.inputs, signature.inputs):
        port.get_tensor().set_names({spec.name})
        shapes[spec.name] = ov.PartialShape([-1 if isinstance(d, str) else int(d) for d in spec.shape])
    for port, spec in zip(model.outputs, signature.outputs):
        port.get_tensor().set_names({spec.name})
    model.reshape(shapes)


class OpenVinoEmitter:
    def base_model(self, job: EmitJob) -> tuple[Any, dict[str, Any]]:
        """The fp32 OpenVINO model of the variant's eager source, converted once per export and pruning."""
        cache = job.shared.setdefault("openvino_base", {})
        if job.spec.pruning not in cache:
            cache[job.spec.pruning] = self.convert(job)
        model, info = cache[job.spec.pruning]
        return model.clone(), dict(info)

    def convert(self, job: EmitJob) -> tuple[Any, dict[str, Any]]:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ToolchainMissing(f"{job.spec.name} needs openvino, which is not installed; pip install "
                                   "'kiln[export]', or leave out the ov variants") from exc
        import torch

        telemetry_off()
        try:
            with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                model = ov.convert_model(job.module.eval(), example_input=job.example_inputs(2))
            name_and_shape(model, job.bundle.signature)
            return model, {"exporter": "openvino.convert_model", "graph_source": "torch", "openvino": ov.__version__}
        except Exception as exc:  # the ONNX graph is the second way, and its failure says why
            first = one_line(exc, 200)
        from kiln.export.emit_onnx import EMITTER as ONNX

        path, onnx_info = ONNX.base_graph(job)
        try:
            model = ov.Core().read_model(str(path))
            name_and_shape(model, job.bundle.signature)
        except Exception as exc:
            raise ExportError(f"OpenVINO could convert neither the torch module ({first}) nor kiln's ONNX graph "
                              f"({one_line(exc, 200)}); leave out the ov variants") from exc
        return model, {"exporter": "openvino.read_model", "graph_source": "onnx", "onnx": onnx_info,
                       "convert_model_error": first, "openvino": ov.__version__}

    def emit(self, job: EmitJob) -> EmitResult:
        import openvino as ov

        if job.spec.precision == "bf16" and not bf16_native():
            raise ToolchainMissing(f"{job.spec.name} runs in bf16, and this CPU has neither AVX-512 BF16 nor AMX: "
                                   "OpenVINO would run it in fp32; export it on a CPU that has them, or leave it out")
        model, info = self.base_model(job)
        # InferencePrecision, NncfInt8 (handlers in kiln.export.ov_quantize), or None
        config = precision.workflow(job.spec, job.bundle.hints)
        quantization = None
        if config is not None:
            model, quantization = precision.apply(config, model, job)
        model.set_rt_info(job.spec.precision, PRECISION_KEY)
        try:
            ov.save_model(model, str(job.target), compress_to_fp16=False)
        except Exception as exc:
            raise ExportError(f"writing {job.target.name} failed: {one_line(exc, 300)}; check the disk") from exc
        return EmitResult(info, quantization, companions=[job.target.with_suffix(".bin")])


EMITTER = OpenVinoEmitter()
