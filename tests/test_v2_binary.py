"""The V2 binary tensor extension: the pure parts (framing, sizes, BYTES elements, answers read back by
tritonclient's own parser), then real servers with tritonclient.http at its defaults and malformed bodies."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

import kiln
from kiln.core.signature import Signature, TensorSpec
from kiln.serve.protocol import RequestError, ServedModel, parse_v2, v2_response
from kiln.serve.routes import decode_v2_body
from kiln.serve.v2_binary import encode_response, read_strings, tensor_bytes

IMAGE_MODEL = ServedModel(name="digits", task="classification", text=False, max_items=64, signature=Signature(
    inputs=(TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", ("batch", 10)),)))
TEXT_MODEL = ServedModel(name="minilm", task="embedding", text=True, max_items=64, signature=Signature(
    inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
    outputs=(TensorSpec("sentence_embedding", "float32", ("batch", 384)),)))


def strings(*texts: str | bytes) -> bytes:
    out = b""
    for text in texts:
        raw = text if isinstance(text, bytes) else text.encode()
        out += struct.pack("<I", len(raw)) + raw
    return out


def binary_request(tensors: list[tuple[dict, bytes]], **extra) -> tuple[bytes, str]:
    """A body in the extension: the JSON header (inputs with binary_data_size) and the bytes, and the header's
    length as the HTTP header carries it."""
    inputs = [{**meta, "parameters": {"binary_data_size": len(data)}} for meta, data in tensors]
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + b"".join(data for _, data in tensors), str(len(header))


def parse(body: bytes, length: str | None, model: ServedModel = IMAGE_MODEL):
    """The server's own path: decode (serve.routes), then parse."""
    headers = {"content-type": "application/json"}
    if length is not None:
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": length}
    decoded, section = decode_v2_body(headers, body, None)
    return parse_v2(decoded, model, section)


# --- pure parts ----------------------------------------------------------------------------------------------------


def test_a_binary_image_request_parses_to_the_same_array_as_json():
    images = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    body, length = binary_request([({"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32"}, images.tobytes())])
    parsed = parse(body, length)
    as_json = parse_v2({"inputs": [{"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32",
                                    "data": images.reshape(-1).tolist()}]}, IMAGE_MODEL)
    assert parsed.count == 3 and parsed.arrays["image"].dtype == np.float32
    np.testing.assert_array_equal(parsed.arrays["image"], as_json.arrays["image"])
    assert parsed.binary_outputs == frozenset()


def test_binary_texts_parse_with_their_length_prefixes():
    texts = ["a sentence", "", "中文 🙂", "x" * 300]
    body, length = binary_request([({"name": "text", "shape": [4], "datatype": "BYTES"}, strings(*texts))])
    assert parse(body, length, TEXT_MODEL).texts == texts


@pytest.mark.parametrize("flags,binary", [
    ({"parameters": {"binary_data_output": True}}, {"logits"}),
    ({"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, {"logits"}),
    ({"outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
      "parameters": {"binary_data_output": True}}, set()),
    ({"outputs": [{"name": "logits"}], "parameters": {"binary_data_output": True}}, {"logits"}),
    ({"outputs": [{"name": "logits"}]}, set()),
    ({}, set()),
])
def test_which_outputs_are_answered_binary(flags, binary):
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}], **flags}
    assert parse_v2(body, IMAGE_MODEL).binary_outputs == binary


HEADER = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 256}}]}).encode()
GOOD = HEADER + bytes(256)


def _with_size(size) -> bytes:
    header = HEADER.replace(b'"binary_data_size": 256', b'"binary_data_size": ' + json.dumps(size).encode())
    return header + bytes(256), str(len(header))


MALFORMED = [
    # (case, body, Inference-Header-Content-Length, words the error must contain)
    ("header length past the body", GOOD, str(len(GOOD) + 1), "only"),
    ("header length negative", GOOD, "-1", "non-negative integer"),
    ("header length not a number", GOOD, "12abc", "non-negative integer"),
    ("header length empty", GOOD, "", "non-negative integer"),
    ("header length in exponent form", GOOD, "1e3", "non-negative integer"),
    ("header length zero", GOOD, "0", "missing"),
    ("header length cuts the JSON", GOOD, str(len(HEADER) - 1), "not valid JSON"),
    ("header length takes a tensor byte", GOOD, str(len(HEADER) + 1), "not valid JSON"),
    ("data one byte short", HEADER + bytes(255), str(len(HEADER)), "only 255 bytes"),
    ("data one byte long", GOOD + b"\x00", str(len(HEADER)), "1 bytes after"),
    ("size negative", *_with_size(-4), "negative"),
    ("size huge", *_with_size(2**62), "only 256 bytes"),
    ("size past uint64", *_with_size(2**70), "integer"),  # orjson reads it as a float
    ("size a float", *_with_size(256.0), "integer"),
    ("size a string", *_with_size("256"), "integer"),
    ("size a boolean", *_with_size(True), "integer"),
    ("size disagrees with the shape", HEADER.replace(b"[1, 1, 8, 8]", b"[2, 1, 8, 8]") + bytes(256),
     str(len(HEADER)), "needs 512"),
    ("both data and a size", HEADER.replace(b'"parameters"', b'"data": [0], "parameters"') + bytes(256),
     str(len(HEADER) + len(b'"data": [0], ')), "both"),
    ("a size without the HTTP header", HEADER, None, "no binary section"),
    ("no HTTP header and bytes after the JSON", GOOD, None, "not valid JSON"),
]


