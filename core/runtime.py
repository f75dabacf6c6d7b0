"""One interface over every way kiln runs a model, `Runtime.run(inputs) -> outputs`, and the registry of runtimes.

The benchmark, the server, the loadtest ceiling and the export's own verification all open artifacts here, so
what is verified and measured is what is served. Each runtime is one module in `kiln.core.runtimes` that
declares a `SPEC` (`RuntimeSpec`: its name, the artifact suffix, the module it needs, its V2 platform name and
how to open an artifact); the registry finds them, so a new runtime is that one module. `RuntimeOptions` carries
the thread count and the device, which each runtime owns: torch and ONNX Runtime in one process fight over the
cores otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kiln.core.errors import ExportError, RuntimeUnavailable
from kiln.core.machine import default_threads
from kiln.core.signature import Signature, check_arrays

if TYPE_CHECKING:
    from kiln.core.manifest import Manifest, VariantEntry

Arrays = dict[str, np.ndarray]


class Runtime(Protocol):
    variant: str
    signature: Signature
    threads: int

    def run(self, inputs: Arrays) -> Arrays: ...

    def close(self) -> None:
        """Let go of what the runtime holds (its session, its module) so that a model retired from a running
        server gives its memory back; `run` may not be called after. Closing twice is harmless."""
        ...


class CheckedRuntime:
    """A runtime whose `run` checks its inputs against the signature first (core.signature.check_arrays): what
    `kiln.load` returns, so a caller's float64 array or wrong rank is an InvalidInput naming the input, its dtype
    and shape, as the server's 4xx would be, not a silent cast or the runtime's own error. Bench, the server
    and the export's verification use the bare runtime: their inputs are already checked or built to fit."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.variant = runtime.variant
        self.signature = runtime.signature
        self.threads = runtime.threads

    def run(self, inputs: Arrays) -> Arrays:
        check_arrays(self.signature, inputs)
        return self.runtime.run(inputs)

    def close(self) -> None:
        self.runtime.close()

    def __getattr__(self, name: str) -> Any:  # the runtime's own extras (its session, its module)
        return getattr(self.runtime, name)

    def __repr__(self) -> str:
        return f"CheckedRuntime({self.runtime!r})"


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: intra-op threads (None: the cores this process may use) and the device."""

    threads: int | None = None
    device: str = "cpu"

    @property
    def resolved_threads(self) -> int:
        return self.threads or default_threads()


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything kiln needs to know about a runtime, in one entry."""

    name: str  # as recorded in the manifest's variant entries
    suffix: str  # the artifact file's suffix, e.g. ".onnx"
    requires: str  # the Python module it imports, checked before any measuring or serving starts
    v2_platform: str  # the `platform` the V2 model metadata reports
    open: Callable[[Path, Signature, str, RuntimeOptions], Runtime]
    devices: tuple[str, ...] = ("cpu",)
    # Whether this machine can run the artifact a manifest entry describes (e.g. the torch that compiled it);
    # raises RuntimeUnavailable with what to do. None: any installed runtime can.
    check: Callable[[VariantEntry], None] | None = None

    @property
    def installed(self) -> bool:
        return module_installed(self.requires)

    @property
    def needs_torch(self) -> bool:
        """Whether it loads through torch, which the serve-only install (`pip install kiln`) lacks."""
        return self.requires == "torch"


def module_installed(name: str) -> bool:
    """Whether `import name` would find a module, without importing it (a broken parent package counts as no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_REGISTRY: dict[str, RuntimeSpec] | None = None


def registry() -> dict[str, RuntimeSpec]:
    """Every runtime module's SPEC, found once; the modules import their heavy libraries only when opening."""
    global _REGISTRY
    if _REGISTRY is None:
        from kiln.core import runtimes

        found: dict[str, RuntimeSpec] = {}
        for info in sorted(pkgutil.iter_modules(runtimes.__path__), key=lambda i: i.name):
            spec = getattr(importlib.import_module(f"{runtimes.__name__}.{info.name}"), "SPEC", None)
            if isinstance(spec, RuntimeSpec):
                found[spec.name] = spec
        _REGISTRY = found
    return _REGISTRY


