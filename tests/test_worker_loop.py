"""The inference worker's own LitLoop (serve.batching.AdaptiveBatchedLoop) on a real worker channel: the HTTP
process's end (serve.channel.WorkerGateway) in this test's event loop, the loop in a thread, a real LitAPI that
doubles arrays. No model: what is checked is the loop, whatever the runtime behind `predict` does."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import queue
import threading
import time

import litserve as ls
import numpy as np
import pytest
from litserve.callbacks import CallbackRunner
from litserve.loops.base import _SENTINEL_VALUE, LitLoop

from kiln.core.runner import WorkItem
from kiln.core.runner import split as _split
from kiln.core.runner import tokens_per_request as _tokens_per_request
from kiln.serve import batching
from kiln.serve.admission import TokenBudgetAdmission
from kiln.serve.batching import AdaptiveBatchedLoop, BatchCostModel
from kiln.serve.channel import Result, WorkerGateway
from kiln.serve.metrics import Metrics
from kiln.serve.protocol import RequestError


class Doubler(ls.LitAPI):
    """A real LitAPI in the shape of serve.api.KilnAPI: `batch` stacks the requests' arrays, `predict` answers one
    Result each. `fail` picks what breaks: "batch" (batch raises), "count" (predict gives one result too few),
    "unpicklable" (the result of a request whose array holds -1 cannot be pickled)."""

    def __init__(self, loop: AdaptiveBatchedLoop, fail: str | None = None) -> None:
        super().__init__(max_batch_size=8, loop=loop, api_path="/_kiln/worker")
        self.fail = fail
        self.cost_model = BatchCostModel()
        self.batches: list[int] = []

    def batch(self, items: list[WorkItem]):
        if self.fail == "batch":
            raise ValueError("broken batch")
        return items, np.concatenate([item.arrays["x"] for item in items])

    def predict(self, batch) -> list[Result]:
        items, x = batch
        self.batches.append(len(items))
        y = x * 2
        results = []
        start = 0
        for item in items:
            part = y[start:start + item.count]
            start += item.count
            outputs: dict = {"y": part}
            if self.fail == "unpicklable" and (part == -2).any():
                outputs["y"] = lambda: None  # a result the channel cannot pickle
            results.append(Result(outputs, 0.0, 0.0, len(items), int(x.shape[0]), "test"))
        return results[:-1] if self.fail == "count" else results


def _item(value: float, count: int = 1) -> WorkItem:
    return WorkItem({"x": np.full((count, 2), value, dtype=np.float32)}, None, count, time.time())


@contextlib.asynccontextmanager
async def _gateway(path: str, timeout_s: float = 30.0):
    gateway = WorkerGateway(path, 1, timeout_s, Metrics().model("m"), "m")
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()
        await asyncio.sleep(0.05)  # its connection tasks see the close and end before the event loop does


async def _ready(gateway: WorkerGateway, within_s: float = 10.0) -> None:
    end = time.monotonic() + within_s
    while not gateway.ready():
        assert time.monotonic() < end, "the worker loop never connected"
        await asyncio.sleep(0.01)


class Worker:
    """The loop, run as LitServe's inference_worker runs it (`loop(lit_api, device, worker_id, request_queue, ...)`),
    in a thread; `stop` puts LitServe's stop sentinel on the request queue."""

    def __init__(self, path: str, fail: str | None = None, max_batch_items: int | None = None,
                 admission=None, api: type[Doubler] | None = None) -> None:
        self.loop = AdaptiveBatchedLoop(0.0, path, max_batch_items, admission)
        self.api = (api or Doubler)(self.loop, fail)
        self.requests: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.loop, daemon=True,
                                       args=(self.api, "cpu", 0, self.requests, None, {}, CallbackRunner()))

    def __enter__(self) -> Worker:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, within_s: float = 5.0) -> None:
        self.requests.put(_SENTINEL_VALUE)
        self.thread.join(within_s)
        assert not self.thread.is_alive(), "the loop did not stop on LitServe's sentinel"


