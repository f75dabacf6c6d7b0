"""Inference workers that start and stop while the server runs: the seam model load/unload (issue #21) builds on.

Decision: a model loaded into a running server gets its workers through kiln's own channel and gateway
(serve.channel), not through LitServe's launch; LitServe stays the server (the HTTP process, uvicorn, the
workers of the models given at start and their restarts). Why:
- LitServer fixes its APIs, their request queues and worker counts at construction, and launches every worker
  in `run` (`launch_inference_workers`); its restart monitor watches that fixed list. Adding an API to a running
  LitServer would mean writing into its private state (litapi_connector, request queues, transport), which
  serve.litserve_private exists to keep small.
- kiln's request path never used LitServe's queues: a worker is any process that connects to a model's channel
  socket and says Hello (serve.channel.WorkerGateway); LitServe's request queue carries only the stop signal.
  So a worker kiln starts itself is served by the same gateway, batching loop (serve.batching) and LitAPI
  (serve.api.KilnAPI) as one LitServe started: nothing on the request path differs.
- A model's endpoint, gateway and metric labels are plain objects in the HTTP process (serve.inference's
  endpoints dict, serve.metrics), so registering one more at run time needs no LitServe hook either.

`start_workers` and `ModelWorkers.retire` are the worker half of that seam; serve.control is the HTTP half (a
WorkerGateway on a new socket, the Endpoint registered once the workers are ready, drained and stopped before
`retire`), and it restarts a kiln-started worker that dies (`restart_dead`: LitServe's monitor does not watch these)
and gives the large-body helper (serve.offload) the new set of models.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field

from kiln.serve.litserve_private import SENTINEL_VALUE


def _worker_main(api, worker_id: str, stop) -> None:
    """A kiln-started worker's life, as LitServe's inference worker runs one: setup, then the loop until stopped."""
    os.environ["LITSERVE_WORKER_ID"] = worker_id  # the name the worker's Hello gives the gateway
    api.setup("cpu")
    try:
        api.loop(api, "cpu", worker_id, stop, None, None, None)
    finally:
        api.runner.close()  # the runtime lets go of the model (core.runtime.Runtime.close)


@dataclass
class ModelWorkers:
    """The worker processes start_workers started for one model, and the queues that stop them."""

    name: str
    processes: list = field(default_factory=list)
    stops: list = field(default_factory=list)

    def alive(self) -> int:
        return sum(process.is_alive() for process in self.processes)

    def restart_dead(self, api) -> int:
        """Starts again each worker that died (LitServe's monitor watches only the workers LitServe started); how
        many. The restarted worker connects to the same gateway under the same name."""
        restarted = 0
        context = multiprocessing.get_context("spawn")
        for index, process in enumerate(self.processes):
            if process.is_alive() or process.exitcode is None:
                continue
            stop = context.Queue()
            self.stops[index].close()
            self.processes[index] = _spawn(context, api, f"{self.name}-{index}", stop)
            self.stops[index] = stop
            restarted += 1
        return restarted

    def retire(self, timeout_s: float = 10.0) -> None:
        """Stops every worker and waits for it: each is told to stop through its stop queue (LitServe's stop
        signal, read while the worker is idle) and ends its loop once its current batch is answered; one still
        running after `timeout_s` is killed. Stop the model's gateway first (after its last request is answered),
        so no new request reaches a worker that is going."""
        for stop in self.stops:
            stop.put(SENTINEL_VALUE)
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        for stop in self.stops:
            stop.close()


def start_workers(api, count: int, name: str = "model") -> ModelWorkers:
    """Starts `count` worker processes for one model while the server runs, each running `api` (a serve.api.KilnAPI
    whose loop, a serve.batching.AdaptiveBatchedLoop, names the model's channel socket) as a LitServe worker would.

    Returns at once: each worker loads the model in its own process and connects to the model's gateway when
    ready (the gateway's `ready()` says when all have). The gateway on that socket must be started by the caller
    (the HTTP process); a worker started before it waits for it."""
    context = multiprocessing.get_context("spawn")  # no fork of the HTTP process's event loop or sockets
    workers = ModelWorkers(name)
    for index in range(count):
        stop = context.Queue()
        workers.processes.append(_spawn(context, api, f"{name}-{index}", stop))
        workers.stops.append(stop)
    return workers


def _spawn(context, api, worker_id: str, stop):
    process = context.Process(target=_worker_main, args=(api, worker_id, stop), daemon=True,
                              name=f"kiln-{worker_id}-worker")
    process.start()
    return process
