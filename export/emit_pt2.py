"""`.pt2` artifacts: torch.export, then AOTInductor compiles the graph ahead of time into a package of C++ kernels.

The batch dimension (and a text model's sequence dimension) is exported dynamic, from a batch of 2: a batch of 1
would specialize the dimension. Weights are frozen into the compiled graph (inductor's `freezing`), which lets it
fold constants and pick kernels for them. BF16 and INT8 (torchao) are precision workflows applied to the eager
module first (kiln.export.precision, shared with the TorchScript emitter): BF16 casts inputs in and outputs back
to float32, so the signature does not change. The package records nothing about how it was
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
from kiln.export import precision
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
        config = precision.workflow(job.spec, job.bundle.hints)  # Bf16Weights, TorchaoInt8, or None
        if config is not None:
            module = precision.apply(config, module)
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
        record = getattr(config, "record", None)  # a quantization workflow says how it quantized
        quantization = record() if record else None
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
