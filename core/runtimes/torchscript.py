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
        import torch

        tensors = [torch.from_numpy(a) for a in cast_inputs(self.signature, inputs)]
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.module(*tensors)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.float().numpy() if o.is_floating_point() else o.numpy()
                for name, o in zip(self.signature.output_names, outputs)}


SPEC = RuntimeSpec(name="torchscript", suffix=".pt", requires="torch", v2_platform="pytorch_torchscript",
                   open=TorchRuntime.from_torchscript)
