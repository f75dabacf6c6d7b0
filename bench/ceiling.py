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

from kiln.core.runner import ModelRunner, WorkItem


def _prepare(runner: ModelRunner, items: list, batch_size: int):
    """The batch as the server's worker builds it (core.runner.ModelRunner.prepare_inputs, the same code): texts
    tokenized per batch, arrays stacked. Returns a function that gives the runtime's inputs, so text runs pay for
    tokenizing as the server does."""
    batch = [items[i % len(items)] for i in range(batch_size)]
    if isinstance(batch[0], str):
        work = [WorkItem(None, [text], 1, 0.0) for text in batch]
        return lambda: runner.prepare_inputs(work)
    stacked = runner.prepare_inputs([WorkItem(b, None, len(next(iter(b.values()))), 0.0) for b in batch])
    return lambda: stacked


def measure(runner: ModelRunner, items: list, batch_size: int, seconds: float, start_at: float | None = None) -> dict:
    runtime = runner.runtime
    prepare = _prepare(runner, items, batch_size)
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
    runner = ModelRunner(artifact_dir, variant, threads)  # the manifest read once, as in the server's worker
    connection.send("ready")
    while True:
        request = connection.recv()
        if request is None:
            runner.close()
            return
        connection.send(measure(runner, items, *request))


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
