"""One interface over every way kiln runs a model: `Runtime.run(inputs) -> outputs`.

The benchmark and the server share it, so what is measured is what is served. Each adapter owns
its thread settings: torch and ONNX Runtime in one process fight over the cores otherwise.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from kiln.models.errors import ExportError, ManifestError, RuntimeUnavailable
from kiln.models.signature import Signature

Arrays = dict[str, np.ndarray]
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class Runtime(Protocol):
    variant: str
    signature: Signature

    def run(self, inputs: Arrays) -> Arrays: ...


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cast_inputs(signature: Signature, inputs: Arrays) -> list[np.ndarray]:
    arrays = []
    for spec in signature.inputs:
        if spec.name not in inputs:
            raise KeyError(f"missing input {spec.name!r}")
        array = inputs[spec.name]
        dtype = NUMPY_DTYPES.get(spec.dtype)
        arrays.append(np.ascontiguousarray(array, dtype=dtype) if dtype is not None else array)
    return arrays


class OnnxRuntimeRuntime:
    def __init__(self, path: Path, signature: Signature, variant: str, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("variant needs onnxruntime, which is not installed; pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Intra-op threads spin between the parallel ops of a run (ORT's default) but stop when the run ends.
        # Measured here (MiniLM int8, 2 threads, batch 1): sleeping between ops made each op wait on a futex
        # wake-up, 5.7-6.5 ms against 3.8-4.4 ms spinning; spinning on after the run kept a core busy between
        # requests (1.57 cores used at a 3 ms request gap, against 1.12 with the stop), taken from the HTTP side.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ManifestError(
                f"ONNX Runtime cannot load {path.name} ({' '.join(str(exc).split())[:200]}); re-export the folder"
            ) from exc
        self.signature = signature
        self.variant = variant
        self.threads = options.intra_op_num_threads

    def run(self, inputs: Arrays) -> Arrays:
        feed = dict(zip(self.signature.input_names, _cast_inputs(self.signature, inputs)))
        outputs = self.session.run(self.signature.output_names, feed)
        return dict(zip(self.signature.output_names, outputs))


class TorchRuntime:
    """A TorchScript archive or an eager module: both take tensors in signature order."""

    def __init__(self, module, signature: Signature, variant: str, threads: int | None = None) -> None:
        import torch

        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        self.module = module
        self.signature = signature
        self.variant = variant

    @classmethod
    def from_torchscript(cls, path: Path, signature: Signature, variant: str, threads: int | None = None):
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated in this torch, and still works
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ManifestError(
                f"TorchScript cannot load {path.name} ({' '.join(str(exc).split())[:200]}); re-export the folder"
            ) from exc
        module.eval()
        return cls(module, signature, variant, threads)

    def run(self, inputs: Arrays) -> Arrays:
        import torch

        tensors = [torch.from_numpy(a) for a in _cast_inputs(self.signature, inputs)]
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.module(*tensors)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.float().numpy() if o.is_floating_point() else o.numpy()
                for name, o in zip(self.signature.output_names, outputs)}


def load(folder: str | Path, variant: str | None = None, threads: int | None = None) -> Runtime:
    """Read the manifest, check the variant's hash, and return a ready runtime."""
    from kiln.export.manifest import read_manifest

    manifest = read_manifest(folder)
    entry = manifest.variant(variant)
    path = manifest.verify_file(entry["name"])
    return open_artifact(path, entry["runtime"], manifest.signature, entry["name"], threads)


def open_artifact(path: Path, runtime: str, signature: Signature, variant: str, threads: int | None = None) -> Runtime:
    if runtime == "onnxruntime":
        return OnnxRuntimeRuntime(path, signature, variant, threads)
    if runtime == "torchscript":
        return TorchRuntime.from_torchscript(path, signature, variant, threads)
    raise RuntimeUnavailable(f"variant {variant!r} needs runtime {runtime!r}, which kiln does not know; upgrade kiln")


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
