"""ONNX Runtime on the CPU: `.onnx` artifacts, fp32 and INT8 (QDQ or dynamic)."""

from __future__ import annotations

from pathlib import Path

from kiln.core.errors import ManifestError, RuntimeUnavailable, one_line
from kiln.core.runtime import Arrays, RuntimeOptions, RuntimeSpec, cast_inputs
from kiln.core.signature import Signature


class OnnxRuntimeRuntime:
    def __init__(self, path: Path, signature: Signature, variant: str, options: RuntimeOptions) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("variant needs onnxruntime, which is not installed; pip install onnxruntime") from exc
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.resolved_threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Intra-op threads spin between the parallel ops of a run (ORT's default) but stop when the run ends.
        # Measured here (MiniLM int8, 2 threads, batch 1): sleeping between ops made each op wait on a futex
        # wake-up, 5.7-6.5 ms against 3.8-4.4 ms spinning; spinning on after the run kept a core busy between
        # requests (1.57 cores used at a 3 ms request gap, against 1.12 with the stop), taken from the HTTP side.
        session_options.add_session_config_entry("session.force_spinning_stop", "1")
        session_options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ManifestError(f"ONNX Runtime cannot load {path.name} ({one_line(exc, 200)}); re-export the folder") from exc
        self.signature = signature
        self.variant = variant
        self.threads = session_options.intra_op_num_threads
        # The arena keeps the high-water mark of every run; a run with this option frees its unused chunks at
        # the end. Not on every run (9% of MiniLM's throughput at concurrency 32): on release_memory.
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._one_row: dict | None = None

    def run(self, inputs: Arrays) -> Arrays:
        feed = dict(zip(self.signature.input_names, cast_inputs(self.signature, inputs)))
        outputs = self.session.run(self.signature.output_names, feed)
        if self._one_row is None:
            self._one_row = {name: array[:1].copy() for name, array in feed.items()}
        return dict(zip(self.signature.output_names, outputs))

    def close(self) -> None:
        """The session and its arena go with the last reference to them."""
        self.session = None
        self._one_row = None

    def release_memory(self) -> None:
        """The arena's unused chunks back to the system: a one-row run with arena shrinkage (core.memory)."""
        if self._one_row is not None:
            self.session.run(self.signature.output_names, self._one_row, self._shrink)


SPEC = RuntimeSpec(name="onnxruntime", suffix=".onnx", requires="onnxruntime", v2_platform="onnxruntime_onnx",
                   open=OnnxRuntimeRuntime)
