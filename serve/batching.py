"""Adaptive dynamic batching on LitServe's own loop: no request waits for a batch window.

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
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_POLL_S = 0.5


class AdaptiveBatchedLoop(BatchedLoop):
    def __init__(self, max_batch_delay_s: float = 0.002) -> None:
        super().__init__()
        self.max_batch_delay_s = max_batch_delay_s

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
        try:
            item = request_queue.get(timeout=IDLE_POLL_S)  # idle: block until the first request
        except Empty:
            return [], []
        self._admit(item, lit_api, payloads, timed_out, transport)
        deadline = None
        while len(payloads) < lit_api.max_batch_size:
            try:
                item = request_queue.get_nowait()  # what arrived while the last batch ran
            except Empty:
                if len(payloads) < 2 or self.max_batch_delay_s <= 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.max_batch_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = request_queue.get(timeout=remaining)
                except Empty:
                    break
            self._admit(item, lit_api, payloads, timed_out, transport)
        return payloads, timed_out
