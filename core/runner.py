"""The plain model runner: one variant opened once, requests turned into a batch, the batch run, its outputs split.

It knows nothing of LitServe, sockets, signals or HTTP, so every host of a model uses the same one: the LitAPI
in LitServe's inference worker (serve.api.KilnAPI), a Ray Serve replica (a ModelRunner made in the replica's
`__init__`, then `runner.run(runner.prepare(items))` per batch) and the in-process ceiling (bench.ceiling, which
builds its batches with `prepare_inputs`). It lives in core because bench and serve both use it and neither
imports the other. What a host adds around it is its own: the worker's batching loop, cost model, SIGTERM
handler and answers stay in serve.

The manifest is read once: the runtime is opened from it (core.runtime.open_variant), and the text
preprocessor and signature come from the same read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np

# Texts tokenized in one call at most when measuring ahead: a window of 8 requests of 64 long texts tokenized in one
# call (512 Encodings, each with its overflowing tokens) left the worker's heap 20-30% above its size after bursts.
MEASURE_TEXTS = 64


@dataclass
class WorkItem:
    """One validated request as a model runs it: named arrays or texts, and how many items (rows) it holds."""

    arrays: dict | None
    texts: list | None
    count: int
    enqueued: float  # time.time() when the HTTP process queued it
    # Text models, set by ModelRunner.measure in the worker before the batch is cut (never sent over the channel):
    tokens: int | None = None  # real tokens, all its texts together
    length: int | None = None  # tokens of its longest text: what a batch holding it is padded to at least
    encoded: dict | None = None  # its texts tokenized: the signature's arrays, its rows padded to its own longest


@dataclass
class Batch:
    items: list
    inputs: dict
    counts: list
    started: float  # time.time() when the batch was cut


@dataclass
class BatchRun:
    """What running a batch gave: per request, its outputs or why the runtime failed on it alone."""

    outcomes: list[tuple[dict | None, str | None]]
    infer_s: float  # the whole run, retries included
    whole_s: float | None  # the batch as one run, when it succeeded so (a cost measure); None when it was retried
    tokens: list[int] | None  # text models: real tokens per request
    padded_tokens: int | None = None  # text models: the positions the batch computed (rows x its longest row)


class ModelRunner:
    """Opens a variant of an artifact folder and runs batches of WorkItems through it.

    `run` never raises for the runtime's sake: if the runtime fails on the whole batch, each request is run
    alone, so one request that breaks the runtime fails only itself (its Result carries the error)."""

    def __init__(self, artifact_dir: str, variant: str | None, threads: int | None) -> None:
        from kiln.core.manifest import read_manifest
        from kiln.core.preprocessing import text_preprocessor
        from kiln.core.runtime import RuntimeOptions, open_variant

        # Each runtime sets its own threads (torch's for TorchScript and AOTInductor, ONNX Runtime's own pool);
        # torch is not imported for an ONNX variant at all, which keeps it out of the worker's memory.
        manifest = read_manifest(artifact_dir)
        self.folder = artifact_dir
        self.threads = threads
        self.signature = manifest.signature
        self.runtime = open_variant(manifest, variant, RuntimeOptions(threads))
        self.variant = manifest.variant(variant)  # the entry opened (variant None: the manifest's default)
        self.preprocess = text_preprocessor(manifest)
        # Text models' per-token outputs (a token classifier's logits): the axis each has along the input sequence.
        self.sequence_axes = sequence_axes(self.signature) if self.preprocess is not None else {}

    def example(self, count: int) -> WorkItem:
        """A request of `count` items that fits the model's signature (warm-up; a probe)."""
        if self.preprocess is not None:
            return WorkItem(None, ["warm-up"] * count, count, time.time())
        arrays = {}
        for spec in self.signature.inputs:
            shape = [count if i == 0 else (1 if isinstance(d, str) else d) for i, d in enumerate(spec.shape)]
            arrays[spec.name] = np.zeros(shape, dtype=np.int64 if spec.dtype.startswith("int") else np.float32)
        return WorkItem(arrays, None, count, time.time())

    def prepare(self, items: list[WorkItem]) -> Batch:
        """The runtime's inputs for several requests: texts tokenized together, arrays concatenated."""
        started = time.time()
        return Batch(items, self.prepare_inputs(items), [item.count for item in items], started)

    def measure(self, items: list[WorkItem]) -> None:
        """Tokenizes the texts of `items` (all in one call: the tokenizer's per-call cost is paid once for what
        waits) and puts their token counts and longest lengths on them, so a batch can be cut by length; `prepare`
        then only pads. Tensor requests and items already measured are left as they are."""
        if self.preprocess is None:
            return
        todo = [item for item in items if item.encoded is None and item.texts]
        chunk: list[WorkItem] = []
        texts = 0
        for item in todo:
            if chunk and texts + len(item.texts or ()) > MEASURE_TEXTS:
                self._measure(chunk)
                chunk, texts = [], 0
            chunk.append(item)
            texts += len(item.texts or ())
        if chunk:
            self._measure(chunk)

    def _measure(self, todo: list[WorkItem]) -> None:
        assert self.preprocess is not None  # measure calls this for text models only
        arrays, lengths = self.preprocess.measure([t for item in todo for t in item.texts or ()])
        start = 0
        for item in todo:
            count = len(item.texts or ())
            own = lengths[start:start + count]
            item.tokens, item.length = sum(own), max(own)
            item.encoded = {name: array[start:start + count, :item.length] for name, array in arrays.items()}
            start += count

    def prepare_inputs(self, items: list[WorkItem]) -> dict:
        if self.preprocess is not None:
            blocks = [item.encoded for item in items if item.encoded is not None]
            if len(blocks) == len(items):  # every request measured ahead (serve.batching's length-aware cut)
                return self.preprocess.pad(blocks)
            return self.preprocess([t for item in items for t in item.texts or ()])
        return {name: np.concatenate([(item.arrays or {})[name] for item in items]) for name in self.signature.input_names}

    def run(self, batch: Batch) -> BatchRun:
        """Runs the batch; if the runtime fails on it, each request alone. Never raises for the runtime's sake."""
        t0 = time.time()
        whole_s = None
        outcomes: list[tuple[dict | None, str | None]]
        try:
            parts = split(self.runtime.run(batch.inputs), batch.counts)
            if self.sequence_axes and len(parts) > 1:
                parts = own_lengths(parts, batch.inputs.get("attention_mask"), batch.counts, self.sequence_axes)
            outcomes = [(outputs, None) for outputs in parts]
            whole_s = time.time() - t0
        except Exception:
            outcomes = []
            for item in batch.items:
                try:
                    single = self.prepare([item])
                    outcomes.append((split(self.runtime.run(single.inputs), single.counts)[0], None))
                except Exception as exc:
                    outcomes.append((None, f"the runtime failed on this request: {type(exc).__name__}"))
        mask = batch.inputs.get("attention_mask")
        return BatchRun(outcomes, time.time() - t0, whole_s, tokens_per_request(batch.inputs, batch.counts),
                        None if mask is None else int(mask.size))

    def close(self) -> None:
        """The runtime lets go of its model (core.runtime.Runtime.close): a retired model's memory goes back."""
        self.runtime.close()


