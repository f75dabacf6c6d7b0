"""Batch admission: which of the requests waiting on a worker's channel the batch being cut takes.

The batching loop (serve.batching.AdaptiveBatchedLoop) asks a policy, request by request, in the shape of
LitServe's `has_capacity` in its continuous-batching loop: `has_capacity()` (may the batch take any more at
all?), `fits(item)` (would this request still fit? if not, it is carried over and opens the next batch) and
`admit(item)` (it joins). `new_batch()` starts each batch. A request that fits no empty batch is never
refused here: the HTTP process refuses any request larger than a whole batch (413) before it is queued, so the
first request of a batch always fits.

RowsAdmission is today's rule: up to max_batch_size requests and max_batch_items items (rows, sequences). A
token budget (a batch of sequences bounded by the tokens it holds, not their count) is one more class with the
same four methods (TokenBudgetAdmission): its `fits` reads the token count and longest text the worker puts on
the WorkItem when it takes the request off the channel (it tokenizes everything waiting in one call there, rather
than in the HTTP process, whose one core is the short-request bottleneck), so lengths are known when the batch is
cut. With it the loop also cuts length-aware (`cut_batch`): from the requests waiting, the one with the earliest
deadline opens the batch and those nearest its length join while the batch stays within budget, so short queries
are not computed at passage length and no request waits behind a stream of others.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

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


# Padding a request may cause, at most: a shorter one joins only if the batch's longest row is within this many times
# its own length; a longer one only if the batch stays within this many positions per real token. These make the
# runs of similar length a length-aware cut forms: a passage (200 tokens) joining 24 queries (15 each) would make the
# batch 9x its real tokens, and a query joining passages would be computed at 13x its length. At 2 (this rule's first
# value) passages of 130 and 254 tokens shared batches: 1.3 positions per real token on the retrieval mix; at 1.25,
# 1.1, and 13% more requests/s (MiniLM pt2-int8, benchmarks/token_batching.py, README).
MAX_PADDING_RATIO = 1.25
# ... or within this many positions a row: padding a 10-token query to 18 costs little, and a ratio alone would split
# short queries into many small batches (1.25 without it: 8% fewer short requests/s, HTTP-bound as they are).
PADDING_SLACK = 16


class TokenBudgetAdmission:
    """A batch of sequences bounded by the positions it computes: rows x its longest row at most `max_tokens`, and
    at most `max_requests` requests and `max_items` rows. Padding is what a mixed batch wastes (every row is
    computed at the longest row's length), so a request whose own row would be padded past MAX_PADDING_RATIO x its
    length, or that would pad the batch past MAX_PADDING_RATIO x its real tokens, does not join either, unless the
    padding stays within PADDING_SLACK positions a row. The first request of a batch always joins, however long:
    the HTTP process has bounded its size already, so a request larger than the budget runs alone.

    Requests without a measured length (tensor models, or a runner that does not tokenize ahead) count as
    one token per item, which makes this RowsAdmission."""

    cuts_by_length = True  # the batching loop keeps a window of requests and cuts it with `cut_batch`

    def __init__(self, max_requests: int, max_tokens: int, max_items: int | None = None,
                 max_padding_ratio: float = MAX_PADDING_RATIO, padding_slack: int = PADDING_SLACK) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.max_items = max_items or math.inf
        self.max_padding_ratio = max_padding_ratio
        self.padding_slack = padding_slack
        self.new_batch()

    def new_batch(self) -> None:
        self.requests = 0
        self.items = 0
        self.longest = 0
        self.tokens = 0  # real (unpadded) tokens admitted

    def padded_with(self, item: WorkItem) -> int:
        return (self.items + item.count) * max(self.longest, item.length or 1)

    def fits(self, item: WorkItem) -> bool:
        if self.requests == 0:
            return True
        if self.requests >= self.max_requests or self.items + item.count > self.max_items:
            return False
        padded = self.padded_with(item)
        if padded > self.max_tokens:
            return False
        length = item.length or 1
        if length < self.longest:  # its rows would be padded
            return self.longest <= max(self.max_padding_ratio * length, length + self.padding_slack)
        real = self.tokens + (item.tokens if item.tokens is not None else item.count)
        rows = self.items + item.count  # it pads the others: the batch stays mostly real tokens
        return padded <= max(self.max_padding_ratio * real, real + self.padding_slack * rows)

    def admit(self, item: WorkItem) -> None:
        self.requests += 1
        self.items += item.count
        self.longest = max(self.longest, item.length or 1)
        self.tokens += item.tokens if item.tokens is not None else item.count

    def has_capacity(self) -> bool:
        return (self.requests < self.max_requests and self.items < self.max_items
                and (self.items + 1) * max(self.longest, 1) <= self.max_tokens)


def cut_batch(waiting: list, admission: BatchAdmission) -> tuple[list, list]:
    """Splits `waiting` (serve.channel.Jobs whose items carry their lengths) into (the batch to run now, the rest).

    The request with the earliest deadline opens the batch, so none starves: whatever arrives after it, it runs
    in the next batch cut at the latest once it is the oldest. The others are offered in order of how near their
    length is to the opener's (then by deadline), each joining when the admission policy has room for it; one
    that does not fit is passed over, not the end of the cut, so a shorter one after it may still join. The batch
    keeps arrival order."""
    if not waiting:
        return [], []
    admission.new_batch()
    first = min(waiting, key=lambda job: job.deadline)
    length = first.item.length or 1
    admission.admit(first.item)
    chosen = {id(first)}
    for job in sorted(waiting, key=lambda j: (abs((j.item.length or 1) - length), j.deadline)):
        if not admission.has_capacity():
            break
        if id(job) in chosen:
            continue
        if admission.fits(job.item):
            admission.admit(job.item)
            chosen.add(id(job))
    batch = [job for job in waiting if id(job) in chosen]
    rest = [job for job in waiting if id(job) not in chosen]
    return batch, rest


# --- the default budget ------------------------------------------------------------------------------------------

DEFAULT_BATCH_TOKENS = 4096  # where nothing was measured: MiniLM pt2-int8 on 2 Zen 5 cores, from the rule below
# A full batch at passage length should take about this long on its worker: long enough that the cost per position
# has stopped falling, short enough that a query cut after it waits for one such batch at most.
BATCH_TARGET_S = 0.2
BUDGET_BOUNDS = (512, 16384)


def batch_admission(max_requests: int, max_items: int | None, tokens: int = 0) -> BatchAdmission:
    """A model's policy, whoever hosts it (kiln serve's worker, a Ray replica): with `tokens` (a text model's budget,
    `token_budget`) batches cut by length within it; without, requests and items in arrival order."""
    if tokens:
        return TokenBudgetAdmission(max_requests, tokens, max_items)
    return RowsAdmission(max_requests, max_items)


def token_budget(max_batch_tokens: int | None, folder: str | Path, entry: Any, threads: int | None) -> tuple[int, str]:
    """A text model's token budget and where it came from: --max-batch-tokens where given (0: none), else measured
    for the variant `entry` (a manifest VariantEntry) at `threads` (None: every usable core), default_batch_tokens."""
    if max_batch_tokens is not None:
        return max_batch_tokens, "--max-batch-tokens" if max_batch_tokens else "off (--max-batch-tokens 0)"
    from kiln.core.machine import default_threads

    return default_batch_tokens(folder, entry.name, entry.sha256, threads or default_threads())


def default_batch_tokens(folder: str | Path, variant: str, sha256: str, threads: int) -> tuple[int, str]:
    """A text model's token budget and where it came from: from its folder's bench.json (`kiln bench`'s cost of
    one item by sequence length) where that measured this variant's file on this kind of machine, positions that
    take about BATCH_TARGET_S at the longest length measured (a worker of fewer threads than bench ran is taken as
    that many times slower: `--workers 2 --threads 1` on 2 cores gets half the budget), as a power of two within
    BUDGET_BOUNDS; otherwise DEFAULT_BATCH_TOKENS. A model six times MiniLM's cost per position gets a budget six
    times smaller, so its passage batches do not hold queries six times longer."""
    from kiln.core.machine import fingerprint
    from kiln.core.paths import MAX_CONFIG_BYTES, read_json

    path = Path(folder) / "bench.json"
    fallback = f"default {DEFAULT_BATCH_TOKENS}"
    if not path.is_file():
        return DEFAULT_BATCH_TOKENS, f"{fallback} (no bench.json)"
    try:
        report: Any = read_json(path, MAX_CONFIG_BYTES, "bench report")
        machine, settings = report.get("machine") or {}, report.get("settings") or {}
        cost = (report.get("seq_cost") or {}).get("variants", {}).get(variant) or {}
        same_file = (report.get("hashes") or {}).get(variant) == sha256
    except Exception:  # a damaged or foreign file is no measurement: the default serves
        return DEFAULT_BATCH_TOKENS, f"{fallback} (bench.json unreadable)"
    if not cost or not same_file:
        return DEFAULT_BATCH_TOKENS, f"{fallback} (bench.json has no cost by length for this {variant} file)"
    if machine.get("fingerprint") != fingerprint():
        return DEFAULT_BATCH_TOKENS, f"{fallback} (bench.json measured another kind of machine)"
    measured_threads = settings.get("threads")
    try:
        longest = max(cost, key=int)
        per_position_s = float(cost[longest]["us_per_token"]) / 1e6
        # Fewer threads than bench ran: at most that many times slower (more: no faster than measured).
        per_position_s *= max(1.0, int(measured_threads) / threads)
    except (KeyError, TypeError, ValueError):
        return DEFAULT_BATCH_TOKENS, f"{fallback} (bench.json's cost by length is unreadable)"
    if not math.isfinite(per_position_s) or per_position_s <= 0:
        return DEFAULT_BATCH_TOKENS, f"{fallback} (bench.json's cost by length is unreadable)"
    budget = 2 ** round(math.log2(BATCH_TARGET_S / per_position_s))
    budget = min(max(budget, BUDGET_BOUNDS[0]), BUDGET_BOUNDS[1])
    scaled = f", scaled from {measured_threads} threads to {threads}" if measured_threads != threads else ""
    return budget, (f"{budget} from bench.json ({per_position_s * 1e6:.1f} us per position at length {longest}"
                    f"{scaled})")
