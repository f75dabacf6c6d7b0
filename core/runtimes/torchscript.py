"""TorchScript archives (`.pt`), and eager torch modules through the same adapter (the benchmark's baseline)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kiln.core.errors import ManifestError, one_line
from kiln.core.runtime import Arrays, RuntimeOptions, RuntimeSpec, cast_inputs
from kiln.core.signature import Signature


class TorchRuntime:
    """A TorchScript archive or an eager module: both take tensors in signature order."""

    def __init__(self, module: Any, signature: Signature, variant: str, options: RuntimeOptions | None = None) -> None:
        import torch

        self.threads = (options or RuntimeOptions()).resolved_threads
        torch.set_num_threads(self.threads)
        self.module = module
        self.signature = signature
        self.variant = variant

    @classmethod
    def from_torchscript(cls, path: Path, signature: Signature, variant: str, options: RuntimeOptions) -> "TorchRuntime":
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated in this torch, and still works
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ManifestError(f"TorchScript cannot load {path.name} ({one_line(exc, 200)}); re-export the folder") from exc
        module.eval()
        return cls(module, signature, variant, options)

    def run(self, inputs: Arrays) -> Arrays:
        return run_module(self.module, self.signature, inputs)

    def close(self) -> None:
        """The module's weights (and a package's compiled library) go with the last reference to them."""
        self.module = None


def run_module(module: Any, signature: Signature, inputs: Arrays) -> Arrays:
    """Call a torch module (TorchScript, eager, or an AOTInductor package's runner) on numpy inputs in signature
    order; outputs come back as numpy, floating ones as fp32 (a bf16 variant answers like the fp32 one)."""
    import torch

    tensors = [torch.from_numpy(a) for a in cast_inputs(signature, inputs)]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings, at every call
        out = module(*tensors)
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.float().numpy() if o.is_floating_point() else o.numpy()
            for name, o in zip(signature.output_names, outputs)}


SPEC = RuntimeSpec(name="torchscript", suffix=".pt", requires="torch", v2_platform="pytorch_torchscript",
                   open=TorchRuntime.from_torchscript)