def split(outputs: dict, counts: list[int]) -> list[dict]:
    """Each request's rows of the batch's outputs. A batch of one request (every batch at low load) is its outputs
    as they are: on a cache the model has just evicted, each numpy call made here costs tens of microseconds."""
    if len(counts) == 1:
        return [outputs]
    bounds = list(accumulate(counts, initial=0))  # Python ints: np.cumsum of a short list costs more than the slicing
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in outputs.items()} for i in range(len(counts))]


def sequence_axes(signature: Any) -> dict[str, int]:
    """The outputs with an axis named as the text inputs' sequence axis (`batch, sequence, labels` for a token
    classifier's logits), and that axis."""
    names = {spec.shape[1] for spec in signature.inputs if len(spec.shape) > 1 and isinstance(spec.shape[1], str)}
    return {spec.name: axis for spec in signature.outputs for axis, dim in enumerate(spec.shape)
            if axis > 0 and isinstance(dim, str) and dim in names}


def own_lengths(parts: list[dict], mask: np.ndarray | None, counts: list[int], axes: dict[str, int]) -> list[dict]:
    """Each request's per-token outputs cut to its own longest text: a batch is padded to its longest row, and a
    request's answer must not depend on what it was batched with (the same text alone answers exactly its own
    tokens; inside a batch of longer ones it would otherwise carry their padding positions too)."""
    if mask is None:
        return parts
    rows = np.count_nonzero(mask, axis=1).tolist()
    bounds = list(accumulate(counts, initial=0))
    cut = []
    for i, outputs in enumerate(parts):
        longest = max(rows[bounds[i]:bounds[i + 1]], default=0)
        cut.append({name: (array[(slice(None),) * axes[name] + (slice(0, longest),)] if name in axes else array)
                    for name, array in outputs.items()})
    return cut


def tokens_per_request(inputs: dict, counts: list[int]) -> list[int] | None:
    """Real (unpadded) tokens per request, from the attention mask, for text models."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    if len(counts) == 1:
        return [int(np.count_nonzero(mask))]
    per_item = np.count_nonzero(mask, axis=1).tolist()
    bounds = list(accumulate(counts, initial=0))
    return [sum(per_item[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]
