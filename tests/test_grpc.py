"""The Open Inference Protocol over gRPC, against one real `kiln serve --grpc-port` serving digits and MiniLM.

Stock clients only: tritonclient.grpc at its defaults (raw contents) and, for typed contents, the stub generated
from Triton's own proto that tritonclient ships. Answers are compared with the same server's HTTP answers
(tritonclient.http, binary tensors), and hostile input (malformed and oversized messages, a fuzzer) must leave
the server ready, with the same processes, answering as before.
"""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess, free_port, group_pids

pytestmark = pytest.mark.slow
API_KEY = "g" * 8 + "-grpc-test-key-0123456789"
AUTH = {"authorization": f"Bearer {API_KEY}"}
TEXTS = ["The cat sat on the mat.", "Interest rates rose again this quarter.", "ünïcödé — emoji 🙂 and 中文"]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def server(digits_artifacts, minilm_artifacts, tmp_path_factory):
    """digits and MiniLM (onnx-fp32) in one server, with an API key, gRPC on its own port, and at most 2 MiniLM
    requests queued."""
    repository = tmp_path_factory.mktemp("grpc-repository")
    (repository / "digits").symlink_to(digits_artifacts)
    (repository / "minilm").symlink_to(minilm_artifacts)
    grpc_port = free_port()
    process = ServerProcess(repository, "--grpc-port", str(grpc_port), "--variant", "minilm=onnx-fp32",
                            "--max-queued-requests", "minilm=2",
                            "--threads", "1", "--api-key-env", "KILN_GRPC_TEST_KEY", "--max-body-bytes",
                            str(MAX_BODY), env={"KILN_GRPC_TEST_KEY": API_KEY})
    try:
        process.wait_ready(180)
        process.grpc_url = f"127.0.0.1:{grpc_port}"
        process.pids = sorted(group_pids(process.proc.pid))
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def digits_images():
    from kiln.models.digits import splits

    _, test = splits()
    return np.ascontiguousarray(test.inputs["image"][:32])


def grpc_client(server):
    import tritonclient.grpc as tg

    return tg.InferenceServerClient(server.grpc_url)


def http_client(server):
    import tritonclient.http as th

    return th.InferenceServerClient(server.url.removeprefix("http://"))


def http_infer(server, model: str, name: str, array: np.ndarray, datatype: str, output: str) -> np.ndarray:
    import tritonclient.http as th

    tensor = th.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    result = http_client(server).infer(model, [tensor], headers=dict(AUTH),
                                       outputs=[th.InferRequestedOutput(output, binary_data=True)])
    return result.as_numpy(output)


def grpc_infer(server, model: str, name: str, array: np.ndarray, datatype: str, output: str, **kwargs):
    import tritonclient.grpc as tg

    tensor = tg.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return grpc_client(server).infer(model, [tensor], headers=kwargs.pop("headers", dict(AUTH)), **kwargs)


