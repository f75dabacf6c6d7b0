"""The in-process ceiling: how fast the served variant runs with no server in front of it.

It is measured in the shape the server runs: `workers` processes, each with the runtime on
`threads` threads, each running batches of the size the server formed, all at once. The processes
load the runtime once and are then told what to measure, so `kiln loadtest` can measure the ceiling
right after each round of load: on a noisy machine (2 shared vCPUs here, 10-30% drift over
minutes) only figures taken side by side make a fair ratio.
"""

from __future__ import annotations

import time

import numpy as np

from kiln.core.preprocessing import TextPreprocessor, text_preprocessor


def _prepare(preprocess: TextPreprocessor | None, items: list, batch_size: int):
    """The batch as the server's worker builds it: texts tokenized per batch with the same preprocessor
    (kiln.core.preprocessing), arrays stacked. Returns a function that gives the runtime's inputs, so text
    runs pay for tokenizing as the server does."""
    batch = [items[i % len(items)] for i in range(batch_size)]
    if isinstance(batch[0], str):
        assert preprocess is not None
        return lambda: preprocess(batch)
    stacked = {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}
    return lambda: stacked


def measure(runtime, preprocess: TextPreprocessor | None, items: list, batch_size: int, seconds: float, start_at: float | None = None) -> dict:
    prepare = _prepare(preprocess, items, batch_size)
    for _ in range(3):
        runtime.run(prepare())
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        runtime.run(prepare())
        times.append(time.perf_counter() - t0)
    p50 = float(np.median(times))
    return {"batch_size": batch_size, "p50_ms": p50 * 1000, "items_per_s": batch_size / p50}


def _child(connection, artifact_dir: str, variant: str | None, threads: int | None, items: list) -> None:
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import RuntimeOptions, load

    runtime = load(artifact_dir, variant, RuntimeOptions(threads))
    preprocess = text_preprocessor(read_manifest(artifact_dir))
    connection.send("ready")
    while True:
        request = connection.recv()
        if request is None:
            return
        connection.send(measure(runtime, preprocess, items, *request))


class Ceiling:
    """`workers` processes holding the runtime; `measure(batch_size)` runs them together and sums throughput."""

    def __init__(self, artifact_dir: str, variant: str | None, threads: int | None, workers: int, items: list) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of the client's event loop or open sockets
        self.connections = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_child, args=(child, artifact_dir, variant, threads, items), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)
        for connection in self.connections:
            connection.recv()

    def measure(self, batch_size: int, seconds: float = 1.5) -> dict:
        start_at = time.time() + 0.5  # every process has warmed this batch size by then
        for connection in self.connections:
            connection.send((batch_size, seconds, start_at))
        results = [connection.recv() for connection in self.connections]
        return {"batch_size": batch_size, "workers": len(results),
                "p50_ms": float(np.median([r["p50_ms"] for r in results])),
                "items_per_s": sum(r["items_per_s"] for r in results)}

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> "Ceiling":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
