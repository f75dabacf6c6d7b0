"""Adaptive dynamic batching in kiln's own LitServe loop: no request waits for a batch window.

LitServe's BatchedLoop waits out `batch_timeout` unless the batch fills, so a lone request pays the
whole window. Here the worker blocks only while idle: the first request is taken the moment it
arrives; whatever queued up while the previous batch ran is drained at once (up to
max_batch_size), as Triton's dynamic batcher does. The short `max_batch_delay` wait applies only
when a backlog already exists (two or more requests gathered) and only when it pays: the worker
measures the cost per item of the batches it runs, by size, and holds a batch for more requests
only where a fuller batch has been measurably cheaper per item. On a CPU the cost per item is
often flat past a few items (digits, ONNX fp32, one thread: 1.2 ms per item at batch 1 and at 32);
there a wait only leaves the cores idle while requests queue. When every backlog batch waited
2 ms, digits served 651-771 requests/s at concurrency 32; without the wait, 899-1,024.

A batch is bounded twice: by requests (max_batch_size) and by items (max_batch_items, the sum of the
requests' item counts: 32 requests of 64 sequences are 2,048 sequences, not 32). A request that would take a
batch past the item cap is not dropped: it is carried over and opens the next batch. The HTTP process refuses
any single request larger than the cap (413), so every request fits a batch of its own. Both bounds are one
admission policy (serve.admission.RowsAdmission), asked request by request; another policy (a token budget)
replaces it without touching this loop.

Each request carries its deadline. The worker drops a request unrun (an expired Answer, 504 for its client)
when it takes it off the channel past its deadline, and again just before the batch runs when the batch
would, by the cost model's measure, finish past it: no runtime time goes to answers nobody waits for.

Requests and answers travel on kiln's worker channel (serve.channel) rather than LitServe's Manager
queues. The loop is a LitLoop of its own (LitServe's extension point for a worker's loop; the server
stays a LitServer): per batch it gathers requests off the channel (`get_batch_requests`), runs
`KilnAPI.batch` and `KilnAPI.predict`, and writes the batch's answers in one flush. LitServe's
BatchedLoop, which this loop used to extend, ran its own per-batch code around those hooks: six
callback events (kiln registers no callbacks), an `inspect.signature` per hook call to look for a
`context` argument, a context dict, `decode_request`, `encode_response` and `put_response` per
request: identity work for kiln's API. None of it is run here, and no callback event is fired.
Measured with timestamps along the path (MiniLM, ONNX fp32, 2 threads, concurrency 1, 3 runs of
1,000 requests each), the worker's time per request outside the runtime fell from 0.64-0.79 ms to
0.36-0.50 ms. The largest part of LitServe's share was `inspect.signature`; like all Python here it
runs on a cache that the model's run has just evicted (pickling an Answer took 0.10 ms after a run,
0.014 ms back to back), so every call left out counts several times over.

Once a request is off the channel it is answered, whatever fails: a batch that fails outside the
runtime (KilnAPI.predict retries each request alone when the runtime fails) is answered 500 per
request, as is a request whose result cannot be sent. LitServe stops a worker with its stop sentinel
on the request queue, read while the worker is idle. On SIGTERM a worker keeps serving until the HTTP
process has drained and closed the channel, so the requests in flight during a graceful shutdown are
answered. When the channel is lost otherwise, the worker reconnects (the HTTP process has answered
the lost requests 503).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from queue import Empty

from litserve.loops.base import LitLoop

from kiln.serve.admission import BatchAdmission, RowsAdmission, cut_batch
from kiln.serve.channel import Answer, Job, WorkerChannel
from kiln.serve.litserve_private import SENTINEL_VALUE, StopLoopError

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
WAIT_GAIN = 0.10  # a fuller batch must be at least this much cheaper per item to hold requests for it
EXPLORE_AFTER_S = 1.0  # with every request estimated late, still run one if nothing was measured for this long
WINDOW_BATCHES = 4  # length-aware cutting: requests taken off the channel to choose from, in max_batch_size units
STOPPING = threading.Event()


def stop_after_drain(signum, frame) -> None:
    """SIGTERM in a worker: finish what the HTTP process still sends, exit when it closes the channel."""
    STOPPING.set()


def batch_bucket(items: int) -> int:
    return 1 << (max(items, 1).bit_length() - 1)


def worth_waiting(per_item_s: dict[int, float] | None, gathered: int) -> bool:
    """Whether holding `gathered` items for more makes the batch measurably cheaper per item.

    `per_item_s` maps batch-size buckets (in items) to the seconds per item measured on real batches, so
    every size in it is one the loop has formed. Where there is no measurement to say a fuller batch is
    cheaper, the batch runs at once: on a CPU a wait that does not pay only leaves the cores idle while
    requests queue.
    """
    if not per_item_s:
        return False
    bucket = batch_bucket(gathered)
    now = per_item_s.get(bucket)
    fuller = [cost for size, cost in per_item_s.items() if size > bucket]
    return now is not None and bool(fuller) and now > (1.0 + WAIT_GAIN) * min(fuller)


def _average(table: dict[int, float], bucket: int, cost: float) -> None:
    previous = table.get(bucket)
    table[bucket] = cost if previous is None else 0.8 * previous + 0.2 * cost


def _nearest(table: dict[int, float], bucket: int) -> float:
    cost = table.get(bucket)
    if cost is None:
        cost = table[min(table, key=lambda size: abs(size.bit_length() - bucket.bit_length()))]
    return cost


class BatchCostModel:
    """Seconds per item by batch-size bucket (powers of two), a moving average over the batches really run:
    real request lengths, real load. The API that runs the batches owns it and teaches it (`learn`); the
    batching loop asks it whether a backlog batch should wait for more requests (`worth_waiting`).

    For text batches it also learns seconds per padded position (rows x longest row) by bucket of positions,
    since a batch of passages costs many times a batch of queries of the same size: a deadline estimate for a
    batch whose positions are known uses that."""

    def __init__(self) -> None:
        self.per_item_s: dict[int, float] = {}
        self.per_position_s: dict[int, float] = {}
        self.learned_at = 0.0  # time.monotonic() of the last batch measured

    def learn(self, items: int, seconds: float, positions: int | None = None) -> None:
        self.learned_at = time.monotonic()
        _average(self.per_item_s, batch_bucket(items), seconds / items)
        if positions:
            _average(self.per_position_s, batch_bucket(positions), seconds / positions)

    def worth_waiting(self, gathered: int) -> bool:
        return worth_waiting(self.per_item_s, gathered)

    def estimate_s(self, items: int, positions: int | None = None) -> float:
        """Seconds a batch of `items` (of `positions` padded positions, where known) is expected to take: the cost
        per item (per position) of its size bucket, or of the nearest bucket measured (on a CPU the cost per item
        changes slowly with the batch size); 0 before any batch ran."""
        if positions and self.per_position_s:
            return _nearest(self.per_position_s, batch_bucket(positions)) * positions
        if not self.per_item_s:
            return 0.0
        return _nearest(self.per_item_s, batch_bucket(items)) * items

    def reset(self) -> None:
        self.per_item_s.clear()
        self.per_position_s.clear()
        self.learned_at = 0.0


class AdaptiveBatchedLoop(LitLoop):
    """The inference worker's loop: gathers a batch off the worker channel, runs it, answers it, until stopped."""

    def __init__(self, max_batch_delay_s: float = 0.002, channel_path: str | None = None,
                 max_batch_items: int | None = None, admission: BatchAdmission | None = None) -> None:
        super().__init__()
        self.admission = admission  # None: RowsAdmission from the API's max_batch_size and max_batch_items
        self.max_batch_delay_s = max_batch_delay_s
        self.channel_path = channel_path
        self.max_batch_items = max_batch_items
        self._channel: WorkerChannel | None = None
        self._carried: Job | None = None  # taken off the channel but past the item cap: opens the next batch
        self._waiting: list[Job] = []  # length-aware admission: taken off the channel, measured, not yet run

    def pre_setup(self, lit_api, spec=None) -> None:
        """LitServer's check at construction: this loop runs `batch` and `predict` only, so nothing else is served."""
        if lit_api.stream or lit_api.spec is not None or lit_api.enable_async:
            raise ValueError("AdaptiveBatchedLoop serves a batched, non-streaming, synchronous LitAPI without a spec")

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner) -> None:
        """The worker's life after LitServe has set the API up: one batch per `run`, until told to stop."""
        try:
            while True:
                self.run(lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner)
        except (StopLoopError, KeyboardInterrupt):  # Ctrl-C reaches the whole group; the main process stops it
            return

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
            callback_runner) -> None:
        """One batch: gathered (`get_batch_requests`), run, and its answers sent in one write."""
        payloads, _ = self.get_batch_requests(lit_api, request_queue, transport)
        if payloads:
            self._run_batch(lit_api, payloads)
            self._flush()
            after = getattr(lit_api, "after_batch", None)
            if after is not None:  # once the answers are out: memory a large batch took goes back (KilnAPI)
                try:
                    after()
                except Exception:  # serving goes on with the memory kept
                    logger.exception("the worker could not give memory back after a batch")

    def _run_batch(self, lit_api, payloads: list[tuple]) -> None:
        """KilnAPI.batch then KilnAPI.predict (which retries each request alone when the runtime fails on the
        batch); if anything else fails, each request of the batch is answered 500, so none is left waiting."""
        try:
            results = lit_api.predict(lit_api.batch([item for _, _, item in payloads]))
            if len(results) != len(payloads):
                raise RuntimeError(f"predict gave {len(results)} results for a batch of {len(payloads)} requests")
        except Exception:
            logger.exception("the worker failed on a batch of %d request(s); each is answered 500", len(payloads))
            results = [None] * len(payloads)
        for (_, uid, _), result in zip(payloads, results):
            self._answer(uid, result)

    def _answer(self, uid: int, result) -> None:
        """Queues a request's answer (`result`: the serve.channel.Result KilnAPI made, or None: 500)."""
        if self._channel is None:  # its HTTP process is gone and has answered it 503
            return
        try:
            self._channel.queue(Answer(uid, None, 500) if result is None else Answer(uid, result))
        except Exception:  # a result that cannot be sent (pickled) fails its own request alone
            logger.exception("the answer to request %d cannot be sent; it is answered 500", uid)
            self._channel.queue(Answer(uid, None, 500))

    def _connected(self, request_queue) -> WorkerChannel | None:
        if self._channel is not None:
            return self._channel
        channel = WorkerChannel(self.channel_path, os.environ.get("LITSERVE_WORKER_ID", "0"))
        if channel.connect():
            self._channel = channel
            return channel
        self._check_stop(request_queue)
        time.sleep(0.05)  # the HTTP process is still starting
        return None

    def _check_stop(self, request_queue) -> None:
        """LitServe asks a worker to stop through its own queue; a SIGTERM with no channel also ends it."""
        try:
            if request_queue.get_nowait() == SENTINEL_VALUE:
                raise StopLoopError()
        except Empty:
            pass
        if STOPPING.is_set() and self._channel is None:
            raise StopLoopError()

    def _lose_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._carried = None  # its HTTP process has already failed it (503)
        self._waiting = []

    def _flush(self) -> None:
        """The answers of the last batch in one write: one wake-up of the HTTP process per batch, not per request."""
        if self._channel is None:
            return
        try:
            self._channel.flush()
        except OSError:  # the HTTP process is gone; its requests are lost with it
            self._lose_channel()

    def _expire(self, request: Job) -> None:
        """Answers a request 504 without running it (LitServe's own timeout path would log an error line per
        request, which under overload floods the log)."""
        if self._channel is not None:
            self._channel.queue(Answer(request.uid, None, 504, expired=True))

    def _receive(self, timeout: float):
        try:
            return self._channel.recv(timeout)
        except (ConnectionError, OSError):
            self._lose_channel()
            if STOPPING.is_set():
                raise StopLoopError() from None
            return None

    def _shed(self, taken: list[Job], lit_api) -> list[Job]:
        """The batch's requests that can still meet their deadline; the others are answered 504 unrun.

        Past its deadline now: dropped. Otherwise requests join, those with the most time left first, while the
        batch they form is expected (by the cost model) to finish before every member's deadline; the batch is
        then run in arrival order. When none fits and no batch has been measured for EXPLORE_AFTER_S, the request
        with the most time left runs anyway: an estimate that went stale (measured while the cores were busy
        elsewhere) is measured again, rather than refusing every request on its word forever."""
        if not taken:
            return taken
        now = time.monotonic()
        cost_model = lit_api.cost_model
        running: set[int] = set()
        items = longest = 0
        earliest = math.inf
        for request in sorted(taken, key=lambda r: r.deadline, reverse=True):
            if request.deadline <= now:
                continue
            grown = items + request.item.count
            length = max(longest, getattr(request.item, "length", None) or 0)
            finish = now + cost_model.estimate_s(grown, grown * length if length else None)
            if min(earliest, request.deadline) > finish:
                running.add(request.uid)
                items, longest = grown, length
                earliest = min(earliest, request.deadline)
        if not running and now - cost_model.learned_at >= EXPLORE_AFTER_S:
            latest = max(taken, key=lambda r: r.deadline)
            if latest.deadline > now:
                running.add(latest.uid)
        kept = []
        for request in taken:
            if request.uid in running:
                kept.append(request)
            else:
                self._expire(request)
        return kept

    def get_batch_requests(self, lit_api, request_queue, transport):
        """LitLoop's hook for gathering a batch, which `run` calls. `lit_api` is a serve.api.KilnAPI: its
        `cost_model` (a BatchCostModel, taught by the batches it runs) decides whether a backlog batch waits for
        more requests and which requests would finish too late.

        Returns LitServe's shapes, ([(queue id, uid, item)], timed-out list): requests past their deadline are
        answered here, over the channel, so the timed-out list is always empty."""
        self._flush()
        if self._connected(request_queue) is None:
            return [], []
        if getattr(self.admission_for(lit_api), "cuts_by_length", False):
            return self._gather_by_length(lit_api, request_queue), []
        first = self._carried
        self._carried = None
        if first is None:
            first = self._receive(IDLE_POLL_S)  # idle: block until the first request
        if first is None:
            self._check_stop(request_queue)
            return [], []
        taken: list[Job] = []
        try:
            self._gather(lit_api, first, taken)
            taken = self._shed(taken, lit_api)
        except StopLoopError:
            raise
        except Exception:  # taken off the channel, so answered: 500, rather than left to their deadline
            logger.exception("the worker failed gathering a batch of %d request(s); each is answered 500", len(taken))
            for request in taken:
                self._answer(request.uid, None)
            taken = []
        self._flush()  # expired answers go out now, not after the batch has run
        if self._channel is None:  # lost while gathering: the HTTP process has answered these 503 already
            return [], []
        return [(0, request.uid, request.item) for request in taken], []

    def admission_for(self, lit_api) -> BatchAdmission:
        """The batch admission policy (serve.admission): the one given, or today's rule, requests up to the API's
        max_batch_size and items up to max_batch_items."""
        if self.admission is None:
            self.admission = RowsAdmission(lit_api.max_batch_size, self.max_batch_items)
        return self.admission

    def _gather(self, lit_api, first: Job, taken: list[Job]) -> None:
        """Appends `first` and what else the batch takes off the channel to `taken` (those past their deadline are
        answered 504 instead); a request the admission policy has no room for is carried over to open the next
        batch."""
        admission = self.admission_for(lit_api)
        admission.new_batch()
        now = time.monotonic()
        request = first
        deadline = None
        while True:
            if not admission.fits(request.item) and request.deadline > now:
                self._carried = request  # the batch is full for this one: it opens the next batch
                return
            if request.deadline <= now:
                self._expire(request)  # its client has had its 504 already
            else:
                taken.append(request)
                admission.admit(request.item)
            if not admission.has_capacity() or self._channel is None:
                return
            request = self._receive(0.0)  # what arrived while the last batch ran
            if request is None:
                if len(taken) < 2 or self.max_batch_delay_s <= 0 or self._channel is None:
                    return
                if deadline is None and not lit_api.cost_model.worth_waiting(admission.items):
                    return
                if deadline is None:
                    deadline = time.monotonic() + self.max_batch_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                request = self._receive(remaining)
                if request is None:
                    return
            now = time.monotonic()

    def _gather_by_length(self, lit_api, request_queue) -> list[tuple]:
        """A length-aware batch (serve.admission.cut_batch): what waits on the channel is taken off it (up to
        WINDOW_BATCHES batches' worth), measured (tokenized) in one call, and the batch cut from everything
        waiting, earliest deadline first; the rest waits in the worker for the next cut. Requests past their
        deadline are answered 504 unrun, as on the other path."""
        admission = self.admission_for(lit_api)
        taken: list[Job] = []
        try:
            if not self._waiting:
                first = self._receive(IDLE_POLL_S)  # idle: block until the first request
                if first is None:
                    self._check_stop(request_queue)
                    return []
                self._take([first], lit_api)  # and what else is on the channel now
            else:
                self._take([], lit_api)
            taken = self._cut(admission, lit_api)
            taken = self._shed(taken, lit_api)
        except StopLoopError:
            raise
        except Exception:  # taken off the channel, so answered: 500, rather than left to their deadline
            logger.exception("the worker failed gathering a batch of %d request(s); each is answered 500",
                             len(taken) + len(self._waiting))
            for request in taken + self._waiting:
                self._answer(request.uid, None)
            taken, self._waiting = [], []
        self._flush()  # expired answers go out now, not after the batch has run
        if self._channel is None:  # lost while gathering: the HTTP process has answered these 503 already
            return []
        return [(0, request.uid, request.item) for request in taken]

    def _take(self, jobs: list[Job], lit_api) -> None:
        """Adds `jobs` and whatever else is on the channel now (up to the window) to the waiting requests, measured."""
        window = WINDOW_BATCHES * max(1, int(lit_api.max_batch_size))
        while self._channel is not None and len(self._waiting) + len(jobs) < window:
            job = self._receive(0.0)
            if job is None:
                break
            jobs.append(job)
        if self._channel is None:  # lost meanwhile: its HTTP process has answered all of these 503
            self._waiting = []
            return
        if not jobs:
            return
        try:
            lit_api.measure([job.item for job in jobs])
        except Exception:  # one text breaks the tokenizer: measure each alone; the one that fails is answered 500
            for job in list(jobs):
                try:
                    lit_api.measure([job.item])
                except Exception:
                    logger.exception("the worker could not tokenize request %d; it is answered 500", job.uid)
                    self._answer(job.uid, None)
                    jobs.remove(job)
        self._waiting.extend(jobs)

    def _cut(self, admission: BatchAdmission, lit_api) -> list[Job]:
        """The next batch from the waiting requests (those past their deadline are answered 504 first); where the
        cost model says a fuller batch is cheaper per item, waits up to max_batch_delay_s for more and cuts again."""
        deadline = None
        while True:
            now = time.monotonic()
            live = []
            for job in self._waiting:
                if job.deadline <= now:
                    self._expire(job)  # its client has had its 504 already
                else:
                    live.append(job)
            batch, rest = cut_batch(live, admission)
            self._waiting = rest
            if (len(batch) < 2 or not admission.has_capacity() or self.max_batch_delay_s <= 0
                    or self._channel is None):
                return batch
            if deadline is None:
                if not lit_api.cost_model.worth_waiting(admission.items):
                    return batch
                deadline = now + self.max_batch_delay_s
            remaining = deadline - time.monotonic()
            arrived = self._receive(remaining) if remaining > 0 else None
            self._waiting = batch + self._waiting
            if arrived is None:
                self._waiting = rest if self._channel is not None else []  # lost: all answered 503 already
                return batch
            self._take([arrived], lit_api)
