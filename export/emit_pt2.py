"""`.pt2` artifacts: torch.export, then AOTInductor compiles the graph ahead of time into a package of C++ kernels.

The batch dimension (and a text model's sequence dimension) is exported dynamic, from a batch of 2: a batch of 1
would specialize the dimension. Weights are frozen into the compiled graph (inductor's `freezing`), which lets it
fold constants and pick kernels for them. BF16 wraps the module as the TorchScript emitter does: inputs are cast
in and outputs back to float32, so the signature does not change. The package records nothing about how it was
built, so the emitter returns it for the manifest: torch version, compiler, inductor settings, compile seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from typing import Any

from kiln.core.errors import ExportError, ToolchainMissing, one_line
from kiln.core.signature import Signature
from kiln.export.emitter import EmitJob, EmitResult

INDUCTOR_CONFIGS = {"freezing": True}
MAX_BATCH = 4096
MAX_SEQUENCE = 8192


def cxx_compiler() -> str | None:
    """The C++ compiler inductor will call: $CXX, else g++ or c++ on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compiler_version(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return path


def dynamic_shapes(signature: Signature, sequence_max: int) -> tuple[dict[int, Any], ...]:
    """One torch.export Dim per symbolic name, shared by every input that names it (batch, sequence, ...)."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = []
    for spec in signature.inputs:
        axes = {}
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                if dim not in dims:
                    top = MAX_BATCH if axis == 0 else sequence_max
                    dims[dim] = Dim(dim.replace(".", "_"), min=1, max=top)
                axes[axis] = dims[dim]
        shapes.append(axes)
    return tuple(shapes)


def takes_varargs(module: Any) -> bool:
    """Whether forward is `forward(*inputs)` (kiln's wrappers), which torch.export wants dynamic shapes nested for."""
    import inspect

    parameters = inspect.signature(module.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def int8_copy(module: Any, activations: str = "symmetric") -> Any:
    """torchao's dynamic INT8: INT8 weights per channel, activations quantized per token (per row) at run time.

    Per-row activation scales keep an item's answer independent of the items batched with it, unlike ONNX
    Runtime's dynamic INT8, whose one scale per tensor is computed over the whole batch. Asymmetric activations
    (a zero point per token) spend the 8 bits on the range a GELU output really has: on MiniLM they took the worst
    item's cosine to fp32 from 0.978 to 0.992 (README), for about 9% more time at batch 16.
    """
    import copy

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        from torchao.quantization.quant_primitives import MappingType
    except ImportError as exc:
        raise ToolchainMissing("pt2-int8 needs torchao, which is not installed; pip install torchao, or leave out "
                               "the pt2-int8 variant") from exc
    quantized = copy.deepcopy(module).eval()
    mapping = MappingType.ASYMMETRIC if activations == "asymmetric" else MappingType.SYMMETRIC
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping))
    return quantized


class Pt2Emitter:
    def emit(self, job: EmitJob) -> EmitResult:
        import torch

        compiler = cxx_compiler()
        if compiler is None:
            raise ToolchainMissing(f"{job.spec.name} needs a C++ compiler for AOTInductor and none was found ($CXX, "
                                   "g++, c++); install one (apt-get install g++) or leave out the pt2 variants")
        module = job.module
        sequence_max = int(job.bundle.preprocessing.get("max_length", MAX_SEQUENCE))
        shapes: tuple[Any, ...] = dynamic_shapes(job.bundle.signature, sequence_max)
        if job.spec.precision == "bf16":
            from kiln.export.emit_torchscript import bf16_copy

            module = bf16_copy(module)
        elif job.spec.precision == "int8":
            module = int8_copy(module, job.bundle.hints.int8_activations)
        module = module.eval()
        if takes_varargs(module):
            shapes = (shapes,)  # `forward(*inputs)`: one varargs entry holding every input's dims
        examples = job.example_inputs(2)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.export.export(module, examples, dynamic_shapes=shapes)
                exported_s = time.perf_counter() - started
                torch._inductor.aoti_compile_and_package(program, package_path=str(job.target),
                                                         inductor_configs=dict(INDUCTOR_CONFIGS))
        except Exception as exc:
            raise ExportError(f"AOTInductor export of {job.spec.name} failed: {one_line(exc, 300)}; make the model "
                              "exportable with torch.export (no data-dependent control flow) or drop the pt2 "
                              "variants") from exc
        quantization = None
        if job.spec.precision == "int8":
            quantization = {"mode": "dynamic", "library": "torchao", "weights": "int8 per channel",
                            "activations": f"int8 per token (row), {job.bundle.hints.int8_activations}"}
        return EmitResult({
            "exporter": "torch.export",
            "compiler": compiler_version(compiler),
            "torch": torch.__version__,
            "inductor_configs": dict(INDUCTOR_CONFIGS),
            "dynamic_dims": sorted({d for s in job.bundle.signature.inputs for d in s.shape if isinstance(d, str)}),
            "export_seconds": round(exported_s, 2),
            "compile_seconds": round(time.perf_counter() - started - exported_s, 2),
        }, quantization)


EMITTER = Pt2Emitter()
