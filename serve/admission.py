"""Batch admission: which of the requests waiting on a worker's channel the batch being cut takes.

The batching loop (serve.batching.AdaptiveBatchedLoop) asks a policy, request by request, in the shape of
LitServe's `has_capacity` in its continuous-batching loop: `has_capacity()` (may the batch take any more at
all?), `fits(item)` (would this request still fit? if not, it is carried over and opens the next batch) and
`admit(item)` (it joins). `new_batch()` starts each batch. A request that fits no empty batch is never
refused here: the HTTP process refuses any request larger than a whole batch (413) before it is queued, so the
first request of a batch always fits.

RowsAdmission is today's rule: up to max_batch_size requests and max_batch_items items (rows, sequences). A
token budget (a batch of sequences bounded by the tokens it holds, not their count) is one more class with the
same four methods: its `fits` reads a token count the HTTP process puts on the WorkItem when it validates the
request, so the count exists before the batch is cut rather than only after the worker tokenizes it.
"""

from __future__ import annotations

import math
from typing import Protocol

from kiln.core.runner import WorkItem


class BatchAdmission(Protocol):
    """What the batching loop asks while it cuts a batch; `items` is what the cost model is asked about."""

    items: int  # items admitted to the batch being cut

    def new_batch(self) -> None: ...

    def fits(self, item: WorkItem) -> bool: ...

    def admit(self, item: WorkItem) -> None: ...

    def has_capacity(self) -> bool: ...


class RowsAdmission:
    """A batch takes requests up to `max_requests` and their items together up to `max_items` (None: no cap)."""

    def __init__(self, max_requests: int, max_items: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_items = max_items or math.inf
        self.requests = 0
        self.items = 0

    def new_batch(self) -> None:
        self.requests = 0
        self.items = 0

    def fits(self, item: WorkItem) -> bool:
        return self.requests == 0 or self.items + item.count <= self.max_items

    def admit(self, item: WorkItem) -> None:
        self.requests += 1
        self.items += item.count

    def has_capacity(self) -> bool:
        return self.requests < self.max_requests and self.items < self.max_items