def runtime_spec(name: str, variant: str = "") -> RuntimeSpec:
    spec = registry().get(name)
    if spec is None:
        what = f"variant {variant!r} needs" if variant else "the manifest names"
        raise RuntimeUnavailable(f"{what} runtime {name!r}, which this kiln does not know "
                                 f"(it knows {', '.join(registry())}); upgrade kiln, re-export the folder, or leave "
                                 "the variant out (kiln bench --variants, kiln serve --variant)")
    return spec


def needs_torch(entry: VariantEntry) -> bool:
    """Whether a manifest's variant loads through torch: the one answer for the serve-only install's refusals and
    warnings (serve, deploy) and for whatever loads a variant. A runtime this kiln does not know is refused with
    RuntimeUnavailable, as `runtime_spec` refuses it."""
    return runtime_spec(entry.runtime, entry.name).needs_torch


def require_installed(name: str, variant: str) -> RuntimeSpec:
    """The runtime's spec, or RuntimeUnavailable naming the package to install."""
    spec = runtime_spec(name, variant)
    if not spec.installed:
        install = "'kiln[export]'" if spec.needs_torch else spec.requires
        raise RuntimeUnavailable(f"variant {variant!r} needs {spec.requires}, which is not installed; "
                                 f"pip install {install}, or leave the variant out (kiln bench --variants, "
                                 "kiln serve --variant)")
    return spec


def cast_inputs(signature: Signature, inputs: Arrays) -> list[np.ndarray]:
    """The inputs in signature order, contiguous and in the signature's dtype: what every runtime takes."""
    arrays = []
    for spec in signature.inputs:
        if spec.name not in inputs:
            raise KeyError(f"missing input {spec.name!r}")
        array = inputs[spec.name]
        dtype = spec.numpy_dtype
        arrays.append(np.ascontiguousarray(array, dtype=dtype) if dtype is not None else array)
    return arrays


def open_artifact(path: Path, runtime: str, signature: Signature, variant: str,
                  options: RuntimeOptions | None = None) -> Runtime:
    spec = require_installed(runtime, variant)
    return spec.open(Path(path), signature, variant, options or RuntimeOptions())


def load(folder: str | Path, variant: str | None = None, options: RuntimeOptions | None = None) -> Runtime:
    """Read the manifest, check the variant's hash, and return a ready runtime."""
    from kiln.core.manifest import read_manifest

    return open_variant(read_manifest(folder), variant, options)


def open_variant(manifest: Manifest, variant: str | None = None, options: RuntimeOptions | None = None) -> Runtime:
    """A ready runtime for a variant of a manifest already read (default: its default variant)."""
    entry = manifest.variant(variant)
    path = check_runnable(manifest, entry.name)
    return open_artifact(path, entry.runtime, manifest.signature, entry.name, options)


def check_runnable(manifest: Manifest, variant: str | None = None) -> Path:
    """Everything that can refuse a variant before loading it: its hash, its runtime being installed, and the
    runtime's own check of the entry (e.g. the torch that compiled it). Returns the artifact's path."""
    entry = manifest.variant(variant)
    path: Path = manifest.verify_file(entry.name)
    spec = require_installed(entry.runtime, entry.name)
    if spec.check is not None:
        spec.check(entry)
    return path


def run_batched(runtime: Runtime, inputs: Arrays, batch_size: int = 64) -> Arrays:
    """Run a whole dataset in batches and concatenate, for verification."""
    count = len(next(iter(inputs.values())))
    pieces: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, batch_size):
        out = runtime.run({k: v[start:start + batch_size] for k, v in inputs.items()})
        for key, value in out.items():
            pieces.setdefault(key, []).append(value)
    if not pieces:
        raise ExportError("no data to run; the evaluation set is empty")
    return {k: np.concatenate(v) for k, v in pieces.items()}
