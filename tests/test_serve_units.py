"""Fast unit tests of kiln.serve's pieces: no servers, no exported models."""

from __future__ import annotations

import asyncio
import pickle
import socket

import numpy as np
import pytest

from kiln.core.runner import WorkItem
from kiln.core.signature import Signature, TensorSpec
from kiln.serve.batching import WAIT_GAIN, BatchCostModel
from kiln.serve.channel import HEADER, Answer, Hello, Job, Result, WorkerChannel, encode, read_frame
from kiln.serve.kinds import KINDS, TENSORS, Classification, Embedding, kind_for, softmax
from kiln.serve.protocol import InferenceRequest, ServedModel, predict_response
from kiln.serve.routes import INFERENCE_ROUTES, PREDICT, V2, match_inference

# --- channel messages ----------------------------------------------------------------------------------------------

MESSAGES = [
    Hello("3"),
    Job(7, 123.5, WorkItem({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, None, 2, 1.0)),
    Job(8, 0.0, WorkItem(None, ["a sentence", "another"], 2, 2.0)),
    Answer(7, Result({"y": np.ones((2, 10), np.float32)}, 0.001, 0.002, 3, 5, "123-4")),
    Answer(9, Result(None, 0.0, 0.5, 2, 2, "123-5", error="the runtime failed on this request: ValueError")),
    Answer(10, None, 504),
]


def _same(a, b) -> bool:
    """Dataclass equality, with numpy arrays compared by value."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_messages_are_frozen_slotted_dataclasses():
    for message in MESSAGES:
        assert not hasattr(message, "__dict__")
    with pytest.raises(AttributeError):
        MESSAGES[0].worker = "4"


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_round_trips_through_the_framing(message):
    frame = encode(message)
    (size,) = HEADER.unpack_from(frame)
    assert size == len(frame) - HEADER.size
    assert _same(pickle.loads(frame[HEADER.size:]), message)

    async def read_back():
        reader = asyncio.StreamReader()
        reader.feed_data(frame)
        reader.feed_eof()
        return await read_frame(reader)

    assert _same(asyncio.run(read_back()), message)


def test_the_worker_end_reads_frames_that_arrive_together_and_in_pieces(tmp_path):
    ours, theirs = socket.socketpair()
    channel = WorkerChannel(str(tmp_path / "unused.sock"), "0")
    channel.sock = ours
    try:
        frames = b"".join(encode(m) for m in MESSAGES)
        theirs.sendall(frames[:5])
        assert channel.recv(0.0) is None  # half a header: nothing yet
        theirs.sendall(frames[5:])
        got = [channel.recv(1.0) for _ in MESSAGES]
        assert all(_same(a, b) for a, b in zip(got, MESSAGES))
        assert channel.recv(0.0) is None
        channel.queue(MESSAGES[3])
        channel.queue(MESSAGES[5])
        channel.flush()  # the batch's answers in one write

        async def read_two():
            reader = asyncio.StreamReader()
            reader.feed_data(theirs.recv(1 << 20))
            return [await read_frame(reader), await read_frame(reader)]

        first, second = asyncio.run(read_two())
        assert _same(first, MESSAGES[3]) and _same(second, MESSAGES[5])
        theirs.close()
        with pytest.raises(ConnectionError):
            channel.recv(1.0)
    finally:
        ours.close()


# --- batch cost model ----------------------------------------------------------------------------------------------

def _model(per_item_s: dict[int, float]) -> BatchCostModel:
    model = BatchCostModel()
    for items, cost in per_item_s.items():
        model.learn(items, cost * items)
    return model


def test_the_cost_model_learns_a_moving_average_per_power_of_two_bucket():
    model = BatchCostModel()
    model.learn(1, 2.0e-3)
    model.learn(3, 6.0e-3)  # bucket 2, 2 ms per item
    model.learn(2, 8.0e-3)  # bucket 2, 4 ms per item: 0.8 * 2 + 0.2 * 4
    model.learn(40, 40 * 1.0e-3)  # bucket 32
    assert model.per_item_s.keys() == {1, 2, 32}
    assert model.per_item_s[1] == pytest.approx(2.0e-3)
    assert model.per_item_s[2] == pytest.approx(2.4e-3)
    assert model.per_item_s[32] == pytest.approx(1.0e-3)
    model.reset()
    assert model.per_item_s == {} and not model.worth_waiting(4)


def test_the_cost_model_waits_only_where_a_fuller_batch_was_measured_cheaper():
    assert not BatchCostModel().worth_waiting(4)  # nothing measured yet: run at once
    flat = _model({1: 1.2e-3, 2: 1.2e-3, 4: 1.19e-3, 8: 1.18e-3, 16: 1.2e-3, 32: 1.15e-3})  # digits on one thread
    assert not any(flat.worth_waiting(k) for k in (2, 3, 4, 8, 16, 31))
    falling = _model({1: 4.6e-3, 2: 3.6e-3, 4: 3.0e-3, 8: 2.8e-3, 16: 2.7e-3, 32: 2.9e-3})  # MiniLM, short sentences
    assert falling.worth_waiting(2) and falling.worth_waiting(3)
    assert not falling.worth_waiting(8) and not falling.worth_waiting(16)
    # Sizes count items, not requests: 40 items from a few multi-item requests wait where 64 were cheaper.
    assert _model({32: 3.0e-3, 64: 2.0e-3}).worth_waiting(40)
    assert not _model({32: 3.0e-3, 64: 2.9e-3}).worth_waiting(40)
    assert not _model({1: 4e-3, 4: 3e-3}).worth_waiting(2)  # no measurement at this size: no wait
    # The gain a fuller batch must show: just over it waits, just under it does not.
    assert _model({2: (1 + WAIT_GAIN) * 1.01e-3, 4: 1.0e-3}).worth_waiting(2)
    assert not _model({2: (1 + WAIT_GAIN) * 0.99e-3, 4: 1.0e-3}).worth_waiting(2)


# --- inference route table -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "template", "wire", "name", "version"), [
    ("/predict", "/predict", PREDICT, None, None),
    ("/v2/models/digits/predict", "/v2/models/{name}/predict", PREDICT, "digits", None),
    ("/v2/models/digits/infer", "/v2/models/{name}/infer", V2, "digits", None),
    ("/v2/models/all-MiniLM-L6-v2/versions/1/infer", "/v2/models/{name}/versions/{model_version}/infer", V2,
     "all-MiniLM-L6-v2", "1"),
    ("/v2/models/versions/versions/infer/infer", "/v2/models/{name}/versions/{model_version}/infer", V2,
     "versions", "infer"),
])
def test_inference_paths_match_their_route_with_name_and_version(path, template, wire, name, version):
    match = match_inference(path)
    assert match is not None
    assert match.route.path == template  # what MetricsMiddleware labels the request with
    assert match.route.wire is wire and (match.name, match.version) == (name, version)


@pytest.mark.parametrize("path", [
    "", "/", "predict", "/predict/", "//predict", "/predict/x", "/Predict", "/v2", "/v2/models/digits",
    "/v2/models//infer", "/v2/models/digits/infer/", "/v2/models/digits/ready", "/v2/models/digits/versions/1",
    "/v2/models/digits/versions//infer", "/v2/models/digits/versions/1/infer/x", "/v2/models/a/b/infer",
    "/v1/models/digits/infer", "/v2/model/digits/infer", "/metrics",
])
def test_other_paths_do_not_match(path):
    assert match_inference(path) is None


def test_the_route_table_declares_each_route_once_with_its_parameters():
    paths = [route.path for route in INFERENCE_ROUTES]
    assert len(set(paths)) == len(paths) == 5
    assert {route.path: route.params for route in INFERENCE_ROUTES} == {
        "/predict": (), "/v2/models/{name}/predict": ("name",), "/v2/models/{name}/infer": ("name",),
        "/v2/models/{name}/versions/{model_version}/infer": ("name", "model_version"), "/v1/embeddings": ()}


def test_the_fastapi_routes_are_the_table_rows():
    from fastapi import FastAPI

    from kiln.serve.metrics import Metrics
    from kiln.serve.routes import Endpoint, Inference, add_routes

    model = _served("classification")
    app = FastAPI()
    add_routes(app, Inference({model.name: Endpoint(model, None)}), Metrics(), "0.0.0")  # type: ignore[arg-type]
    posts = {route.path: route.name for route in app.routes if "POST" in getattr(route, "methods", ())}
    assert posts == {**{route.path: route.endpoint for route in INFERENCE_ROUTES},
                     "/v2/repository/index": "repository_index",  # the POSTs that do not run a model
                     "/v2/repository/models/{name}/load": "repository_load",
                     "/v2/repository/models/{name}/unload": "repository_unload"}
    operations = app.openapi()["paths"]
    params = operations["/v2/models/{name}/versions/{model_version}/infer"]["post"]["parameters"]
    assert [(p["name"], p["in"], p["schema"]["type"]) for p in params] == [
        ("name", "path", "string"), ("model_version", "path", "string")]
    assert operations["/predict"]["post"]["operationId"] == "predict_predict_post"


# --- per-kind response shaping -------------------------------------------------------------------------------------

def _served(task: str, outputs: tuple[TensorSpec, ...] = (TensorSpec("logits", "float32", ("batch", 4)),)):
    return ServedModel(name="m", task=task, text=False, max_items=8, signature=Signature(
        inputs=(TensorSpec("x", "float32", ("batch", 2)),), outputs=outputs))


def _request(single: bool, count: int) -> InferenceRequest:
    return InferenceRequest({"x": np.zeros((count, 2), np.float32)}, None, count, single)


def test_the_model_kind_is_looked_up_by_task():
    assert isinstance(kind_for("classification"), Classification) and isinstance(kind_for("embedding"), Embedding)
    assert kind_for("detection") is TENSORS and kind_for("") is TENSORS
    assert set(KINDS) == {"classification", "embedding"}
    assert _served("classification").kind is KINDS["classification"] and _served("other").kind is TENSORS


def test_classification_answers_the_argmax_and_softmax_probabilities():
    model = _served("classification")
    logits = np.array([[1.0, 3.0, 2.0, -1.0], [500.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    batch = predict_response(model, {"logits": logits}, _request(False, 3))
    assert list(batch) == ["predictions"] and len(batch["predictions"]) == 3
    assert [p["class"] for p in batch["predictions"]] == [1, 0, 0]
    for p in batch["predictions"]:
        assert p["probabilities"].dtype == np.float32 and p["probabilities"].shape == (4,)
        assert float(p["probabilities"].sum()) == pytest.approx(1.0, abs=1e-6)
        assert np.all(np.isfinite(p["probabilities"]))  # large logits do not overflow
    expected = np.exp(logits[0] - logits[0].max()) / np.exp(logits[0] - logits[0].max()).sum()
    np.testing.assert_allclose(batch["predictions"][0]["probabilities"], expected, rtol=1e-6)
    single = predict_response(model, {"logits": logits[:1]}, _request(True, 1))
    assert set(single) == {"class", "probabilities"} and single["class"] == 1
    np.testing.assert_array_equal(single["probabilities"], batch["predictions"][0]["probabilities"])
    np.testing.assert_allclose(softmax(logits).sum(1), 1.0, rtol=1e-6)


def test_embedding_answers_one_vector_or_a_matrix():
    model = _served("embedding", (TensorSpec("embedding", "float32", ("batch", 3)),))
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    batch = predict_response(model, {"embedding": emb}, _request(False, 2))
    assert list(batch) == ["embeddings"] and batch["embeddings"].shape == (2, 3)
    single = predict_response(model, {"embedding": emb[:1]}, _request(True, 1))
    assert list(single) == ["embedding"] and single["embedding"].shape == (3,)
    assert single["embedding"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(single["embedding"], emb[0])


def test_other_tasks_answer_their_raw_output_tensors():
    model = _served("detection", (TensorSpec("boxes", "float32", ("batch", 4)), TensorSpec("n", "int64", ("batch",))))
    outputs = {"boxes": np.ones((2, 4), np.float32), "n": np.array([3, 1])}
    batch = predict_response(model, outputs, _request(False, 2))
    assert list(batch) == ["outputs"] and batch["outputs"]["boxes"].shape == (2, 4)
    np.testing.assert_array_equal(batch["outputs"]["n"], [3, 1])
    single = predict_response(model, {k: v[:1] for k, v in outputs.items()}, _request(True, 1))
    assert set(single) == {"boxes", "n"} and single["boxes"].shape == (4,) and single["n"] == 3


def test_the_fast_path_and_the_fastapi_routes_answer_alike():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from kiln.serve.metrics import Metrics
    from kiln.serve.routes import Endpoint, Inference, InferenceFastPath, add_routes

    class Gateway:  # answers every request with fixed logits, as a worker would
        async def submit(self, item):
            logits = np.tile(np.array([[0.0, 2.0, 1.0, 0.0]], np.float32), (item.count, 1))
            return Result({"logits": logits}, 0.0, 0.0, 1, item.count, "0-1")

        def ready(self):
            return True

    model = _served("classification")
    inference = Inference({model.name: Endpoint(model, Gateway())})  # type: ignore[arg-type]
    plain = FastAPI()
    add_routes(plain, inference, Metrics(), "0.0.0")
    fast = FastAPI()
    add_routes(fast, inference, Metrics(), "0.0.0")
    fast.add_middleware(InferenceFastPath, inference=inference)
    v2 = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    cases = [("/predict", {"x": [1, 2]}), ("/predict", {"inputs": {"x": [[1, 2], [3, 4]]}}),
             ("/predict", {"y": 1}), ("/v2/models/m/infer", v2), ("/v2/models/m/versions/1/infer", v2),
             ("/v2/models/other/infer", v2), ("/v2/models/m/versions/2/infer", v2), ("/v2/models/m/predict", {"x": [1, 2]}),
             ("/v2/models/other/predict", {"x": [1, 2]})]
    with TestClient(plain) as a, TestClient(fast) as b:
        for path, body in cases:
            one, two = a.post(path, json=body), b.post(path, json=body)
            assert (one.status_code, one.json()) == (two.status_code, two.json()), path
        assert a.post("/predict", json={"x": [1, 2]}).json()["class"] == 1
        assert a.post("/v2/models/other/infer", json=v2).status_code == 404
