"""Adaptive dynamic batching on LitServe's own loop: no request waits for a batch window.

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

Requests and answers travel on kiln's worker channel (serve.channel) rather than LitServe's Manager
queues; `get_batch_requests` and `put_response` are the loop's extension points for that. On
SIGTERM a worker keeps serving until the HTTP process has drained and closed the channel, so the
requests in flight during a graceful shutdown are answered.
"""

from __future__ import annotations

import os
import threading
import time
from queue import Empty

from litserve.loops import BatchedLoop
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.utils import LitAPIStatus

from kiln.serve.channel import Answer, Request, WorkerChannel

IDLE_POLL_S = 0.5
WAIT_GAIN = 0.10  # a fuller batch must be at least this much cheaper per item to hold requests for it
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


class BatchCostModel:
    """Seconds per item by batch-size bucket (powers of two), a moving average over the batches really run:
    real request lengths, real load. The API that runs the batches owns it and teaches it (`learn`); the
    batching loop asks it whether a backlog batch should wait for more requests (`worth_waiting`)."""

    def __init__(self) -> None:
        self.per_item_s: dict[int, float] = {}

    def learn(self, items: int, seconds: float) -> None:
        bucket = batch_bucket(items)
        previous = self.per_item_s.get(bucket)
        cost = seconds / items
        self.per_item_s[bucket] = cost if previous is None else 0.8 * previous + 0.2 * cost

    def worth_waiting(self, gathered: int) -> bool:
        return worth_waiting(self.per_item_s, gathered)

    def reset(self) -> None:
        self.per_item_s.clear()


class AdaptiveBatchedLoop(BatchedLoop):
    def __init__(self, max_batch_delay_s: float = 0.002, channel_path: str | None = None) -> None:
        super().__init__()
        self.max_batch_delay_s = max_batch_delay_s
        self.channel_path = channel_path
        self._channel: WorkerChannel | None = None

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
            if request_queue.get_nowait() == _SENTINEL_VALUE:
                raise _StopLoopError()
        except Empty:
            pass
        if STOPPING.is_set() and self._channel is None:
            raise _StopLoopError()

    def put_response(self, transport, response_queue_id, uid, response_data, status, response_type) -> None:
        if status == LitAPIStatus.START or self._channel is None:
            return
        if status == LitAPIStatus.OK:  # response_data is the serve.channel.Result KilnAPI made
            answer = Answer(uid, response_data)
        else:  # only the HTTP status of a failure crosses over, never an exception object
            answer = Answer(uid, None, getattr(response_data, "status_code", 500))
        self._channel.queue(answer)  # sent together with the batch's others: _flush

    def _flush(self) -> None:
        """The answers of the last batch in one write: one wake-up of the HTTP process per batch, not per request."""
        if self._channel is None:
            return
        try:
            self._channel.flush()
        except OSError:  # the HTTP process is gone; its requests are lost with it
            self._channel.close()
            self._channel = None

    def _admit(self, item: Request, lit_api, payloads: list, timed_out: list) -> None:
        # payloads and timed_out hold LitServe's own tuples: (queue id, uid, x_enc) and (queue id, uid)
        timeout = lit_api.request_timeout
        if timeout not in (-1, False, None) and time.monotonic() - item.enqueued > timeout:
            timed_out.append((0, item.uid))  # LitServe's loop answers these 504 through put_response
            return
        payloads.append((0, item.uid, item.item))

    def _receive(self, timeout: float):
        try:
            return self._channel.recv(timeout)
        except (ConnectionError, OSError):
            self._channel.close()
            self._channel = None
            if STOPPING.is_set():
                raise _StopLoopError() from None
            return None

    def get_batch_requests(self, lit_api, request_queue, transport):
        """LitServe's extension point. `lit_api` is a serve.api.KilnAPI: its `cost_model` (a BatchCostModel, taught
        by the batches it runs) decides whether a backlog batch waits for more requests."""
        payloads: list = []
        timed_out: list = []
        self._flush()
        if self._connected(request_queue) is None:
            return [], []
        item = self._receive(IDLE_POLL_S)  # idle: block until the first request
        if item is None:
            self._check_stop(request_queue)
            return [], []
        self._admit(item, lit_api, payloads, timed_out)
        deadline = None
        while len(payloads) < lit_api.max_batch_size and self._channel is not None:
            item = self._receive(0.0)  # what arrived while the last batch ran
            if item is None:
                if len(payloads) < 2 or self.max_batch_delay_s <= 0 or self._channel is None:
                    break
                if deadline is None and not lit_api.cost_model.worth_waiting(sum(p[2].count for p in payloads)):
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.max_batch_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                item = self._receive(remaining)
                if item is None:
                    break
            self._admit(item, lit_api, payloads, timed_out)
        return payloads, timed_out

