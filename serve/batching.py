"""Adaptive dynamic batching on LitServe's own loop: no request waits for a batch window.

The loop also carries kiln's request and response channels: two `multiprocessing` queues (a pipe
each) between the HTTP process and the workers. LitServe's default queues are Manager proxies,
where every put and get is a round trip through a separate manager process; profiled under load
here, those hops took more CPU than the HTTP layer. The loop's `get_batch_requests` and
`put_response` are the extension points LitServe offers for exactly this.

LitServe's BatchedLoop waits out `batch_timeout` unless the batch fills, so a lone request pays the
whole window. Here the worker blocks only while idle: the first request is taken the moment it
arrives; whatever queued up while the previous batch ran is drained at once (up to
max_batch_size), as Triton's dynamic batcher does. The short `max_batch_delay` wait applies only
when a backlog already exists (two or more requests gathered), i.e. under load, where it costs a
little latency and buys fuller batches.
"""

from __future__ import annotations

import time
from queue import Empty

from litserve.loops import BatchedLoop
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.utils import LitAPIStatus, LoopResponseType  # noqa: F401 - LoopResponseType: put_response's contract

IDLE_POLL_S = 0.5


class AdaptiveBatchedLoop(BatchedLoop):
    def __init__(self, max_batch_delay_s: float = 0.002, requests=None, responses=None) -> None:
        super().__init__()
        self.max_batch_delay_s = max_batch_delay_s
        self.requests = requests  # multiprocessing.Queue of (0, uid, enqueued_monotonic, payload)
        self.responses = responses  # multiprocessing.Queue of (uid, response, status)

    def put_response(self, transport, response_queue_id, uid, response_data, status, response_type) -> None:
        if self.responses is None:
            return super().put_response(transport, response_queue_id, uid, response_data, status, response_type)
        if status == LitAPIStatus.START:
            return None
        self.responses.put((uid, response_data, status))
        return None

    def _admit(self, item, lit_api, payloads: list, timed_out: list, transport) -> None:
        if item == _SENTINEL_VALUE:
            raise _StopLoopError()
        response_queue_id, uid, enqueued, x_enc = item
        timeout = lit_api.request_timeout
        if timeout not in (-1, False, None) and time.monotonic() - enqueued > timeout:
            timed_out.append((response_queue_id, uid))
            return
        if self._restart_workers:  # lets LitServe fail this request promptly if the worker dies
            self.put_response(transport, response_queue_id, uid, "", LitAPIStatus.START, LoopResponseType.REGULAR)
        payloads.append((response_queue_id, uid, x_enc))

    def get_batch_requests(self, lit_api, request_queue, transport):
        payloads: list = []
        timed_out: list = []
        source = self.requests if self.requests is not None else request_queue
        try:
            item = source.get(timeout=IDLE_POLL_S)  # idle: block until the first request
        except Empty:
            if source is not request_queue:  # LitServe asks a worker to stop through its own queue
                try:
                    if request_queue.get_nowait() == _SENTINEL_VALUE:
                        raise _StopLoopError()
                except Empty:
                    pass
            return [], []
        self._admit(item, lit_api, payloads, timed_out, transport)
        deadline = None
        while len(payloads) < lit_api.max_batch_size:
            try:
                item = source.get_nowait()  # what arrived while the last batch ran
            except Empty:
                if len(payloads) < 2 or self.max_batch_delay_s <= 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.max_batch_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = source.get(timeout=remaining)
                except Empty:
                    break
            self._admit(item, lit_api, payloads, timed_out, transport)
        return payloads, timed_out
