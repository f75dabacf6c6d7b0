"""The seams of issue #24 that front ends, replicas, loaders and batching policies build on: the transport-neutral
inference call (serve.inference), the model runner (core.runner), batch admission (serve.admission), Runtime.close
and workers started and retired while a server runs (serve.workers)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import numpy as np
import pytest

from kiln.core.runner import WorkItem
from kiln.core.signature import Signature, TensorSpec
from kiln.serve.admission import RowsAdmission
from kiln.serve.channel import Result
from kiln.serve.guards import KeyCheck
from kiln.serve.inference import Endpoint, InferenceService
from kiln.serve.metrics import Metrics
from kiln.serve.protocol import InferenceRequest, RequestError, ServedModel, parse_v2

KEY = "k" * 32


def _model() -> ServedModel:
    inputs = (TensorSpec("x", "float32", ("batch", 2)),)
    return ServedModel(name="m", task="classification", text=False, max_items=4,
                       signature=Signature(inputs=inputs, outputs=(TensorSpec("y", "float32", ("batch", 3)),)))


class Gateway:  # stands in for the worker channel: answers each request with its rows of fixed logits
    async def submit(self, item):
        return Result({"y": np.zeros((item.count, 3), np.float32)}, 0.0, 0.0, 1, item.count, "0-1", tokens=None)


def test_the_inference_call_checks_the_key_the_model_and_the_limit_and_counts_each_call():
    metrics = Metrics()
    service = InferenceService({"m": Endpoint(_model(), Gateway())}, KeyCheck(KEY), metrics)  # type: ignore[arg-type]
    request = InferenceRequest({"x": np.zeros((2, 2), np.float32)}, None, 2, False)

    async def calls():
        outcomes = []
        for model, key, req in [("m", KEY.encode(), request), ("m", b"wrong", request), ("nope", KEY.encode(), request),
                                ("m", KEY.encode(), InferenceRequest({"x": np.zeros((5, 2), np.float32)}, None, 5,
                                                                     False))]:
            try:
                outcomes.append(await service.call(model, req, front="grpc:ModelInfer", api_key=key))
            except RequestError as error:
                outcomes.append(error.status)
        return outcomes

    ok, unauthorized, missing, too_many = asyncio.run(calls())
    assert isinstance(ok, Result) and ok.outputs["y"].shape == (2, 3)
    assert (unauthorized, missing, too_many) == (401, 404, 413)
    assert metrics.requests == {("grpc:ModelInfer", "CALL", "200", "m"): 1, ("grpc:ModelInfer", "CALL", "401", ""): 1,
                                ("grpc:ModelInfer", "CALL", "404", ""): 1, ("grpc:ModelInfer", "CALL", "413", "m"): 1}
    assert 'kiln_requests_total{route="grpc:ModelInfer",method="CALL",status="401",model=""} 1' in metrics.render()
    assert metrics.in_flight == 0


def test_the_key_check_is_the_one_the_http_middleware_runs():
    check = KeyCheck(KEY)
    assert check.authorized(check.presented_in({b"authorization": b"Bearer " + KEY.encode()}))
    assert check.authorized(check.presented_in({b"x-api-key": KEY.encode()}))
    assert not check.authorized(check.presented_in({})) and not check.authorized(b"k" * 31)


def test_rows_admission_is_todays_rule_requests_and_items_capped():
    admission = RowsAdmission(max_requests=3, max_items=10)
    admission.new_batch()
    big = WorkItem(None, ["t"] * 12, 12, 0.0)
    assert admission.fits(big)  # the first request of a batch always fits (the HTTP side refused larger ones)
    admission.admit(WorkItem(None, ["t"] * 6, 6, 0.0))
    assert admission.has_capacity() and not admission.fits(WorkItem(None, ["t"] * 5, 5, 0.0))
    admission.admit(WorkItem(None, ["t"] * 4, 4, 0.0))
    assert not admission.has_capacity() and admission.items == 10  # the item cap reached
    admission.new_batch()
    for _ in range(3):
        admission.admit(WorkItem(None, ["t"], 1, 0.0))
    assert not admission.has_capacity()  # the request cap reached


def test_every_runtime_can_be_closed():
    from kiln.core.runtime import CheckedRuntime, registry

    for spec in registry().values():
        opener = getattr(spec.open, "__self__", spec.open)  # a classmethod opener: its class
        assert callable(getattr(opener, "close", None)), spec.name
    assert callable(CheckedRuntime.close)


@pytest.mark.slow
def test_the_runner_splits_a_batch_retries_alone_and_closes(digits_artifacts):
    from kiln.core.runner import Batch, ModelRunner

    runner = ModelRunner(str(digits_artifacts), "onnx-fp32", 1)
    good = runner.example(2)
    ran = runner.run(runner.prepare([runner.example(1), good]))
    assert [len(next(iter(o.values()))) for o, _ in ran.outcomes] == [1, 2] and ran.whole_s is not None
    name = runner.signature.input_names[0]
    bad = WorkItem({name: np.zeros((1, 7), np.float32)}, None, 1, time.time())  # the wrong width
    # A batch the runtime refuses whole: each request is run alone, and only the bad one fails.
    ran = runner.run(Batch([good, bad], {name: np.zeros((3, 7), np.float32)}, [2, 1], time.time()))
    assert ran.whole_s is None and ran.outcomes[0][1] is None and len(next(iter(ran.outcomes[0][0].values()))) == 2
    assert ran.outcomes[1][0] is None and "the runtime failed on this request" in ran.outcomes[1][1]
    runner.close()
    with pytest.raises(AttributeError):  # the session is gone
        runner.runtime.run(runner.prepare([good]).inputs)


@pytest.mark.slow
def test_workers_start_and_retire_while_a_gateway_serves(digits_artifacts):
    """A model's workers started by kiln (not LitServe's launch) serve through the same gateway and call; retired,
    they exit."""
    from kiln.core.manifest import read_manifest
    from kiln.serve.api import KilnAPI
    from kiln.serve.batching import AdaptiveBatchedLoop
    from kiln.serve.channel import WorkerGateway
    from kiln.serve.server import served_model
    from kiln.serve.workers import start_workers

    folder = tempfile.mkdtemp(prefix="kiln-seam-")
    path = os.path.join(folder, "worker.sock")
    metrics = Metrics()
    api = KilnAPI(str(digits_artifacts), "onnx-fp32", 1, 8, AdaptiveBatchedLoop(0.0, path, 64))
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}

    async def scenario():
        gateway = WorkerGateway(path, 1, 30.0, metrics.model("digits"), "digits")
        await gateway.start()
        workers = start_workers(api, 1, "digits")
        try:
            deadline = time.monotonic() + 120
            while not gateway.ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert gateway.ready()
            manifest = read_manifest(digits_artifacts)
            served = served_model(manifest, manifest.variant("onnx-fp32"), 64, 1024, {})
            service = InferenceService({"digits": Endpoint(served, gateway)}, None, metrics)
            result = await service.call("digits", parse_v2(body, served), front="test")
            assert result.outputs is not None and result.batch_items == 1
        finally:
            await gateway.stop()
            await asyncio.to_thread(workers.retire, 20.0)
        return workers

    workers = asyncio.run(scenario())
    assert workers.alive() == 0 and [p.exitcode for p in workers.processes] == [0]  # stopped, not killed
