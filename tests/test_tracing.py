"""Traces (issue 21): one trace per inference request, under the client's W3C traceparent, with spans for receive,
queue, batch (size, tokens), run and reply; exported over OTLP/HTTP to a receiver in the test; nothing of
OpenTelemetry imported when tracing is off."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from otlp_receiver import OtlpReceiver
from server_process import ServerProcess, free_port

from kiln.serve.channel import Result

CHILDREN = {"receive", "queue", "batch", "reply"}


def traceparent(index: int) -> tuple[str, str, str]:
    trace_id = f"{index + 1:032x}".replace("0", "a", 8)
    parent_id = f"{index + 7:016x}"
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def check_trace(spans: list[dict], trace_id: str, parent_id: str, route: str, method: str = "POST") -> dict:
    """The spans of one request's trace, checked: one root under the client's span, the five children, and their
    times nested within the root. Returns them by name."""
    mine = [s for s in spans if s["trace"] == trace_id]
    roots = [s for s in mine if s["parent"] == parent_id]
    assert len(roots) == 1, (trace_id, [s["name"] for s in mine])
    root = roots[0]
    assert root["name"] == f"{method} {route}" and root["kind"] == 2  # SPAN_KIND_SERVER
    by_name = {s["name"]: s for s in mine}
    assert len(mine) == 6 and set(by_name) == CHILDREN | {"run", root["name"]}, [s["name"] for s in mine]
    for name in CHILDREN:
        assert by_name[name]["parent"] == root["id"], name
        assert root["start"] <= by_name[name]["start"] <= by_name[name]["end"] <= root["end"], name
    run, batch, queue = by_name["run"], by_name["batch"], by_name["queue"]
    assert run["parent"] == batch["id"] and batch["start"] <= run["start"] <= run["end"] <= batch["end"]
    assert by_name["receive"]["end"] <= queue["start"] <= queue["end"] == batch["start"] <= by_name["reply"]["start"]
    assert batch["attributes"]["kiln.batch.requests"] >= 1 and batch["attributes"]["kiln.batch.items"] >= 1
    return by_name


# --- fast -------------------------------------------------------------------------------------------------------


def test_tracing_off_imports_nothing_of_opentelemetry():
    """kiln adds no OpenTelemetry module to what its dependencies import (FastAPI imports the bare API package
    where it is installed) and never the SDK or an exporter."""
    code = ("import sys, litserve, fastapi; otel = lambda: {m for m in sys.modules if m.startswith('opentelemetry')}; "
            "before = otel(); "
            "import kiln.serve.server, kiln.serve.routes, kiln.serve.inference, kiln.serve.control, "
            "kiln.serve.tracing as t; assert t.endpoint_from(None) is None; "
            "from kiln.serve.server import ServeConfig; "
            "print(sorted(otel() - before), sorted(m for m in otel() if '.sdk' in m or '.exporter' in m))")
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[] []"


def test_the_endpoint_comes_from_the_flag_or_the_environment(monkeypatch):
    from kiln.core.errors import UsageError
    from kiln.serve.tracing import endpoint_from

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert endpoint_from(None) is None
    assert endpoint_from("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert endpoint_from("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert endpoint_from(None) == "http://collector:4318/v1/traces"
    with pytest.raises(UsageError, match="http"):
        endpoint_from("collector:4318")


def test_spans_are_built_from_the_results_timings_with_the_batchs_tokens():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kiln.serve.tracing import RequestTrace, SpanBuilder

    exporter = InMemorySpanExporter()
    builder = SpanBuilder(exporter)
    trace_id, parent_id, header = traceparent(3)
    now = time.time()
    record = RequestTrace("/v2/models/{name}/infer", {"traceparent": header}, int(now * 1e9))
    record.parsed = int((now + 0.001) * 1e9)
    record.submitted = int((now + 0.002) * 1e9)
    record.model, record.version = "minilm", "2"
    record.result = Result({}, 0.003, 0.004, 3, 5, "12-1", None, 7, batch_tokens=40, run_started=now + 0.0055)
    record.answered = int((now + 0.011) * 1e9)
    builder.emit(record.row(200, int((now + 0.012) * 1e9)))
    builder.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == CHILDREN | {"run", "POST /v2/models/{name}/infer"}
    root = spans["POST /v2/models/{name}/infer"]
    assert f"{root.context.trace_id:032x}" == trace_id and f"{root.parent.span_id:016x}" == parent_id
    assert root.attributes["kiln.model"] == "minilm" and root.attributes["kiln.model_version"] == "2"
    batch = spans["batch"]
    assert dict(batch.attributes) == {"kiln.batch.requests": 3, "kiln.batch.items": 5, "kiln.batch.id": "12-1",
                                      "kiln.batch.tokens": 40, "kiln.request.tokens": 7}
    assert spans["queue"].end_time - spans["queue"].start_time == 3_000_000
    assert spans["run"].end_time - spans["run"].start_time == 4_000_000 and spans["run"].parent.span_id == \
        batch.context.span_id
    assert root.kind.name == "SERVER" and root.resource.attributes["service.name"] == "kiln"
    assert {s.context.trace_id for s in spans.values()} == {int(trace_id, 16)}
    # A client that says not to sample (flags 00) gets no trace; a malformed traceparent starts a new one.
    exporter = InMemorySpanExporter()
    builder = SpanBuilder(exporter)
    builder.emit(RequestTrace("/r", {"traceparent": header[:-2] + "00"}, 1).row(200, 2))
    builder.emit(RequestTrace("/r", {"traceparent": "00-zz-yy-01"}, 1).row(200, 2))
    builder.shutdown()
    fresh = exporter.get_finished_spans()
    assert [s.name for s in fresh] == ["POST /r", "receive", "reply"] and fresh[0].parent is None


# --- slow: a real server exporting to a receiver in the test ----------------------------------------------------


@pytest.mark.slow
def test_each_request_is_one_trace_under_the_clients_traceparent(digits_artifacts):
    receiver = OtlpReceiver()
    server = None
    try:
        grpc_port = free_port()
        server = ServerProcess(digits_artifacts, "--variant", "onnx-fp32", "--threads", "1",
                               "--otlp-endpoint", receiver.url, "--grpc-port", str(grpc_port),
                               env={"OTEL_BSP_SCHEDULE_DELAY": "100"}).wait_ready(120)
        body = {"inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 128}]}
        sent = []
        with httpx.Client(timeout=30) as client:
            for index in range(5):
                trace_id, parent_id, header = traceparent(index)
                reply = client.post(f"{server.url}/v2/models/digits/infer", json=body,
                                    headers={"traceparent": header})
                assert reply.status_code == 200
                sent.append((trace_id, parent_id))
            untraced = client.post(f"{server.url}/v2/models/digits/infer", json=body)
            assert untraced.status_code == 200
            refused = client.post(f"{server.url}/v2/models/digits/infer", json={"inputs": []},
                                  headers={"traceparent": traceparent(9)[2]})
            assert refused.status_code >= 400
        import tritonclient.grpc as tg  # and over gRPC: the traceparent as metadata

        image = tg.InferInput("image", [2, 1, 8, 8], "FP32")
        image.set_data_from_numpy(np.zeros((2, 1, 8, 8), np.float32))
        grpc_trace, grpc_parent, header = traceparent(11)
        tg.InferenceServerClient(f"127.0.0.1:{grpc_port}").infer("digits", [image], headers={"traceparent": header})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(receiver.spans) < 5 * 6 + 6 + 3 + 6:
            time.sleep(0.1)
        spans = list(receiver.spans)
        assert set(receiver.paths) == {"/v1/traces"}
        for trace_id, parent_id in sent:
            by_name = check_trace(spans, trace_id, parent_id, "/v2/models/{name}/infer")
            root = by_name["POST /v2/models/{name}/infer"]
            assert root["service"] == "kiln" and root["attributes"]["kiln.model"] == "digits"
            assert root["attributes"]["http.response.status_code"] == 200
            assert by_name["batch"]["attributes"]["kiln.batch.items"] == 2
        by_name = check_trace(spans, grpc_trace, grpc_parent, "grpc:ModelInfer", "CALL")
        assert by_name["batch"]["attributes"]["kiln.batch.items"] == 2
        client_traces = {t for t, _ in sent} | {traceparent(9)[0], grpc_trace}
        others = [s for s in spans if s["trace"] not in client_traces]
        assert len({s["trace"] for s in others}) == 1 and len(others) == 6  # the untraced request: a trace of its own
        bad = [s for s in spans if s["trace"] == traceparent(9)[0]]
        assert sorted(s["name"] for s in bad) == ["POST /v2/models/{name}/infer", "receive", "reply"]
    finally:
        if server is not None:
            server.stop()
        receiver.close()


def test_a_front_end_without_asgi_traces_through_the_inference_call():
    """What a gRPC servicer does: InferenceService.call with the metadata as the carrier is one trace under the
    client's span, exported by the helper process to the receiver."""
    import asyncio

    from kiln.core.signature import Signature, TensorSpec
    from kiln.serve.inference import Endpoint, InferenceService
    from kiln.serve.protocol import InferenceRequest, ServedModel
    from kiln.serve.tracing import Tracing

    class Gateway:  # stands in for the worker channel: a batch of 2 that ran for 1 ms
        async def submit(self, item):
            await asyncio.sleep(0.002)
            return Result({"y": np.zeros((item.count, 3), np.float32)}, 0.001, 0.001, 2, 3, "1-1", None, None,
                          run_started=time.time() - 0.0011)

    model = ServedModel(name="m", task="classification", text=False, max_items=4, version="7",
                        signature=Signature(inputs=(TensorSpec("x", "float32", ("batch", 2)),),
                                            outputs=(TensorSpec("y", "float32", ("batch", 3)),)))
    receiver = OtlpReceiver()
    try:
        service = InferenceService({"m": Endpoint(model, Gateway())})  # type: ignore[arg-type]
        service.tracing = Tracing(f"{receiver.url}/v1/traces")
        trace_id, parent_id, header = traceparent(5)
        request = InferenceRequest({"x": np.zeros((1, 2), np.float32)}, None, 1, False)
        asyncio.run(service.call("m", request, front="grpc:ModelInfer", carrier={"traceparent": header}))
        service.tracing.shutdown()
        by_name = check_trace(receiver.spans, trace_id, parent_id, "grpc:ModelInfer", "CALL")
    finally:
        receiver.close()
    root = by_name["CALL grpc:ModelInfer"]
    assert root["attributes"]["kiln.model_version"] == "7" and by_name["batch"]["attributes"]["kiln.batch.items"] == 3


def test_tracing_without_the_sdk_is_refused_at_start_in_one_line(monkeypatch):
    import importlib.util

    from kiln.core.errors import RuntimeUnavailable
    from kiln.serve import tracing

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a))
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'kiln\[tracing\]'"):
        tracing.require()
