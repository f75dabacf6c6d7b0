"""TorchScript artifacts: trace (script as fallback), freeze, save; BF16 as a cast-wrapped copy.

BF16 keeps the model's signature: inputs are cast to bfloat16 inside the module and outputs back
to float32, so a client and the server never see the difference, only the speed (fast where the CPU has AMX or AVX-512 BF16, emulated and slow elsewhere).
The copy is made by the precision workflow's handler (kiln.export.precision), shared with the pt2 emitter.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from kiln.core.errors import ExportError, one_line
from kiln.export import precision
from kiln.export.emitter import EmitJob, EmitResult


def emit_torchscript(module, example_inputs: tuple, path: Path) -> dict:
    """Write `path` from `module` as given (its precision workflow already applied); returns how it was made
    (trace or script, frozen)."""
    import torch

    module = module.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in this torch; it still works
        try:
            scripted = torch.jit.trace(module, example_inputs, check_trace=False, strict=False)
            method = "trace"
        except Exception as trace_error:
            try:
                scripted = torch.jit.script(module)
                method = "script"
            except Exception as script_error:
                raise RuntimeError(
                    f"trace failed ({trace_error}) and script failed ({script_error})"
                ) from script_error
        scripted = torch.jit.freeze(scripted.eval())
        torch.jit.save(scripted, str(path))
    return {"method": method, "frozen": True}


class TorchScriptEmitter:
    def emit(self, job: EmitJob) -> EmitResult:
        config = precision.workflow(job.spec, job.bundle.hints)  # Bf16Weights, or None
        try:
            module = job.module if config is None else precision.apply(config, job.module)
            info = emit_torchscript(module, job.example_inputs(), job.target)
        except Exception as exc:
            raise ExportError(f"TorchScript export of {job.spec.name} failed: {one_line(exc, 300)}; "
                              "make the model traceable or drop TorchScript variants") from exc
        return EmitResult(info)


EMITTER = TorchScriptEmitter()