def test_each_request_gets_its_own_share_of_the_batch(tmp_path):
    path = str(tmp_path / "w.sock")

    async def go():
        async with _gateway(path) as gateway:
            with Worker(path) as worker:
                await _ready(gateway)
                results = await asyncio.gather(*[gateway.submit(_item(float(i), count=1 + i % 3)) for i in range(20)])
        return worker, results

    worker, results = asyncio.run(go())
    for i, result in enumerate(results):
        assert result.error is None
        np.testing.assert_array_equal(result.outputs["y"], np.full((1 + i % 3, 2), 2.0 * i, dtype=np.float32))
    assert sum(worker.api.batches) == 20 and max(worker.api.batches) > 1  # batched, and nothing run twice


def test_a_batch_that_fails_outside_the_runtime_is_answered_500_per_request_at_once(tmp_path):
    path = str(tmp_path / "w.sock")

    async def go(fail: str):
        async with _gateway(path) as gateway:
            with Worker(path, fail=fail):
                await _ready(gateway)
                started = time.monotonic()
                outcomes = await asyncio.gather(*[gateway.submit(_item(1.0)) for _ in range(6)],
                                                return_exceptions=True)
                return outcomes, time.monotonic() - started

    for fail in ("batch", "count"):
        outcomes, seconds = asyncio.run(go(fail))
        assert all(isinstance(o, RequestError) and o.status == 500 for o in outcomes), (fail, outcomes)
        assert seconds < 5.0  # answered, not left to the 30 s deadline


def test_an_answer_that_cannot_be_sent_fails_its_own_request_alone(tmp_path):
    path = str(tmp_path / "w.sock")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(lambda: None)

    async def go():
        async with _gateway(path) as gateway:
            with Worker(path, fail="unpicklable"):
                await _ready(gateway)
                return await asyncio.gather(*[gateway.submit(_item(v)) for v in (1.0, -1.0, 3.0)],
                                            return_exceptions=True)

    good, bad, other = asyncio.run(go())
    assert isinstance(bad, RequestError) and bad.status == 500
    assert good.outputs["y"][0, 0] == 2.0 and other.outputs["y"][0, 0] == 6.0


def test_the_loop_reconnects_when_the_channel_is_lost_and_stops_on_the_sentinel(tmp_path):
    path = str(tmp_path / "w.sock")

    async def go():
        with Worker(path) as worker:
            async with _gateway(path) as gateway:
                await _ready(gateway)
                assert (await gateway.submit(_item(1.0))).outputs["y"][0, 0] == 2.0
            async with _gateway(path) as gateway:  # a new HTTP process on the same path
                await _ready(gateway)
                assert (await gateway.submit(_item(2.0))).outputs["y"][0, 0] == 4.0
            started = time.monotonic()
            worker.stop()
            return time.monotonic() - started

    assert asyncio.run(go()) < 2 * batching.IDLE_POLL_S + 1.0  # the sentinel is read while idle


def test_after_sigterm_the_loop_serves_until_the_http_process_closes_the_channel(tmp_path):
    path = str(tmp_path / "w.sock")

    async def go():
        worker = Worker(path)
        async with _gateway(path) as gateway:
            worker.thread.start()
            await _ready(gateway)
            batching.STOPPING.set()  # what stop_after_drain does on SIGTERM
            await asyncio.sleep(2 * batching.IDLE_POLL_S)  # idle past a poll: still serving
            assert worker.thread.is_alive()
            assert (await gateway.submit(_item(5.0))).outputs["y"][0, 0] == 10.0
        worker.thread.join(5.0)  # the channel closed: the loop ends by itself
        return worker.thread.is_alive()

    try:
        assert asyncio.run(go()) is False
    finally:
        batching.STOPPING.clear()


