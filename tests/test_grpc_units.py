"""The gRPC front end's pure parts: the service kiln serves (tritonclient's generated messages), the RPC table,
proto -> V2 request conversion."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.core.signature import Signature, TensorSpec
from kiln.serve.protocol import RequestError, ServedModel

# The Open Inference Protocol's RPCs and Triton's model repository RPCs, as their spec and tritonclient call them.
OIP_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
REPOSITORY_RPCS = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")


def test_the_service_kiln_serves_has_the_specifications_rpcs_at_its_paths():
    """The messages are tritonclient's (Triton's generated grpc_service.proto): the service descriptor kiln builds its
    handler table from names every RPC a stock client calls, with the request and response messages the spec gives,
    and a client's method path (/inference.GRPCInferenceService/ModelInfer) is the one kiln registers."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from kiln.serve import grpc_server

    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == grpc_server.SERVICE == "inference.GRPCInferenceService"
    methods = {method.name: method for method in service.methods}
    for name in OIP_RPCS + REPOSITORY_RPCS:
        method = methods[name]
        assert (method.input_type.full_name, method.output_type.full_name) == (f"inference.{name}Request",
                                                                                f"inference.{name}Response")
        assert not (method.client_streaming or method.server_streaming), name
    # The stub a stock client uses calls exactly these paths.
    import grpc

    channel = grpc.insecure_channel("127.0.0.1:1")  # never connected: the stub only records the paths
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name in OIP_RPCS + REPOSITORY_RPCS:
            assert getattr(stub, name)._method == f"/{grpc_server.SERVICE}/{name}".encode()
    finally:
        channel.close()


def test_every_rpc_has_a_handler_and_only_kilns_are_implemented():
    import grpc

    from kiln.serve import grpc_server

    servicer = grpc_server.InferenceServicer(grpc_server.InferenceService({}), "0")
    handlers = servicer.handlers()
    assert set(OIP_RPCS + REPOSITORY_RPCS) == set(grpc_server.IMPLEMENTED) <= set(handlers)
    for name in grpc_server.IMPLEMENTED:
        assert callable(getattr(servicer, name)), name
    # Triton's extensions kiln lacks are registered too, to answer UNIMPLEMENTED with a reason.
    assert {"ModelStatistics", "ModelConfig", "ModelStreamInfer", "SystemSharedMemoryRegister", "TraceSetting",
            "LogSettings"} <= set(handlers)
    assert handlers["ModelStreamInfer"].request_streaming and handlers["ModelStreamInfer"].response_streaming
    assert not handlers["ModelInfer"].request_streaming
    refusal = grpc_server.unimplemented("ModelStatistics")
    assert refusal.status == 501 and "inference.GRPCInferenceService/ModelStatistics" in str(refusal)
    assert grpc_server.STATUS_CODES[501] == grpc.StatusCode.UNIMPLEMENTED
    assert grpc_server.STATUS_CODES[429] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_server.STATUS_CODES[503] == grpc.StatusCode.UNAVAILABLE


def _model(text: bool = False) -> ServedModel:
    if text:
        return ServedModel(name="t", task="embedding", text=True, max_items=8, signature=Signature(
            inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
            outputs=(TensorSpec("e", "float32", ("batch", 4)),)))
    return ServedModel(name="m", task="classification", text=False, max_items=8, signature=Signature(
        inputs=(TensorSpec("x", "float32", ("batch", 2)), TensorSpec("ids", "int64", ("batch", 2))),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),)))


def test_raw_and_typed_contents_parse_to_the_same_request():
    from tritonclient.grpc import service_pb2 as pb

    from kiln.serve.grpc_server import parse_infer

    x = np.array([[0.5, -1.0], [2.0, 3.25]], np.float32)
    ids = np.array([[1, 2], [3, 4]], np.int64)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed.inputs.add(name="ids", datatype="INT64", shape=[2, 2]).contents.int64_contents.extend(ids.reshape(-1).tolist())
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    raw.inputs.add(name="ids", datatype="INT64", shape=[2, 2])
    raw.raw_input_contents.extend([x.tobytes(), ids.astype("<i8").tobytes()])
    for request in (typed, raw):
        parsed = parse_infer(request, _model())
        assert parsed.count == 2
        np.testing.assert_array_equal(parsed.arrays["x"], x)
        np.testing.assert_array_equal(parsed.arrays["ids"], ids)

    texts = pb.ModelInferRequest(model_name="t")
    texts.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"a b", "ü".encode()])
    raw_texts = pb.ModelInferRequest(model_name="t")
    raw_texts.inputs.add(name="text", datatype="BYTES", shape=[2])
    raw_texts.raw_input_contents.append(b"\x03\x00\x00\x00a b\x02\x00\x00\x00" + "ü".encode())
    assert parse_infer(texts, _model(True)).texts == parse_infer(raw_texts, _model(True)).texts == ["a b", "ü"]


@pytest.mark.parametrize("mutate,words", [
    (lambda r: r.raw_input_contents.append(b"\x00"), "raw_input_contents"),
    (lambda r: r.inputs[0].contents.int_contents.append(1), "contents.fp32_contents"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "raw_input_contents"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), "needs 6 values"),
])
def test_typed_contents_faults_are_named(mutate, words):
    from tritonclient.grpc import service_pb2 as pb

    from kiln.serve.grpc_server import parse_infer

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([0.0] * 4)
    request.inputs.add(name="ids", datatype="INT64", shape=[2, 2]).contents.int64_contents.extend([0] * 4)
    mutate(request)
    with pytest.raises(RequestError) as refused:
        parse_infer(request, _model())
    assert refused.value.status in (400, 422) and words in str(refused.value), str(refused.value)


def test_an_answer_is_raw_bytes_in_output_order():
    from kiln.serve.grpc_server import infer_response
    from kiln.serve.protocol import InferenceRequest

    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = infer_response(_model(), {"y": y}, InferenceRequest(None, None, 2, False, request_id="r"))
    assert response.id == "r" and response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3), y)
