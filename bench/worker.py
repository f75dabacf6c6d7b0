"""The measuring half of `kiln bench`: one long-lived process per variant (or the eager baseline).

Why a process each: peak resident memory (ru_maxrss) is only the variant's own if nothing else was
ever loaded in the process, and torch/ONNX Runtime thread pools, allocator caches and JIT state left
by one runtime would otherwise bias the next. The processes stay alive across rounds, and the parent
(kiln.bench.driver) asks them for one cell at a time, in turn, so they never compete for the cores and
drift on the machine reaches every variant alike.

Protocol: `python -m kiln.bench.worker CONFIG.json`. The config names the folder, the variant, the
thread count, the batch sizes and the .npz of inputs (shared by all variants, so every runtime sees
identical arrays; the eager worker, started first, writes it). The worker answers on stdout, one JSON
line each: `{"ready": {...}}` once loaded, then one `{"cell": {...}}` per `{"measure": BATCH, ...}`
line read on stdin, until `{"exit": true}`. A KilnError is answered as `{"error": ...}` and ends it;
stderr is the parent's log.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from kiln.bench.stats import settled, summarize_calls
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


def load_runtime(config: dict) -> tuple[object, dict]:
    """The runtime to measure; the eager worker also writes the shared inputs and counts the FLOPs."""
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import RuntimeOptions, load
    from kiln.core.runtimes.torchscript import TorchRuntime

    folder = Path(config["folder"])
    threads = int(config["threads"])
    if config["variant"] != EAGER:
        return load(folder, config["variant"], RuntimeOptions(threads)), {}

    import torch

    torch.set_num_threads(threads)
    from kiln.models.registry import from_source

    manifest = read_manifest(folder)
    bundle = from_source(manifest.source)
    if bundle.signature.input_names != manifest.signature.input_names:
        raise UsageError(f"the model source {manifest.source} now builds a model with inputs "
                         f"{bundle.signature.input_names}, but the folder was exported with "
                         f"{manifest.signature.input_names}; re-export the folder with this kiln")
    bundle.module.eval()
    inputs = make_inputs(bundle, manifest.signature, config["batch_sizes"], config.get("seq_len"))
    flat = {_input_key(b, n): a for b, arrays in inputs.items() for n, a in arrays.items()}
    np.savez(config["inputs"], **flat)
    from kiln.export.flops import count_flops

    flops = {b: count_flops(bundle.module, arrays, manifest.signature.input_names) for b, arrays in inputs.items()}
    runtime = TorchRuntime(bundle.module, manifest.signature, EAGER, RuntimeOptions(threads))
    return runtime, {"module_bytes": _module_bytes(bundle.module),
                     "flops_per_item": {str(b): f for b, f in flops.items()}}


def read_inputs(path: str, batch_size: int, names: list[str]) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {n: data[_input_key(batch_size, n)] for n in names}


def warm_up(runtime, inputs: dict[str, np.ndarray], min_calls: int, max_seconds: float) -> int:
    """Untimed calls until the latency settles (caches, allocators and lazily built kernels stop changing it),
    at least `min_calls`, and no longer than `max_seconds` after the first two (a slow runtime at a large batch
    must not warm up for minutes)."""
    latencies: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter_ns()
        runtime.run(inputs)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        if len(latencies) >= max(min_calls, 2) and (settled(latencies)
                                                     or time.perf_counter() - started >= max_seconds):
            return len(latencies)


def time_calls(runtime, inputs: dict[str, np.ndarray], min_iters: int, max_iters: int,
               max_seconds: float) -> list[float]:
    """Per-call latencies in ms until max_seconds (but at least min_iters) or max_iters: every call timed on its own,
    so the percentiles are of calls, not of averages."""
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < max_iters:
        t0 = time.perf_counter_ns()
        runtime.run(inputs)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        if len(latencies) >= min_iters and time.perf_counter() - started >= max_seconds:
            break
    return latencies


def at_length(inputs: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A text batch with every row `length` tokens long, from the bench's own (real) rows: their tokens repeated
    or cut to that length, attention over all of them. The values are real token ids; what is measured is the
    cost of the shape, which is all a sequence length changes."""
    out = {}
    for name, array in inputs.items():
        if array.ndim < 2:
            out[name] = array
            continue
        if name == "attention_mask":
            out[name] = np.ones((array.shape[0], length), dtype=array.dtype)
        elif name == "token_type_ids":
            out[name] = np.zeros((array.shape[0], length), dtype=array.dtype)
        else:
            reps = -(-length // array.shape[1])
            out[name] = np.ascontiguousarray(np.tile(array, (1, reps))[:, :length])
    return out


def serve_requests(config: dict, runtime, emit, commands) -> None:
    """Answer `measure` commands until `exit`: warm-up the first time a batch size is seen, then time the calls."""
    names = list(runtime.signature.input_names)
    inputs: dict = {b: read_inputs(config["inputs"], b, names) for b in config["batch_sizes"]}
    warmed: set[tuple] = set()
    for line in commands:
        command = json.loads(line)
        if command.get("exit"):
            return
        batch = int(command["measure"])
        seconds = float(command["seconds"])
        length = command.get("seq_len")
        key = (batch, length)
        if length and key not in inputs:
            inputs[key] = at_length(inputs[batch], int(length))
        arrays = inputs[key if length else batch]
        warmups = warm_up(runtime, arrays, int(config["warmup"]) if key not in warmed else 2, seconds)
        warmed.add(key)
        latencies = time_calls(runtime, arrays, int(config["min_iters"]), int(config["max_iters"]), seconds)
        emit({"cell": {"batch_size": batch, **({"seq_len": length} if length else {}), **summarize_calls(latencies, batch), "warmup_calls": warmups,
                       "peak_rss_mb": _peak_rss_mb()}})


def pin_cores(threads: int) -> list[int] | None:
    """Pin this process to the first `threads` usable cores: no migration of its threads mid-measurement."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cores = pin_cores(int(config["threads"]))
        started = time.perf_counter()
        runtime, info = load_runtime(config)
        emit({"ready": {"load_seconds": round(time.perf_counter() - started, 3), "cores": cores, **info}})
        serve_requests(config, runtime, emit, sys.stdin)
    except KilnError as exc:
        emit({"error": format_error(exc), "error_type": type(exc).__name__, "message": one_line(exc),
              "exit_code": exc.exit_code})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