def typed_stub(server):
    """Triton's own generated stub and messages (shipped in tritonclient): typed contents, raw bytes."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel), service_pb2


def raw_call(server, method: str, payload: bytes, metadata=tuple(AUTH.items()), timeout: float = 10):
    """Sends `payload` as the request bytes of `method`, as any client could: (code, details, trailing)."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=None,
                                   response_deserializer=None)
        try:
            call(payload, metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, "", ()
        except grpc.RpcError as error:
            return error.code(), error.details(), error.trailing_metadata()


def still_serving(server, digits_images, expected) -> None:
    """Ready over both transports, no process replaced, and the same answer as before."""
    assert grpc_client(server).is_server_ready()
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert sorted(group_pids(server.proc.pid)) == server.pids, "a process was restarted"
    again = grpc_infer(server, "digits", "image", digits_images, "FP32", "logits").as_numpy("logits")
    np.testing.assert_array_equal(again, expected)


# ------------------------------------------------------------------------------------------------ answers


def test_digits_answers_equal_http_and_the_runtime(server, digits_artifacts, digits_images):
    import kiln

    result = grpc_infer(server, "digits", "image", digits_images, "FP32", "logits", request_id="r32")
    response = result.get_response()
    assert response.model_name == "digits" and response.model_version == "1" and response.id == "r32"
    assert len(response.raw_output_contents) == 1  # Triton's shape of answer: raw bytes, not typed contents
    logits = result.as_numpy("logits")
    assert logits.shape == (32, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, http_infer(server, "digits", "image", digits_images, "FP32", "logits"))
    expected = kiln.load(digits_artifacts, threads=1).run({"image": digits_images})["logits"]
    np.testing.assert_allclose(logits, expected, atol=1e-4)

    channel, stub, pb = typed_stub(server)  # typed contents (fp32_contents) give the same answer
    with channel:
        request = pb.ModelInferRequest(model_name="digits")
        tensor = request.inputs.add(name="image", datatype="FP32", shape=list(digits_images.shape))
        tensor.contents.fp32_contents.extend(digits_images.reshape(-1).tolist())
        answer = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    typed = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(32, 10)
    np.testing.assert_array_equal(typed, logits)


def test_minilm_bytes_answers_equal_http(server):
    texts = np.array([t.encode() for t in TEXTS], dtype=object)
    result = grpc_infer(server, "minilm", "text", texts, "BYTES", "sentence_embedding")
    embeddings = result.as_numpy("sentence_embedding")
    assert embeddings.shape == (3, 384)
    np.testing.assert_array_equal(embeddings, http_infer(server, "minilm", "text", texts, "BYTES",
                                                         "sentence_embedding"))
    channel, stub, pb = typed_stub(server)  # BYTES as typed bytes_contents
    with channel:
        request = pb.ModelInferRequest(model_name="minilm")
        request.inputs.add(name="text", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(list(texts))
        request.outputs.add(name="sentence_embedding")
        answer = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert [o.name for o in answer.outputs] == ["sentence_embedding"] and list(answer.outputs[0].shape) == [3, 384]
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(3, 384), embeddings)


def test_metadata_readiness_and_index(server):
    client = grpc_client(server)
    assert client.is_server_live() and client.is_server_ready()  # open: no key needed
    assert client.is_model_ready("digits") and client.is_model_ready("minilm")
    meta = client.get_server_metadata(headers=dict(AUTH))
    assert meta.name == "kiln" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata("minilm", headers=dict(AUTH))
    assert model.name == "minilm" and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("text", "BYTES", [-1])]
    digits = client.get_model_metadata("digits", headers=dict(AUTH), as_json=True)
    http_meta = httpx.get(f"{server.url}/v2/models/digits", headers=dict(AUTH)).json()
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in digits["inputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in http_meta["inputs"]]
    assert digits["platform"] == http_meta["platform"]
    index = client.get_model_repository_index(headers=dict(AUTH), as_json=True)["models"]
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == \
        [("digits", "1", "READY"), ("minilm", "1", "READY")]

    from tritonclient.utils import InferenceServerException

    client.load_model("digits", headers=dict(AUTH))  # what serves already: nothing changes (serve.control)
    assert client.is_model_ready("digits")
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("resnet", headers=dict(AUTH))
    assert refused.value.status() == "StatusCode.NOT_FOUND" and "resnet" in refused.value.message()
    for triton_only in (lambda: client.get_model_config("digits", headers=dict(AUTH)),  # Triton's extensions
                        lambda: client.get_inference_statistics(headers=dict(AUTH)),
                        lambda: client.get_system_shared_memory_status(headers=dict(AUTH))):
        with pytest.raises(InferenceServerException) as refused:
            triton_only()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED", refused.value
        assert "is not implemented by kiln" in refused.value.message() and "ModelInfer" in refused.value.message()
    with grpc.insecure_channel(server.grpc_url) as channel:  # the streaming RPC too, answered at once
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                       response_deserializer=None)
        with pytest.raises(grpc.RpcError) as streamed:
            list(stream(iter([b""]), metadata=tuple(AUTH.items()), timeout=10))
        assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "ModelStreamInfer is not implemented by kiln" in streamed.value.details()
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("resnet", headers=dict(AUTH))
    assert missing.value.status() == "StatusCode.NOT_FOUND" and "digits" in missing.value.message()