def test_a_litserver_runs_the_loop_and_refuses_what_it_does_not_serve(tmp_path):
    loop = AdaptiveBatchedLoop(0.002, str(tmp_path / "w.sock"), 64)
    server = ls.LitServer(Doubler(loop), accelerator="cpu")
    assert isinstance(server.litapi_connector.lit_apis[0].loop, LitLoop)

    class Streaming(Doubler):
        def __init__(self, loop: AdaptiveBatchedLoop) -> None:
            super().__init__(loop)
            self.stream = True

    with pytest.raises(ValueError, match="non-streaming"):
        ls.LitServer(Streaming(AdaptiveBatchedLoop(0.002, str(tmp_path / "w.sock"), 64)), accelerator="cpu")


def test_a_batch_is_split_back_by_request_and_tokens_counted_from_the_mask():
    outputs = {"y": np.arange(12, dtype=np.float32).reshape(6, 2)}
    parts = _split(outputs, [1, 2, 3])
    assert [p["y"][:, 0].tolist() for p in parts] == [[0.0], [2.0, 4.0], [6.0, 8.0, 10.0]]
    assert _split(outputs, [6]) == [outputs]  # one request: its outputs as the runtime gave them
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=np.int64)
    assert _tokens_per_request({"attention_mask": mask}, [1, 2]) == [2, 5]
    assert _tokens_per_request({"attention_mask": mask}, [3]) == [7]
    assert _tokens_per_request({"input": mask}, [3]) is None  # not a text model


class Lengths(Doubler):
    """A text-shaped LitAPI: a text's tokens are its characters (`measure`, as KilnAPI.measure puts them on the
    WorkItem), and a batch costs time in proportion to rows x its longest row, as a padded transformer batch does."""

    def measure(self, items: list[WorkItem]) -> None:
        for item in items:
            lengths = [len(t) for t in item.texts]
            item.tokens, item.length, item.encoded = sum(lengths), max(lengths), {}

    def batch(self, items: list[WorkItem]):
        assert all(item.length is not None for item in items), "a request reached a batch unmeasured"
        return items

    def predict(self, items) -> list[Result]:
        rows, longest = sum(i.count for i in items), max(i.length for i in items)
        self.batches.append((len(items), longest))
        time.sleep(0.0005 + rows * longest * 2e-6)
        return [Result({"n": np.array([item.length])}, 0.0, 0.0, len(items), rows, "test") for item in items]


def test_a_long_text_in_a_steady_stream_of_short_ones_is_answered_within_its_deadline(tmp_path):
    """Length-aware cutting (serve.admission.cut_batch) on the real loop and channel: 16 clients keep short texts
    coming without pause; one long text sent among them is answered well within its deadline (the earliest
    deadline opens each batch, so it cannot starve), in a batch of its own length: the short ones are not padded
    to it."""
    path = str(tmp_path / "w.sock")
    deadline_s = 1.0

    async def go():
        async with _gateway(path, timeout_s=deadline_s) as gateway:
            with Worker(path, admission=TokenBudgetAdmission(8, 4096, 64), api=Lengths) as worker:
                await _ready(gateway)
                stop = time.monotonic() + 1.5
                answered: list[int] = []

                async def client() -> None:
                    while time.monotonic() < stop:
                        result = await gateway.submit(WorkItem(None, ["short text"], 1, time.time()))
                        answered.append(int(result.outputs["n"][0]))

                async def long_one() -> float:
                    await asyncio.sleep(0.4)  # the stream is running
                    started = time.monotonic()
                    result = await gateway.submit(WorkItem(None, ["x" * 300], 1, time.time()))
                    assert int(result.outputs["n"][0]) == 300
                    return time.monotonic() - started

                took, *_ = await asyncio.gather(long_one(), *(client() for _ in range(16)))
        return worker, answered, took

    worker, answered, took = asyncio.run(go())
    assert took < deadline_s / 4, f"the long text waited {took:.3f}s behind the short ones"
    assert len(answered) > 200 and set(answered) == {10}  # the stream ran throughout, every short one answered
    with_long = [size for size, longest in worker.api.batches if longest == 300]
    assert with_long and max(with_long) <= 2  # at most one short text padded to the long one's length
    assert max(size for size, _ in worker.api.batches) > 1  # the short ones were batched