@pytest.mark.parametrize("case,body,length,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_binary_bodies_are_refused_with_the_reason(case, body, length, words):
    with pytest.raises(RequestError) as raised:
        parse(body, length)
    assert raised.value.status == 400, raised.value
    assert words in str(raised.value), str(raised.value)


@pytest.mark.parametrize("case,data,words", [
    ("length past the end", struct.pack("<I", 100) + b"short", "says it has 100 bytes"),
    ("length 4 GiB", struct.pack("<I", 2**32 - 1) + b"x", "says it has 4294967295"),
    ("half a length", b"\x05\x00", "ends before element 0"),
    ("fewer elements than the shape", strings("one"), "ends before element 1"),
    ("bytes after the elements", strings("one", "two") + b"!", "1 bytes are left"),
    ("invalid UTF-8", strings(b"\xff\xfe"), "not valid UTF-8"),
])
def test_bytes_elements_that_lie_about_their_length_are_refused(case, data, words):
    with pytest.raises(RequestError) as raised:
        read_strings(memoryview(data), 2, "input 'text'", None)
    assert raised.value.status == 400 and words in str(raised.value)


def test_nan_in_binary_floats_is_refused_like_json():
    images = np.zeros((1, 1, 8, 8), np.float32)
    images[0, 0, 3, 3] = np.nan
    body, length = binary_request([({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32"}, images.tobytes())])
    with pytest.raises(RequestError, match="NaN"):
        parse(body, length)


def test_binary_answers_read_back_with_tritonclients_own_parser():
    from tritonclient.http import InferResult

    logits = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
    parsed = parse_v2({"inputs": [{"name": "image", "shape": [5, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 320}],
                       "parameters": {"binary_data_output": True}}, IMAGE_MODEL)
    payload, header_length = encode_response(v2_response(IMAGE_MODEL, {"logits": logits}, parsed),
                                             parsed.binary_outputs)
    result = InferResult.from_response_body(payload, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert "data" not in result.get_output("logits")


@pytest.mark.parametrize("datatype,values", [
    ("FP32", np.array([[1.5, -2.0]], np.float32)), ("FP16", np.array([0.5, 2.0], np.float16)),
    ("INT64", np.array([[2**40, -3]], np.int64)), ("INT32", np.array([7, -7], np.int32)),
    ("BOOL", np.array([True, False])), ("BF16", np.array([1.0, -2.5, 3.0], np.float32)),
    ("BYTES", np.array(["label", "中文", ""], dtype=object)),
])
def test_every_datatype_kiln_serves_encodes_as_tritonclient_decodes(datatype, values):
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    raw = tensor_bytes(datatype, values)
    if datatype == "BYTES":
        assert [v.decode() for v in deserialize_bytes_tensor(raw)] == list(values)
    else:  # BF16: tritonclient reads ml_dtypes.bfloat16
        decoded = np.frombuffer(raw, triton_to_np_dtype(datatype)).reshape(values.shape)
        np.testing.assert_array_equal(decoded.astype(values.dtype), values)


def test_bf16_answers_round_to_nearest_as_ml_dtypes_does():
    import ml_dtypes

    values = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    expected = values.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.frombuffer(tensor_bytes("BF16", values), ml_dtypes.bfloat16), expected)


# --- real servers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_images():
    from kiln.models.digits import splits

    return splits()[1].inputs["image"][:32]


@pytest.mark.slow
def test_tritonclient_with_all_its_defaults_round_trips_digits(digits_server, digits_artifacts, digits_images):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=digits_server.url.removeprefix("http://"))
    tensor = triton.InferInput("image", list(digits_images.shape), "FP32")
    tensor.set_data_from_numpy(digits_images)  # binary_data=True: the default
    binary = client.infer("digits", [tensor])  # no outputs named: binary_data_output
    assert binary.get_output("logits")["parameters"]["binary_data_size"] == 32 * 10 * 4
    as_json = triton.InferInput("image", list(digits_images.shape), "FP32")
    as_json.set_data_from_numpy(digits_images, binary_data=False)
    json_answer = client.infer("digits", [as_json], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
    np.testing.assert_array_equal(binary.as_numpy("logits"), json_answer.as_numpy("logits"))
    expected = kiln.load(digits_artifacts, threads=1).run({"image": digits_images})["logits"]
    np.testing.assert_allclose(binary.as_numpy("logits"), expected, atol=1e-4)
    # Binary in, JSON out and JSON in, binary out.
    mixed = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
    np.testing.assert_array_equal(mixed.as_numpy("logits"), binary.as_numpy("logits"))
    mixed = client.infer("digits", [as_json], outputs=[triton.InferRequestedOutput("logits")])
    np.testing.assert_array_equal(mixed.as_numpy("logits"), binary.as_numpy("logits"))
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.slow
def test_tritonclient_with_all_its_defaults_round_trips_minilm_texts(minilm_server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=minilm_server.url.removeprefix("http://"))
    texts = np.array(["The cat sat on the mat.", "中文测试 🙂", "", "Interest rates rose again."], dtype=object)
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts)  # binary: each element with its 4-byte length
    binary = client.infer("minilm", [tensor]).as_numpy("sentence_embedding")
    as_json = triton.InferInput("text", [len(texts)], "BYTES")
    as_json.set_data_from_numpy(texts, binary_data=False)
    answer = client.infer("minilm", [as_json], outputs=[triton.InferRequestedOutput("sentence_embedding",
                                                                                  binary_data=False)])
    assert binary.shape == (4, 384)
    np.testing.assert_allclose(binary, answer.as_numpy("sentence_embedding"), atol=1e-6)
    predict = httpx.post(f"{minilm_server.url}/predict", json={"texts": list(texts)}, timeout=30).json()
    np.testing.assert_allclose(binary, np.array(predict["embeddings"], np.float32), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case,body,length,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_binary_bodies_get_a_json_400_and_the_server_stays_ready(digits_server, case, body, length, words):
    headers = {"content-type": "application/json"}
    if length is not None:
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": length}
    answer = httpx.post(f"{digits_server.url}/v2/models/digits/infer", content=body, headers=headers, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert words in answer.json()["error"], answer.json()
    assert httpx.get(f"{digits_server.url}/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_compressed_bodies_as_tritonclient_sends_them(digits_server, digits_images):
    import gzip

    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=digits_server.url.removeprefix("http://"))
    tensor = triton.InferInput("image", list(digits_images.shape), "FP32")
    tensor.set_data_from_numpy(digits_images)
    plain = client.infer("digits", [tensor]).as_numpy("logits")
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("digits", [tensor], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(packed.as_numpy("logits"), plain)
    bomb = gzip.compress(GOOD[:len(HEADER)] + bytes(64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KB
    answer = httpx.post(f"{digits_server.url}/v2/models/digits/infer", content=bomb, timeout=30,
                        headers={"inference-header-content-length": str(len(HEADER)), "content-encoding": "gzip"})
    assert answer.status_code == 413 and "inflates past" in answer.json()["error"]
    assert httpx.get(f"{digits_server.url}/v2/health/ready").status_code == 200


def test_decompression_is_bounded_and_checked():
    import gzip
    import zlib

    from kiln.serve.routes import decompress

    assert decompress(gzip.compress(b"abc"), "gzip", 10, None) == b"abc"
    assert decompress(zlib.compress(b"abc"), "Deflate", 10, None) == b"abc"
    assert decompress(b"abc", "identity", 10, None) == b"abc"
    cases = [(gzip.compress(bytes(11)), "gzip", 413, "inflates past the 10-byte limit"),
             (gzip.compress(b"abc")[:-6], "gzip", 400, "cut short"),
             (b"not gzip at all", "gzip", 400, "not valid gzip data"),
             (b"abc", "br", 415, "not supported")]
    for raw, encoding, status, words in cases:
        with pytest.raises(RequestError) as raised:
            decompress(raw, encoding, 10, None)
        assert raised.value.status == status and words in str(raised.value), (encoding, raised.value)


@pytest.mark.parametrize("protocol", ["v2", "v2-binary"])
def test_loadtest_requests_of_many_items_parse_on_the_server_as_sent(protocol):
    from kiln.bench.loadtest import group_items, request_body

    metadata = {"name": "digits", "inputs": IMAGE_MODEL.v2_inputs}
    items = [{"image": np.full((1, 1, 8, 8), i, np.float32)} for i in range(5)]
    groups = group_items(items, 32)
    path, body, headers = request_body(protocol, metadata, groups[1])
    decoded, section = decode_v2_body({k.lower(): v for k, v in headers.items()}, body, None)
    parsed = parse_v2(decoded, IMAGE_MODEL, section)
    assert path == "/v2/models/digits/infer" and parsed.count == 32
    assert parsed.arrays["image"][:, 0, 0, 0].tolist() == [(1 + i) % 5 for i in range(32)]
    assert parsed.binary_outputs == (frozenset({"logits"}) if protocol == "v2-binary" else frozenset())
    texts = group_items(["a", "中文 🙂", "c"], 4)[2]
    path, body, headers = request_body(protocol, {"name": "minilm", "inputs": TEXT_MODEL.v2_inputs}, texts)
    decoded, section = decode_v2_body({k.lower(): v for k, v in headers.items()}, body, None)
    assert parse_v2(decoded, TEXT_MODEL, section).texts == ["c", "a", "中文 🙂", "c"]