def test_auth_refused_without_the_key(server, digits_images):
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server)
    for call in (lambda: grpc_infer(server, "digits", "image", digits_images, "FP32", "logits", headers={}),
                 lambda: grpc_infer(server, "digits", "image", digits_images, "FP32", "logits",
                                    headers={"authorization": "Bearer wrong-key-0123456789"}),
                 lambda: client.get_model_metadata("digits"),
                 lambda: client.get_model_repository_index()):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED", refused.value
        assert "authorization: Bearer" in refused.value.message()
    with pytest.raises(InferenceServerException) as unknown:  # an open RPC without the key names no models
        client.is_model_ready("resnet")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "digits" not in unknown.value.message()
    metrics = httpx.get(f"{server.url}/metrics", headers=dict(AUTH)).text
    assert 'route="grpc:ModelInfer",method="CALL",status="401"' in metrics
    assert 'route="grpc:ModelInfer",method="CALL",status="200",model="digits"' in metrics


# ------------------------------------------------------------------------------------------------ refusals


def test_past_max_queued_requests_both_transports_get_429_at_once_with_retry_after(server):
    """16 requests of 32 sentences at once, half over HTTP and half over gRPC, at a model that takes 2 at a time:
    the rest are refused at once (429 / RESOURCE_EXHAUSTED) with a retry hint, and none waits for its deadline."""
    import concurrent.futures

    texts = [f"sentence {i} about queues, backpressure and when a client should come back" for i in range(32)]
    body = {"inputs": [{"name": "text", "shape": [32], "datatype": "BYTES", "data": texts}]}

    def over_http(_):
        started = time.monotonic()
        answer = httpx.post(f"{server.url}/v2/models/minilm/infer", json=body, headers=AUTH, timeout=60)
        return "http", answer.status_code, answer.headers.get("retry-after"), answer.text, time.monotonic() - started

    def over_grpc(_):
        channel, stub, pb = typed_stub(server)
        request = pb.ModelInferRequest(model_name="minilm")
        request.inputs.add(name="text", datatype="BYTES", shape=[32]).contents.bytes_contents.extend(
            [t.encode() for t in texts])
        started = time.monotonic()
        with channel:
            try:
                stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=60)
                return "grpc", 200, None, "", time.monotonic() - started
            except grpc.RpcError as error:
                hint = dict(error.trailing_metadata() or ()).get("retry-after")
                return "grpc", error.code(), hint, error.details(), time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda i: over_http(i) if i % 2 else over_grpc(i), range(16)))
    served = [o for o in outcomes if o[1] == 200]
    refused = [o for o in outcomes if o[1] in (429, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    assert served and len(served) + len(refused) == 16, outcomes
    assert {o[0] for o in refused} == {"http", "grpc"}, outcomes
    for front, _, hint, message, seconds in refused:
        assert hint is not None and int(hint) >= 1, (front, hint)
        assert "--max-queued-requests 2" in message and seconds < 5, (front, message, seconds)
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'route="grpc:ModelInfer",method="CALL",status="429",model="minilm"' in metrics


def test_malformed_and_oversized_messages_are_refused_and_the_server_stays(server, digits_images):
    expected = grpc_infer(server, "digits", "image", digits_images, "FP32", "logits").as_numpy("logits")
    code, details, _ = raw_call(server, "ModelInfer", b"\xff\xff\xff\xff\x0f garbage")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in details
    code, details, _ = raw_call(server, "ModelMetadata", b"\x0a\x05ab")  # a string field cut short
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    code, details, _ = raw_call(server, "ModelInfer", b"\x00" * (MAX_BODY + 1024))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    big = np.zeros((64, 1, 8, 8), np.float32)
    code, details, _ = raw_call(server, "ModelInfer", b"")  # an empty message: no model named
    assert code == grpc.StatusCode.NOT_FOUND and "no model named ''" in details

    from tritonclient.utils import InferenceServerException

    cases = [  # (model, input name, array, datatype, status, words in the message)
        ("digits", "image", digits_images.astype(np.float64), "FP64", "INVALID_ARGUMENT", "must be FP32"),
        ("digits", "pixels", digits_images, "FP32", "INVALID_ARGUMENT", "unknown input"),
        ("digits", "image", digits_images[:, :, :4], "FP32", "INVALID_ARGUMENT", "image"),
        ("digits", "image", np.concatenate([big, big]), "FP32", "INVALID_ARGUMENT", "64"),
        ("nosuch", "image", digits_images, "FP32", "NOT_FOUND", "no model named"),
        ("minilm", "text", np.array([b"\xff\xfe"], dtype=object), "BYTES", "INVALID_ARGUMENT", "UTF-8"),
    ]
    for model, name, array, datatype, status, words in cases:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(server, model, name, array, datatype, "logits")
        assert refused.value.status() == f"StatusCode.{status}", (model, name, refused.value)
        assert words in refused.value.message(), refused.value.message()
    channel, stub, pb = typed_stub(server)
    with channel:
        request = pb.ModelInferRequest(model_name="digits")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
        request.raw_input_contents.extend([b"\x00" * 256, b"\x00" * 4])
        with pytest.raises(grpc.RpcError) as counted:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert counted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 inputs but 2 raw_input_contents" in counted.value.details()
    still_serving(server, digits_images, expected)


def _messages():
    """ModelInferRequests shaped like real ones, nearly right and wrong, serialized (tritonclient's own proto)."""
    from tritonclient.grpc import service_pb2 as pb

    datatypes = st.sampled_from(["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES",
                                 "", "fp32", "STRING"])
    dims = st.lists(st.integers(-3, 70) | st.sampled_from([2**31, 2**62, -(2**62)]), max_size=5)

    @st.composite
    def message(draw):
        request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["digits", "minilm", "", "x", "digits\x00"])),
                                       model_version=draw(st.sampled_from(["", "", "1", "2", "latest"])),
                                       id=draw(st.text(max_size=8)))
        raw = draw(st.booleans())
        for _ in range(draw(st.integers(0, 3))):
            tensor = request.inputs.add(name=draw(st.sampled_from(["image", "text", "", "logits", "image"])),
                                        datatype=draw(datatypes), shape=draw(dims))
            if raw:
                request.raw_input_contents.append(draw(st.binary(max_size=300)))
            else:
                kind = draw(st.sampled_from(["fp32", "int", "int64", "bool", "bytes", "none", "fp64", "uint"]))
                if kind == "fp32":
                    tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
                elif kind == "fp64":
                    tensor.contents.fp64_contents.extend(draw(st.lists(st.floats(), max_size=20)))
                elif kind in ("int", "uint"):
                    getattr(tensor.contents, f"{kind}_contents").extend(
                        draw(st.lists(st.integers(0, 2**31 - 1), max_size=20)))
                elif kind == "int64":
                    tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=9)))
                elif kind == "bool":
                    tensor.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=9)))
                elif kind == "bytes":
                    tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=20), max_size=5)))
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=40)))  # one too many, or raw beside typed
        for _ in range(draw(st.integers(0, 2))):
            request.outputs.add(name=draw(st.sampled_from(["logits", "sentence_embedding", "", "nope"])))
        return request.SerializeToString()

    return message()


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(payload=_messages() | st.binary(max_size=200), method=st.sampled_from(
    ["ModelInfer"] * 8 + ["ModelMetadata", "ModelReady", "RepositoryIndex", "ServerMetadata", "RepositoryModelLoad",
                          "ModelStatistics"]))
