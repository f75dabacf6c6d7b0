"""TorchScript artifacts: trace (script as fallback), freeze, save; BF16 as a cast-wrapped copy.

BF16 keeps the model's signature: inputs are cast to bfloat16 inside the module and outputs back
to float32, so a client and the server never see the difference, only the speed (AMX on this CPU).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from kiln.core.errors import ExportError, one_line
from kiln.export.emitter import EmitJob, EmitResult


def bf16_copy(module):
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


def emit_torchscript(module, example_inputs: tuple, path: Path, precision: str = "fp32") -> dict:
    """Write `path`; returns how it was made (trace or script, frozen)."""
    import torch

    if precision == "bf16":
        module = bf16_copy(module)
    elif precision != "fp32":
        raise ValueError(f"TorchScript artifacts are fp32 or bf16, not {precision}")
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
        try:
            info = emit_torchscript(job.module, job.example_inputs(), job.target, job.spec.precision)
        except Exception as exc:
            raise ExportError(f"TorchScript export of {job.spec.name} failed: {one_line(exc, 300)}; "
                              "make the model traceable or drop TorchScript variants") from exc
        return EmitResult(info)


EMITTER = TorchScriptEmitter()
