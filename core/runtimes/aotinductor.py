"""AOTInductor packages (`.pt2`): a model exported with torch.export and compiled ahead of time to C++.

A package loads without the model's Python code, but AOTInductor promises no compatibility across torch
versions, so the manifest records the torch version it was compiled with and `check` refuses a package built by
another one with a clear RuntimeUnavailable instead of a crash inside the loader.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.core.errors import ManifestError, RuntimeUnavailable, one_line
from kiln.core.runtime import Arrays, RuntimeOptions, RuntimeSpec
from kiln.core.runtimes.torchscript import run_module
from kiln.core.signature import Signature

if TYPE_CHECKING:
    from kiln.core.manifest import VariantEntry


def installed_torch() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def check(entry: VariantEntry) -> None:
    """Refuse a package compiled by another torch: AOTInductor's C++ ABI is not stable across versions."""
    built = (entry.build or {}).get("torch")
    here = installed_torch()
    if built and here and built.split("+")[0] != here.split("+")[0]:
        raise RuntimeUnavailable(
            f"variant {entry.name!r} is an AOTInductor package compiled with torch {built}, and this machine has "
            f"torch {here}; AOTInductor packages load only under the torch that compiled them: install "
            f"torch=={built.split('+')[0]}, re-export the folder here, or serve another variant (--variant)")


class AOTInductorRuntime:
    def __init__(self, path: Path, signature: Signature, variant: str, options: RuntimeOptions) -> None:
        import torch

        self.threads = options.resolved_threads
        torch.set_num_threads(self.threads)  # the compiled kernels run on torch's OpenMP pool
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:
            raise ManifestError(f"AOTInductor cannot load {path.name} ({one_line(exc, 200)}); re-export the folder "
                                "with this torch") from exc
        self.signature = signature
        self.variant = variant

    def run(self, inputs: Arrays) -> Arrays:
        return run_module(self.module, self.signature, inputs)

    def close(self) -> None:
        """The module's weights (and a package's compiled library) go with the last reference to them."""
        self.module = None  # type: ignore[assignment]


SPEC = RuntimeSpec(name="aotinductor", suffix=".pt2", requires="torch", v2_platform="pytorch_aotinductor",
                   open=AOTInductorRuntime, check=check)
