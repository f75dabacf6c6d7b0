"""The measuring half of `kiln bench`: one fresh process per variant (or the eager baseline).

Why a process each: peak resident memory (ru_maxrss) is only the variant's own if nothing else was
ever loaded in the process, and torch/ONNX Runtime thread pools, allocator caches and JIT state left
by one runtime would otherwise bias the next. The parent (kiln.bench.driver) runs these one after
another, never side by side, so they do not compete for the cores either.

Protocol: `python -m kiln.bench.worker CONFIG.json`. The config names the folder, the
variant, the thread count, the batch sizes and the iteration bounds, the .npz of inputs (shared by
all variants, so every runtime sees identical arrays) and the result path. The eager worker runs
first and also writes that .npz. Progress goes to stdout as one JSON line per measured cell; the
result (or a KilnError as `ErrorName: message`) goes to the result file; stderr is the parent's log.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from kiln.core.errors import KilnError, UsageError, format_error, one_line
from kiln.core.manifest import EAGER


def _peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _input_key(batch_size: int, name: str) -> str:
    return f"b{batch_size}__{name}"


def make_inputs(bundle, signature, batch_sizes: list[int], seq_len: int | None) -> dict[int, dict[str, np.ndarray]]:
    """The example inputs for every batch size, from the model's own examples (real data)."""
    inputs: dict[int, dict[str, np.ndarray]] = {}
    for batch in batch_sizes:
        try:
            arrays = bundle.examples(batch, seq_len)
        except ValueError as exc:  # ragged rows: some example is longer than the padding length
            raise UsageError(
                f"cannot build batch {batch} at --seq-len {seq_len} ({one_line(exc, 120)}); "
                "choose a longer --seq-len (the model's max_length, e.g. 128)"
            ) from exc
        missing = [n for n in signature.input_names if n not in arrays]
        if missing:
            raise UsageError(f"the model's examples lack input(s) {', '.join(missing)}; re-export the folder")
        inputs[batch] = {n: np.ascontiguousarray(arrays[n]) for n in signature.input_names}
        if seq_len is not None:
            for name, array in inputs[batch].items():
                if array.ndim >= 2 and array.shape[1] != seq_len:
                    raise UsageError(
                        f"input {name!r} came out {array.shape[1]} long, not --seq-len {seq_len}; "
                        "choose a --seq-len at least as long as the model's examples"
                    )
    return inputs


def _module_bytes(module) -> int:
    """fp32 parameters and buffers of the eager module: its size in memory, for the size column."""
    tensors = list(module.state_dict().values())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def load_runtime(config: dict, emit) -> tuple[object, int | None]:
    """The runtime to measure; the eager worker also writes the shared inputs."""
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import RuntimeOptions, load
    from kiln.core.runtimes.torchscript import TorchRuntime

    folder = Path(config["folder"])
    threads = int(config["threads"])
    if config["variant"] != EAGER:
        runtime = load(folder, config["variant"], RuntimeOptions(threads))
        return runtime, None

    import torch

    torch.set_num_threads(threads)
    from kiln.models.registry import from_source

    manifest = read_manifest(folder)
    bundle = from_source(manifest.source)
    bundle.module.eval()
    inputs = make_inputs(bundle, manifest.signature, config["batch_sizes"], config.get("seq_len"))
    flat = {_input_key(b, n): a for b, arrays in inputs.items() for n, a in arrays.items()}
    np.savez(config["inputs"], **flat)
    runtime = TorchRuntime(bundle.module, manifest.signature, EAGER, RuntimeOptions(threads))
    return runtime, _module_bytes(bundle.module)


def read_inputs(path: str, batch_size: int, names: list[str]) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {n: data[_input_key(batch_size, n)] for n in names}


def measure_cell(runtime, inputs: dict[str, np.ndarray], warmup: int, min_iters: int, max_iters: int,
                 max_seconds: float) -> list[float]:
    """Per-call latencies in ms: warm-up first, then until max_seconds (but at least min_iters) or max_iters.

    Every call is timed on its own so that the percentiles are of calls, not of averages.
    """
    # Warm-up is bounded by max_seconds too (after two calls: TorchScript optimizes on its second run),
    # so that a slow runtime at a large batch does not spend minutes warming up.
    started = time.perf_counter()
    for done in range(warmup):
        runtime.run(inputs)
        if done + 1 >= 2 and time.perf_counter() - started >= max_seconds:
            break
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < max_iters:
        t0 = time.perf_counter_ns()
        runtime.run(inputs)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        if len(latencies) >= min_iters and time.perf_counter() - started >= max_seconds:
            break
    return latencies


def summarize(latencies: list[float], batch_size: int) -> dict:
    values = np.asarray(latencies, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        # Items over the time actually spent in calls: throughput of back-to-back batches.
        "items_per_s": float(batch_size * len(values) / (values.sum() / 1e3)),
        "iterations": len(values),
    }


def run(config: dict, emit) -> dict:
    threads = int(config["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    runtime, module_bytes = load_runtime(config, emit)
    load_s = time.perf_counter() - started
    names = list(runtime.signature.input_names)
    cells = []
    for batch in sorted(config["batch_sizes"]):
        inputs = read_inputs(config["inputs"], batch, names)
        latencies = measure_cell(runtime, inputs, int(config["warmup"]), int(config["min_iters"]),
                                 int(config["max_iters"]), float(config["max_seconds"]))
        # Peak after this cell: sizes go up, so this is the peak to serve batches up to this size.
        cell = {"batch_size": batch, **summarize(latencies, batch), "peak_rss_mb": _peak_rss_mb()}
        cells.append(cell)
        emit({"variant": config["variant"], **cell})
    return {"variant": config["variant"], "threads": threads, "load_seconds": round(load_s, 3),
            "module_bytes": module_bytes, "cells": cells}


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    result_path = Path(config["result"])

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    try:
        result = run(config, emit)
    except KilnError as exc:
        result_path.write_text(json.dumps({"error": format_error(exc), "error_type": type(exc).__name__,
                                           "message": one_line(exc), "exit_code": exc.exit_code}))
        return 1
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