def test_fuzz_the_grpc_surface(server, payload, method):
    code, details, _ = raw_call(server, method, payload)
    assert code in ALLOWED, f"{method} {payload[:80]!r} -> {code} {details}"
    if code != grpc.StatusCode.OK:
        assert details and "Exception" not in details, f"{method} -> {code} {details!r}"


def test_after_the_fuzzer_the_server_is_unchanged(server, digits_images):
    expected = http_infer(server, "digits", "image", digits_images, "FP32", "logits")
    still_serving(server, digits_images, expected)
    metrics = httpx.get(f"{server.url}/metrics", headers=dict(AUTH)).text
    assert 'status="500"' not in metrics, [line for line in metrics.splitlines() if 'status="500"' in line]


def test_a_taken_grpc_port_fails_the_start(digits_artifacts):
    taken = free_port()
    with grpc_blocker(taken):
        process = ServerProcess(digits_artifacts, "--grpc-port", str(taken), "--threads", "1")
        try:
            deadline = time.monotonic() + 30
            while process.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert process.proc.returncode not in (None, 0), "the server started without its gRPC port"
            assert "--grpc-port" in process.log_path.read_text()
        finally:
            process.stop()


class grpc_blocker:
    """Holds a TCP port on 127.0.0.1 for the duration of a with-block."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
