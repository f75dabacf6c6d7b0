"""The LitAPI that runs inside LitServe's inference worker: batches validated requests through a ModelRunner.

Requests arrive here already validated (serve.protocol, in the HTTP process), as named arrays or
texts. The model itself (open the variant once, tokenize, run a batch, split it, retry each request alone
when the batch fails) is core.runner.ModelRunner, shared with the ceiling and any other host; this class is
what LitServe's worker adds around it: the cost model the batching loop reads, the answers it sends
(serve.channel.Result), memory given back after large batches, and the SIGTERM handler. The worker's loop
(serve.batching.AdaptiveBatchedLoop) calls two hooks per batch: `batch` and `predict`. LitServe's
other per-request hooks (decode_request, unbatch, encode_response) would be identities here; the
loop does not call them, so they are not defined.
"""

from __future__ import annotations

import os
import signal
import time

import litserve as ls

from kiln.core.memory import MemoryKeeper
from kiln.core.runner import Batch, ModelRunner, WorkItem
from kiln.serve.batching import BatchCostModel, stop_after_drain
from kiln.serve.channel import Result, batch_results


class KilnAPI(ls.LitAPI):
    def __init__(self, artifact_dir: str, variant: str | None, threads: int | None,
                 max_batch_size: int, loop, api_path: str = "/_kiln/worker") -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=0.0, loop=loop, api_path=api_path)
        self.artifact_dir = artifact_dir
        self.variant = variant
        self.threads = threads
        # Seconds per item by batch size, learnt from the batches this worker runs; the batching loop
        # (serve.batching.AdaptiveBatchedLoop) reads it to decide whether a backlog batch waits for more.
        self.cost_model = BatchCostModel()

    def setup(self, device) -> None:
        if os.path.exists(self.loop.channel_path + ".retired"):  # serve.control.retired_marker
            # A worker of a version serve.control retired, restarted by LitServe's monitor: it idles without
            # loading the model until the server stops (SIGTERM's default action ends it).
            while True:
                time.sleep(3600)
        self.batches_run = 0
        self.runner = ModelRunner(self.artifact_dir, self.variant, self.threads)
        self.runtime = self.runner.runtime
        # Warm-up: the first run allocates and picks kernels; pay that before reporting ready.
        self.predict(self.batch([self.runner.example(1)]))
        self.cost_model.reset()  # costs come from real batches only
        self.memory = MemoryKeeper()
        self.memory.start()  # the baseline a burst's memory returns to (core.memory)
        signal.signal(signal.SIGTERM, stop_after_drain)

    def measure(self, items: list[WorkItem]) -> None:
        """Called by the batching loop on requests as it takes them off the channel: their token counts and
        lengths, for a length-aware cut (serve.admission.TokenBudgetAdmission)."""
        self.runner.measure(items)

    def batch(self, items: list[WorkItem]) -> Batch:
        return self.runner.prepare(items)

    def after_batch(self) -> None:
        """Called by the batching loop once a batch's answers are sent: memory a large batch took goes back."""
        self.memory.after_batch(self.runtime)

    def predict(self, batch: Batch) -> list[Result]:
        run_started = time.time()
        ran = self.runner.run(batch)
        items = sum(batch.counts)
        if ran.whole_s is not None:
            self.cost_model.learn(items, ran.whole_s, ran.padded_tokens)
        self.batches_run += 1
        return batch_results(batch, ran, f"{os.getpid()}-{self.batches_run}", run_started)
