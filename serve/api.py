"""The LitAPI that runs inside LitServe's inference worker: batches validated requests through a Runtime.

Requests arrive here already validated (serve.protocol, in the HTTP process), as named arrays or
texts. The worker's loop (serve.batching.AdaptiveBatchedLoop) calls two hooks per batch: `batch`
concatenates the requests (tokenizing texts together) and `predict` runs the runtime once per batch
and splits the result back per request, one serve.channel.Result each. If a whole batch fails, each
request is retried alone, so one request that breaks the runtime fails only itself. LitServe's
other per-request hooks (decode_request, unbatch, encode_response) would be identities here; the
loop does not call them, so they are not defined.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from itertools import accumulate

import litserve as ls
import numpy as np

from kiln.core.memory import MemoryKeeper
from kiln.core.preprocessing import text_preprocessor
from kiln.serve.batching import BatchCostModel, stop_after_drain
from kiln.serve.channel import Result


@dataclass
class WorkItem:
    arrays: dict | None
    texts: list | None
    count: int
    enqueued: float  # time.time() when the HTTP process queued it


@dataclass
class Batch:
    items: list
    inputs: dict
    counts: list
    started: float


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
        from kiln.core.manifest import read_manifest
        from kiln.core.runtime import RuntimeOptions, load

        # Each runtime sets its own threads (torch's for TorchScript and AOTInductor, ONNX Runtime's own pool);
        # torch is not imported for an ONNX variant at all, which keeps it out of the worker's memory.
        self.batches_run = 0
        manifest = read_manifest(self.artifact_dir)
        self.signature = manifest.signature
        self.runtime = load(self.artifact_dir, self.variant, RuntimeOptions(self.threads))
        self.preprocess = text_preprocessor(manifest)
        # Warm-up: the first run allocates and picks kernels; pay that before reporting ready.
        self.predict(self.batch([self._example(1)]))
        self.cost_model.reset()  # costs come from real batches only
        self.memory = MemoryKeeper()
        self.memory.start()  # the baseline a burst's memory returns to (core.memory)
        signal.signal(signal.SIGTERM, stop_after_drain)

    def _example(self, count: int) -> WorkItem:
        if self.preprocess is not None:
            return WorkItem(None, ["warm-up"] * count, count, time.time())
        arrays = {}
        for spec in self.signature.inputs:
            shape = [count if i == 0 else (1 if isinstance(d, str) else d) for i, d in enumerate(spec.shape)]
            arrays[spec.name] = np.zeros(shape, dtype=np.int64 if spec.dtype.startswith("int") else np.float32)
        return WorkItem(arrays, None, count, time.time())

    def batch(self, items: list[WorkItem]) -> Batch:
        started = time.time()
        if self.preprocess is not None:
            inputs = self.preprocess([t for item in items for t in item.texts])
        else:
            inputs = {name: np.concatenate([item.arrays[name] for item in items])
                      for name in self.signature.input_names}
        return Batch(items, inputs, [item.count for item in items], started)

    def after_batch(self) -> None:
        """Called by the batching loop once a batch's answers are sent: memory a large batch took goes back."""
        self.memory.after_batch(self.runtime)

    def predict(self, batch: Batch) -> list[Result]:
        t0 = time.time()
        items = sum(batch.counts)
        outcomes: list[tuple[dict | None, str | None]]  # per request: its outputs, or why the runtime failed on it
        try:
            outcomes = [(outputs, None) for outputs in _split(self.runtime.run(batch.inputs), batch.counts)]
            self.cost_model.learn(items, time.time() - t0)
        except Exception:
            outcomes = []
            for item in batch.items:
                try:
                    single = self.batch([item])
                    outcomes.append((_split(self.runtime.run(single.inputs), single.counts)[0], None))
                except Exception as exc:
                    outcomes.append((None, f"the runtime failed on this request: {type(exc).__name__}"))
        infer_s = time.time() - t0
        self.batches_run += 1
        batch_id = f"{os.getpid()}-{self.batches_run}"
        tokens = _tokens_per_request(batch.inputs, batch.counts)
        return [Result(outputs, max(0.0, batch.started - item.enqueued), infer_s, len(batch.items),
                       items, batch_id, error, tokens[i] if tokens else None)
                for i, (item, (outputs, error)) in enumerate(zip(batch.items, outcomes))]


def _split(outputs: dict, counts: list[int]) -> list[dict]:
    """Each request's rows of the batch's outputs. A batch of one request (every batch at low load) is its outputs
    as they are: on a cache the model has just evicted, each numpy call made here costs tens of microseconds."""
    if len(counts) == 1:
        return [outputs]
    bounds = list(accumulate(counts, initial=0))  # Python ints: np.cumsum of a short list costs more than the slicing
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in outputs.items()} for i in range(len(counts))]


def _tokens_per_request(inputs: dict, counts: list[int]) -> list[int] | None:
    """Real (unpadded) tokens per request, from the attention mask, for text models."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    if len(counts) == 1:
        return [int(np.count_nonzero(mask))]
    per_item = np.count_nonzero(mask, axis=1).tolist()
    bounds = list(accumulate(counts, initial=0))
    return [sum(per_item[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]
