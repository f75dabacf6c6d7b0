"""Backpressure a client can act on: Retry-After from the queue, and --max-queued-requests answering 429 at once."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from kiln.core.runner import WorkItem
from kiln.serve.channel import WorkerGateway
from kiln.serve.protocol import RequestError, retry_after_value


def _gateway(max_queued=None, timeout_s=30.0, workers=1) -> WorkerGateway:
    gateway = WorkerGateway("/nonexistent.sock", workers, timeout_s, metrics=None, name="m", max_queued=max_queued)
    gateway.workers = {str(i): object() for i in range(workers)}  # type: ignore[misc]  # connected, as far as it asks
    return gateway


def test_retry_after_is_the_queued_work_at_the_measured_cost_per_item():
    gateway = _gateway(workers=2)
    assert gateway.retry_after_s() == 1.0  # nothing queued, nothing measured: the floor
    gateway.queued_items, gateway.per_item_s = 400, 0.025  # 400 items at 25 ms each, shared by 2 workers
    assert gateway.retry_after_s() == pytest.approx(5.0)
    gateway.queued_items = 10_000  # past the request timeout the queue sheds anyway: never longer than it
    assert gateway.retry_after_s() == 30.0
    assert retry_after_value(5.0) == "5" and retry_after_value(5.01) == "6" and retry_after_value(0.2) == "1"


def test_the_cost_per_item_is_learned_from_the_answers():
    from kiln.serve.channel import Answer, Result, _Worker
    from kiln.serve.metrics import Metrics

    gateway = _gateway()
    gateway.metrics = Metrics().model("m")
    worker = _Worker("0", writer=None)  # type: ignore[arg-type]
    gateway._answered(worker, Answer(1, Result({}, 0.0, 0.8, 4, 16, "b")))  # 16 items in 0.8 s
    assert gateway.per_item_s == pytest.approx(0.05)
    gateway._answered(worker, Answer(2, Result({}, 0.0, 0.16, 4, 16, "b")))  # then 10 ms per item: averaged in
    assert 0.01 < gateway.per_item_s < 0.05


def test_past_max_queued_requests_a_request_is_refused_429_at_once_with_a_retry_hint():
    gateway = _gateway(max_queued=3)
    gateway.queued, gateway.queued_items, gateway.per_item_s = 3, 300, 0.02
    with pytest.raises(RequestError) as refused:
        asyncio.run(gateway.submit(WorkItem(None, ["x"], 1, 0.0)))
    error = refused.value
    assert error.status == 429 and error.retry_after_header == "6"
    assert "--max-queued-requests 3" in str(error) and "'m'" in str(error)
    assert gateway.queued == 3 and gateway.queued_items == 300  # the refused request took no place
    again = pickle.loads(pickle.dumps(error))  # as serve.offload sends it across processes
    assert again.status == 429 and again.retry_after == error.retry_after


def test_not_ready_is_503_with_a_retry_hint():
    gateway = _gateway()
    gateway.workers = {}
    with pytest.raises(RequestError) as refused:
        asyncio.run(gateway.submit(WorkItem(None, ["x"], 1, 0.0)))
    assert refused.value.status == 503 and refused.value.retry_after_header == "1"


def test_the_connection_cap_says_when_to_come_back():
    from kiln.serve.connections import ConnectionLimits
    from kiln.serve.http_protocol import make_protocol
    from kiln.serve.metrics import Metrics

    protocol = make_protocol(ConnectionLimits(max_connections=4), Metrics(), lambda: 3.2)
    assert protocol._retry_after(protocol) == "4"  # type: ignore[attr-defined]
    plain = make_protocol(ConnectionLimits(), Metrics())
    assert plain._retry_after(plain) == "1"  # type: ignore[attr-defined]

    def broken() -> float:
        raise RuntimeError("no estimate")

    failing = make_protocol(ConnectionLimits(), Metrics(), broken)
    assert failing._retry_after(failing) == "1"  # type: ignore[attr-defined]
