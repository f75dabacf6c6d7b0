"""Hostile and malformed input against real `kiln serve` processes on 127.0.0.1.

Property-based: hypothesis drives real HTTP requests at every route of the server's own OpenAPI schema,
with bodies shaped like V2 and /predict requests (right, nearly right and wrong), arbitrary JSON, random
bytes, random content types and random paths under /v2/models/. Hand-written: the cases a fuzzer rarely
finds (NaN and infinity literals, deep nesting, path tricks, unicode oddities, a streamed 64 MB body).

The contract, for every answer: no 5xx; every 4xx is JSON with a string "error"; and afterwards the server
is still ready, its processes are the same (no worker crashed and was restarted), and a known-good request
gets the same answer as before. Derandomized, so every run sends the same requests.
"""

from __future__ import annotations

import json
import math
import select
import socket
import struct
import time
from collections import Counter
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess, group_pids

pytestmark = pytest.mark.slow

V2_TYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL", "BYTES"]
ODD_VALUES = [float("nan"), float("inf"), -float("inf"), 1e300, -1e39, 3.5e38, 2**63, 2**64, -2**63 - 1, 10**30,
              True, False, None, "1", "", "NaN", [], {}, [1.0], {"a": 1}]
CONTENT_TYPES = ["application/json"] * 6 + [
    "application/json; charset=utf-8", "APPLICATION/JSON", "application/problem+json", "text/plain", "",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx",
    "application/octet-stream",
    "application/json; charset=utf-16", "*/*", "application/", ";"]
JUNK = st.sampled_from([None, True, 0, -1, 1.5, "", "image", "FP32", [], {}, [None], {"name": "image"}, "1,8,8"])


# ------------------------------------------------------------------------------------------------ checking


def check_answer(method: str, what: str, response: httpx.Response) -> None:
    status = response.status_code
    assert status < 500, f"{what} -> {status} {response.text[:800]}"
    if method == "HEAD":  # a HEAD answer has no body to check
        return
    if status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), \
            f"{what} -> {status} non-JSON {response.headers.get('content-type')!r}: {response.text[:300]}"
        body = response.json()
        assert isinstance(body, dict), f"{what} -> {status} {body!r}"
        if status in (404, 405) and set(body) == {"detail"}:
            # FastAPI's own answer for a path no route matches or a method the route lacks: {"detail": "Not Found"}.
            assert isinstance(body["detail"], str), f"{what} -> {status} {body!r}"
        elif "v1" in what and "embeddings" in what and status != 401 and isinstance(body.get("error"), dict):
            # The OpenAI route answers OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
            error = body["error"]
            assert isinstance(error.get("message"), str) and error["message"], f"{what} -> {status} {body!r}"
            assert error.get("type") in ("invalid_request_error", "server_error"), f"{what} -> {status} {body!r}"
        else:
            assert isinstance(body.get("error"), str) and body["error"], f"{what} -> {status} {body!r}"
    elif status == 200 and response.headers.get("content-type", "").startswith("application/json"):
        response.json()
    elif status == 200 and "inference-header-content-length" in response.headers:  # a binary V2 answer
        length = int(response.headers["inference-header-content-length"])
        header = json.loads(response.content[:length])
        sizes = [o.get("parameters", {}).get("binary_data_size", 0) for o in header["outputs"]]
        assert length + sum(sizes) == len(response.content), f"{what} -> binary sizes {sizes} do not add up"


class Client:
    """httpx against one server: every answer is checked and counted."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.sent = 0
        self.statuses: Counter = Counter()

    def send(self, method: str, path: str, content: bytes | None = None, content_type: str | None = "application/json",
             headers: dict | None = None) -> httpx.Response:
        headers = dict(headers or {})
        if content_type is not None:
            headers["content-type"] = content_type
        response = self.http.request(method, path, content=content, headers=headers)
        self.sent += 1
        self.statuses[response.status_code] += 1
        check_answer(method, f"{method} {path} {content_type!r} {(content or b'')[:300]!r}", response)
        return response

    def close(self) -> None:
        self.http.close()


def raw_request(port: int, request: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Bytes on a socket, for what httpx would normalize away (dot segments, odd targets)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def group_rss_kb(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


# ------------------------------------------------------------------------------------------------ strategies


def nest(values: list, shape: list[int]) -> list:
    """Row-major nesting of a flat list (of anything) into `shape`."""
    if len(shape) <= 1:
        return list(values)
    step = math.prod(shape[1:])
    return [nest(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def numbers(draw, count: int) -> list:
    """`count` values from a seeded generator (fast), sometimes with one odd value at a drawn place."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["pixels", "pixels", "ints", "zeros", "tiny", "large"]))
    if kind == "pixels":
        values = rng.uniform(-1, 16, count).astype(np.float32).tolist()
    elif kind == "ints":
        values = rng.integers(-100, 100, count).tolist()
    elif kind == "zeros":
        values = [0.0] * count
    elif kind == "tiny":
        values = (rng.uniform(-1, 1, count) * 1e-40).tolist()
    else:
        values = (rng.uniform(-1, 1, count) * 3e38).astype(np.float32).tolist()
    if count and draw(st.integers(0, 3)) == 0:
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from(ODD_VALUES))
    return values


@st.composite
def array_data(draw, shape: list[int], count: int | None = None) -> list:
    """Data for `shape`: flat, nested, ragged, or of the wrong length."""
    want = math.prod(shape)
    count = want if count is None else count
    values = draw(numbers(count))
    layout = draw(st.sampled_from(["flat", "nested", "nested", "ragged"]))
    if layout == "flat" or count != want or len(shape) < 2 or want == 0:
        return values
    nested = nest(values, shape)
    if layout == "ragged":
        inner = nested
        while isinstance(inner[-1], list) and inner[-1] and isinstance(inner[-1][-1], list):
            inner = inner[-1]
        if isinstance(inner[-1], list) and inner[-1]:
            inner[-1].pop()
    return nested


def valid_shape(shape) -> bool:
    return (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            and all(d >= 0 for d in shape) and math.prod(shape) <= 8192)


@st.composite
def image_tensor(draw) -> dict:
    """A V2 input tensor for digits (image FP32 [-1, 1, 8, 8]): mostly right, wrong in one or two places."""
    n = draw(st.sampled_from([1, 1, 2, 3, 0, 65]))
    shape = draw(st.sampled_from([
        [n, 1, 8, 8], [n, 1, 8, 8], [n, 1, 8, 8], [n, 64], [n, 8, 8], [1, 8, 8], [8, 8, n, 1], [n, 1, 8, 8, 1],
        [-1, 1, 8, 8], [n, -1, 8, 8], [2**31, 1, 8, 8], [2**62, 2**62, 1, 1], [2**64, 1, 8, 8], [], [0], [1] * 9,
        [n, 1, 8, 8.0], [n, True, 8, 8], [str(n), 1, 8, 8], "1,1,8,8", None, {}]))
    name = draw(st.sampled_from(["image"] * 8 + ["IMAGE", "text", "", "image\x00", "logits", 7, None]))
    datatype = draw(st.sampled_from(["FP32"] * 8 + V2_TYPES + ["fp32", "", "FLOAT", 32, None, ["FP32"]]))
    if valid_shape(shape):
        count = math.prod(shape) + draw(st.sampled_from([0] * 6 + [-1, 1, 64, -64]))
        data = draw(array_data(shape, max(count, 0)))
    else:
        data = draw(numbers(draw(st.sampled_from([64, 128, 0, 1]))))
    data = draw(st.sampled_from([data] * 8 + [None, "data", {"x": data}, [data], 5]))
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    for key in draw(st.lists(st.sampled_from(list(tensor)), max_size=2)):
        tensor.pop(key, None)
    if draw(st.integers(0, 5)) == 0:
        tensor["parameters"] = draw(st.sampled_from([{}, {"binary_data_size": 256}, None, "x"]))
    return tensor


TEXTS = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec="utf-8"), max_size=30),
    st.sampled_from([
        "", " ", "\n\t\r", "\x00", "a\x00b", "\u202eevil\u202c", "\ufeffbom", "\u200b\u200c\u200d", "e\u0301" * 300,
        "🙂" * 500, "👩‍👩‍👧‍👦", "中文测试", "Ａｂｃ", "\U0010ffff", "\ud800", "\udfff\ud800", "x" * 20_000,
        "x" * 20_001, "word " * 4000, "\u0000" * 3, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ǅ", "İ" * 1000, "\\u0000", "\r\n" * 5000]),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(1, 6000)),
)


@st.composite
def text_tensor(draw) -> dict:
    """A V2 input tensor for MiniLM (text BYTES [-1])."""
    texts = draw(st.lists(TEXTS, min_size=0, max_size=4) | st.sampled_from([[None], [1, 2], [["nested"]], ["a"] * 65]))
    shape = draw(st.sampled_from([[len(texts)]] * 6 + [[len(texts), 1], [-1], [len(texts) + 1], [], "1", [2**40]]))
    tensor = {"name": draw(st.sampled_from(["text"] * 6 + ["texts", "input_ids", ""])),
              "shape": shape, "datatype": draw(st.sampled_from(["BYTES"] * 6 + ["FP32", "STRING", "bytes"])),
              "data": draw(st.sampled_from([texts] * 6 + [texts[0] if texts else "", None, [texts]]))}
    for key in draw(st.lists(st.sampled_from(list(tensor)), max_size=1)):
        tensor.pop(key, None)
    return tensor


@st.composite
def v2_body(draw, tensor) -> dict | list:
    inputs = draw(st.lists(tensor, min_size=1, max_size=2) | st.sampled_from([[], None, {}, "image"]))
    body = {"inputs": inputs}
    outputs = draw(st.sampled_from([None] * 4 + [
        [{"name": "logits"}], [{"name": "sentence_embedding"}], [], [{"name": "nope"}], [{}], [{"name": 1}], "logits",
        {"name": "logits"}]))
    if outputs is not None:
        body["outputs"] = outputs
    request_id = draw(st.sampled_from([None] * 3 + ["r1", "", 7, ["id"]]) | st.text(max_size=20))
    if request_id is not None:
        body["id"] = request_id
    if draw(st.integers(0, 7)) == 0:
        body["parameters"] = {"extra": True}
    if draw(st.integers(0, 15)) == 0:
        return [body]
    return body


@st.composite
def image_predict_body(draw):
    """/predict for digits: one item under 'image', or a batch under 'inputs', in many wrong shapes."""
    n = draw(st.sampled_from([1, 2, 3, 0, 65]))
    form = draw(st.sampled_from(["one", "one", "batch", "batch", "both", "neither"]))
    item_shape = draw(st.sampled_from([[8, 8], [8, 8], [1, 8, 8], [64], [8, 7], [1, 1, 8, 8], [9, 8], [], [0]]))
    if form == "one":
        body = {"image": draw(array_data(item_shape)) if item_shape else draw(st.sampled_from(ODD_VALUES))}
    else:
        shape = [n, *item_shape] if form != "neither" else [n]
        batch = {"image": draw(array_data(shape))}
        if draw(st.integers(0, 4)) == 0:
            batch[draw(st.sampled_from(["x", "IMAGE", "", "image "]))] = draw(array_data([1, 1, 8, 8]))
        body = {"inputs": draw(st.sampled_from([batch] * 6 + [[batch["image"]], None, batch["image"]]))}
        if form == "both":
            body["image"] = draw(array_data([8, 8]))
        if form == "neither":
            body = {draw(st.text(max_size=8)): body["inputs"]}
    return body


@st.composite
def text_predict_body(draw):
    form = draw(st.sampled_from(["text", "text", "texts", "texts", "both", "neither"]))
    body = {}
    if form in ("text", "both"):
        body["text"] = draw(TEXTS | JUNK)
    if form in ("texts", "both"):
        body["texts"] = draw(st.lists(TEXTS, max_size=4) | JUNK | st.sampled_from([["a"] * 65, [["a"]]]))
    if form == "neither":
        body = {draw(st.text(max_size=6)): draw(TEXTS)}
    return body


WIRE_SIZES = {"FP32": 4, "FP16": 2, "BF16": 2, "INT64": 8, "INT32": 4, "BOOL": 1, "FP64": 8, "INT8": 1}


@st.composite
def binary_elements(draw, lie: bool) -> tuple[bytes, int]:
    """BYTES elements with their 4-byte lengths; where `lie`: past the end, 4 GiB, half a length, bad UTF-8, cut."""
    texts = draw(st.lists(TEXTS, min_size=1, max_size=4))
    out = b"".join(struct.pack("<I", len(raw)) + raw for raw in (t.encode("utf-8", "surrogatepass") for t in texts))
    lie = draw(st.sampled_from(["past the end", "4 GiB", "half a length", "bad utf-8", "cut"])) if lie else "none"
    if lie == "past the end":
        out += struct.pack("<I", 1000) + b"short"
    elif lie == "4 GiB":
        out = struct.pack("<I", 2**32 - 1) + out
    elif lie == "half a length":
        out += b"\x01\x00"
    elif lie == "bad utf-8":
        out += struct.pack("<I", 2) + b"\xff\xfe"
    elif lie == "cut" and out:
        out = out[:draw(st.integers(0, len(out) - 1))]
    return out, len(texts)


BINARY_FAULTS = ["shape", "datatype", "name", "bytes", "values", "size", "data too", "inputs", "flags", "outputs",
                 "trailing", "header length", "content type", "elements"]


@st.composite
def binary_v2_request(draw, kind: str) -> tuple[bytes, dict]:
    """A V2 request in the binary tensor extension, right or wrong in one place (sometimes two): the body and
    its headers."""
    faults = set(draw(st.lists(st.sampled_from(["none"] * 12 + BINARY_FAULTS), min_size=1, max_size=2)))

    def pick(fault: str, right, wrong: list):
        return draw(st.sampled_from(wrong)) if fault in faults else right

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "image":
        n = draw(st.sampled_from([1, 2, 32]))
        shape = pick("shape", [n, 1, 8, 8], [[0, 1, 8, 8], [65, 1, 8, 8], [n, 64], [n, 1, 8, 8, 1], [-1, 1, 8, 8],
                                             [2**40, 1, 8, 8], [], "1,1,8,8", [n, 1, 8, 8.0]])
        datatype = pick("datatype", "FP32", list(WIRE_SIZES) + ["BYTES", "fp32", 4])
        count = math.prod(shape) if valid_shape(shape) else 64
        data = rng.uniform(-1, 16, count).astype(np.float32)
        if count and "values" in faults:
            data[draw(st.integers(0, count - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        raw = data.tobytes()[:count * WIRE_SIZES.get(datatype, 4)] if isinstance(datatype, str) else data.tobytes()
        raw = pick("bytes", raw, [draw(st.binary(max_size=600)), raw[:-1], raw + b"\x00"])
        name = pick("name", "image", ["text", "", "IMAGE"])
    else:
        raw, count = draw(binary_elements(lie="elements" in faults))
        shape = pick("shape", [count], [[count + 1], [max(count - 1, 0)], [-1], [2**40], [count, 1], [65]])
        datatype = pick("datatype", "BYTES", ["FP32", "STRING"])
        raw = pick("bytes", raw, [raw[:-1], raw + b"\x00", draw(st.binary(max_size=100))])
        name = pick("name", "text", ["input_ids", ""])
    size = pick("size", len(raw), [len(raw) - 1, len(raw) + 1, -1, 0, 2**31, 2**63, 2**64, 1.5, "8", True, None])
    tensor = {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}
    if "data too" in faults:
        tensor["data"] = [0.0]
    body: dict = {"inputs": pick("inputs", [tensor], [[tensor, tensor], []])}
    flags = pick("flags", draw(st.sampled_from([None, {"binary_data_output": True}, {"binary_data_output": False}])),
                 [{"binary_data_output": "yes"}, "x", {"binary_data_output": 1}])
    if flags is not None:
        body["parameters"] = flags
    output = "logits" if kind == "image" else "sentence_embedding"
    outputs = pick("outputs", draw(st.sampled_from([None, [{"name": output, "parameters": {"binary_data": True}}],
                                                    [{"name": output, "parameters": {"binary_data": False}}]])),
                   [[{"name": output, "parameters": {"binary_data": 1}}], [{"name": output, "parameters": []}],
                    [{"name": "nope", "parameters": {"binary_data": True}}]])
    if outputs is not None:
        body["outputs"] = outputs
    header = json.dumps(body).encode()
    tail = raw * len(body["inputs"]) + pick("trailing", b"", [b"\x00", b"x" * 100])
    payload = header + tail
    length = pick("header length", str(len(header)), [
        str(len(header) - 1), str(len(header) + 1), str(len(payload) + 1), "-1", "0", "", "1e3", "abc", "+5",
        str(2**64), None])
    headers = {"content-type": pick("content type", draw(st.sampled_from(["application/octet-stream", "application/json",
                                                                          ""])), ["text/plain", "image/png"])}
    if length is not None:
        headers["inference-header-content-length"] = length
    return payload, headers


def fuzz_binary(client: Client, model: str, kind: str, examples: int) -> Counter:
    """Binary V2 requests; the statuses they got."""
    before = Counter(client.statuses)

    @settings(max_examples=examples, **FUZZ)
    @given(request=binary_v2_request(kind))
    def binary(request):
        payload, headers = request
        client.send("POST", f"/v2/models/{model}/infer", payload, headers.pop("content-type"), headers)

    binary()
    return Counter(client.statuses) - before


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25)


@st.composite
def encoded(draw, bodies) -> tuple[bytes | None, str | None]:
    """A body as bytes: valid JSON (NaN/Infinity literals included), truncated JSON, or random bytes."""
    body = draw(bodies)
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    mangle = draw(st.sampled_from(["none"] * 8 + ["truncate", "bytes", "empty", "whitespace", "absent", "utf16"]))
    if mangle == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif mangle == "bytes":
        raw = draw(st.binary(max_size=200))
    elif mangle == "empty":
        raw = b""
    elif mangle == "whitespace":
        raw = b" \n\t "
    elif mangle == "absent":
        raw = None
    elif mangle == "utf16":
        raw = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    content_type = draw(st.sampled_from(CONTENT_TYPES) | st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                                   max_size=30).map(str.strip) | st.none())
    return raw, content_type


def path_segment(model: str, good: str) -> st.SearchStrategy[str]:
    """A value for a path parameter: the right one mostly, otherwise odd ones (percent-encoded as a client would)."""
    return st.sampled_from([good] * 6 + [model.upper(), model + " ", "..", ".", "%2e%2e", "..%2F..", "%00", "%ff",
                                         "a" * 5000, "digits%2Finfer", "minilm", "*", "~", "0", "-1"]) \
        | st.text(max_size=30).map(lambda s: quote(s, safe="", errors="surrogatepass"))


def openapi_routes(client: Client) -> list[tuple[str, str]]:
    schema = client.http.get("/openapi.json").json()
    return sorted((method.upper(), path) for path, ops in schema["paths"].items() for method in ops)


KILN_ROUTES = {("POST", "/predict"), ("POST", "/v2/models/{name}/infer"),
               ("POST", "/v2/models/{name}/versions/{model_version}/infer"), ("GET", "/v2"),
               ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/{name}"),
               ("GET", "/v2/models/{name}/versions/{model_version}"), ("GET", "/v2/models/{name}/ready"),
               ("GET", "/metrics")}
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def fuzz_routes(client: Client, model: str, v2_bodies, predict_bodies, examples: dict[str, int]) -> None:
    """The hypothesis runs, each a set number of examples: every route in the OpenAPI schema, then the bodies."""
    routes = openapi_routes(client)
    assert set(routes) >= KILN_ROUTES, sorted(KILN_ROUTES - set(routes))

    @settings(max_examples=examples["routes"], **FUZZ)
    @given(route=st.sampled_from(routes), method=st.sampled_from(["route"] * 6 + ["GET", "POST", "PUT", "DELETE",
                                                                                 "PATCH", "OPTIONS", "HEAD"]),
           name=path_segment(model, model), version=path_segment(model, "1"), data=st.data())
    def any_route(route, method, name, version, data):
        method = route[0] if method == "route" else method
        if route[1].endswith("/unload") and name == model:  # it would unload the model the other runs need
            name = f"{model}-other"
        path = route[1].replace("{name}", name).replace("{model_version}", version)
        bodies = predict_bodies if path == "/predict" else v2_bodies if path.endswith("/infer") else JSON
        content, content_type = data.draw(encoded(bodies | JSON))
        if data.draw(st.integers(0, 5)) == 0:
            path += "?" + data.draw(st.sampled_from(["x=1", "model=../../etc/passwd", "%00", "a=" + "b" * 3000]))
        client.send(method, path, content, content_type)

    @settings(max_examples=examples["v2"], **FUZZ)
    @given(path=st.sampled_from([f"/v2/models/{model}/infer"] * 3 + [f"/v2/models/{model}/versions/1/infer"]),
           body=v2_bodies, ensure_ascii=st.booleans())
    def v2(path, body, ensure_ascii):
        client.send("POST", path, json.dumps(body, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass"))

    @settings(max_examples=examples["predict"], **FUZZ)
    @given(body=predict_bodies, ensure_ascii=st.booleans())
    def predict(body, ensure_ascii):
        client.send("POST", "/predict", json.dumps(body, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass"))

    @settings(max_examples=examples["paths"], **FUZZ)
    @given(segments=st.lists(path_segment(model, model) | st.sampled_from(["infer", "ready", "versions", "1", ""]),
                             min_size=0, max_size=5),
           method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), body=encoded(v2_bodies))
    def paths(segments, method, body):
        client.send(method, "/v2/models/" + "/".join(segments), *body)

    any_route()
    v2()
    predict()
    paths()


# ------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_known_good():
    from kiln.models.digits import splits

    images = splits()[1].inputs["image"][:4]
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.reshape(-1).tolist()}]}


def logits(client: Client, body: dict) -> np.ndarray:
    answer = client.send("POST", "/v2/models/digits/infer", json.dumps(body).encode())
    assert answer.status_code == 200, answer.text
    out = answer.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def still_serving(server: ServerProcess, client: Client, pids: set[int], known_good: dict, before: np.ndarray) -> None:
    assert client.http.get("/v2/health/ready").status_code == 200
    assert set(group_pids(server.proc.pid)) == pids, "a server process died or was restarted during the fuzzing"
    np.testing.assert_allclose(logits(client, known_good), before, rtol=1e-5, atol=1e-5)


def test_fuzz_every_route_of_the_digits_server(digits_server, digits_known_good):
    client = Client(digits_server.url)
    try:
        pids = set(group_pids(digits_server.proc.pid))
        before = logits(client, digits_known_good)
        fuzz_routes(client, "digits", v2_body(image_tensor()), image_predict_body(),
                    {"routes": 450, "v2": 600, "predict": 400, "paths": 150})
        binary = fuzz_binary(client, "digits", "image", 400)
        print(f"digits binary fuzz: statuses {dict(sorted(binary.items()))}")
        assert sum(binary.values()) == 400 and binary[200] > 20 and binary[400] > 50
        generated = client.sent
        print(f"digits fuzz: {generated} requests, statuses {dict(sorted(client.statuses.items()))}")
        assert generated >= 1000
        assert not [s for s in client.statuses if s >= 500]
        assert client.statuses[200] > 50 and client.statuses[422] > 50  # the bodies reach inference and validation
        still_serving(digits_server, client, pids, digits_known_good, before)
    finally:
        client.close()


def _v2(shape, data, datatype="FP32", name="image", **extra) -> bytes:
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


IMAGE = [0.5] * 64
INFER = "/v2/models/digits/infer"
HAND_WRITTEN = [
    # wrong and missing fields, wrong datatypes
    ("no inputs", INFER, b"{}", 422),
    ("inputs not a list", INFER, b'{"inputs": {"image": []}}', 422),
    ("tensor not an object", INFER, b'{"inputs": ["image"]}', 422),
    ("tensor lacks data", INFER, b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}', 422),
    ("name not a string", INFER, _v2([1, 1, 8, 8], IMAGE, name=["image"]), 422),
    ("unknown input", INFER, _v2([1, 1, 8, 8], IMAGE, name="picture"), 422),
    ("datatype BYTES", INFER, _v2([1, 1, 8, 8], ["a"] * 64, datatype="BYTES"), 422),
    ("datatype lower case", INFER, _v2([1, 1, 8, 8], IMAGE, datatype="fp32"), 422),
    ("datatype not a string", INFER, _v2([1, 1, 8, 8], IMAGE, datatype={"t": "FP32"}), 422),
    ("strings as data", INFER, _v2([1, 1, 8, 8], ["0.5"] * 64), 422),
    ("nulls as data", INFER, _v2([1, 1, 8, 8], [None] * 64), 422),
    ("objects as data", INFER, _v2([1, 1, 8, 8], [{}] * 64), 422),
    ("data not a list", INFER, _v2([1, 1, 8, 8], "0" * 64), 422),
    ("id not a string", INFER, _v2([1, 1, 8, 8], IMAGE, id=7), 422),
    ("outputs not a list", INFER, _v2([1, 1, 8, 8], IMAGE, outputs="logits"), 422),
    ("unknown output", INFER, _v2([1, 1, 8, 8], IMAGE, outputs=[{"name": "probs"}]), 422),
    ("input given twice", INFER,
     json.dumps({"inputs": [json.loads(_v2([1, 1, 8, 8], IMAGE))["inputs"][0]] * 2}).encode(), 422),
    # shapes that do not match the data, negative and huge dimensions
    ("shape says 2 items, data 1", INFER, _v2([2, 1, 8, 8], IMAGE), 422),
    ("data one short", INFER, _v2([1, 1, 8, 8], IMAGE[:-1]), 422),
    ("rank 3", INFER, _v2([1, 8, 8], IMAGE), 422),
    ("wrong item dims", INFER, _v2([1, 1, 4, 16], IMAGE), 422),
    ("zero items", INFER, _v2([0, 1, 8, 8], []), 422),
    ("negative dim", INFER, _v2([1, -1, 8, 8], IMAGE), 422),
    ("all dims negative", INFER, _v2([-1, -1, -8, -8], IMAGE), 422),
    ("huge dims", INFER, _v2([2**62, 2**62, 8, 8], IMAGE), 413),
    ("dims past int64", INFER, _v2([2**70, 1, 8, 8], IMAGE), 422),
    ("float dims", INFER, _v2([1.0, 1, 8, 8], IMAGE), 422),
    ("boolean dims", INFER, _v2([True, 1, 8, 8], IMAGE), 422),
    ("empty shape", INFER, _v2([], IMAGE), 422),
    ("rank 100 shape", INFER, _v2([1] * 100, IMAGE), 422),
    ("65 items", INFER, _v2([65, 1, 8, 8], IMAGE * 65), 413),
    ("ragged nested data", INFER, _v2([1, 1, 8, 8], [[[0.0] * 8] * 7 + [[0.0] * 7]]), 422),
    ("nested 50 deep", INFER, _v2([1, 1, 8, 8], json.loads("[" * 50 + "0" + "]" * 50)), 422),
    # NaN and infinities: literals, overflowing numbers, numbers past float32's range
    ("NaN literal", INFER, _v2([1, 1, 8, 8], IMAGE).replace(b"0.5", b"NaN", 1), 400),
    ("Infinity literal", INFER, _v2([1, 1, 8, 8], IMAGE).replace(b"0.5", b"-Infinity", 1), 400),
    ("1e999", INFER, _v2([1, 1, 8, 8], IMAGE).replace(b"0.5", b"1e999", 1), 400),
    ("1e300 past float32", INFER, _v2([1, 1, 8, 8], [1e300] + IMAGE[1:]), 422),
    ("-1e39 past float32", "/predict", json.dumps({"image": [[-1e39] * 8] * 8}).encode(), 422),
    ("NaN in /predict", "/predict", b'{"image": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', 400),
    # deeply nested JSON, empty and non-JSON bodies
    ("100k deep arrays", "/predict", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("100k deep objects", INFER, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400),
    ("1000 deep arrays", "/predict", b'{"image": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}", 422),
    ("80 deep in a batch", "/predict", b'{"inputs": {"image": ' + b"[" * 80 + b"0" + b"]" * 80 + b"}}", 422),
    ("empty body", INFER, b"", 400),
    ("whitespace body", "/predict", b"  \r\n ", 400),
    ("truncated JSON", INFER, _v2([1, 1, 8, 8], IMAGE)[:-3], 400),
    ("trailing garbage", "/predict", b'{"image": 1} x', 400),
    ("JSON null", INFER, b"null", 422),
    ("JSON array", INFER, b"[]", 422),
    ("JSON string", "/predict", b'"image"', 422),
    ("byte order mark", "/predict", b'\xef\xbb\xbf{"image": [[0]]}', 400),
    ("invalid UTF-8", "/predict", b'{"image": "\xff\xfe"}', 400),
    ("lone surrogate escape", "/predict", b'{"image": "\\ud800"}', 400),
    ("random bytes", INFER, bytes(range(256)), 400),
    ("big integer", "/predict", b'{"image": ' + b"9" * 5000 + b"}", 400),
    ("one long string", "/predict", json.dumps({"image": "x" * 1_000_000}).encode(), 422),
    ("100k-key object", "/predict", json.dumps({str(i): i for i in range(100_000)}).encode(), 422),
    ("duplicate keys", "/predict", b'{"image": "x", "image": [[0.0]]}', 422),
]


@pytest.mark.parametrize("case,path,body,status", HAND_WRITTEN, ids=[c[0] for c in HAND_WRITTEN])
def test_hand_written_hostile_bodies(digits_server, case, path, body, status):
    client = Client(digits_server.url)
    try:
        response = client.send("POST", path, body)
        assert response.status_code == status, response.text[:500]
        assert client.send("POST", "/predict", json.dumps({"image": [[0.0] * 8] * 8}).encode()).status_code == 200
    finally:
        client.close()


@pytest.mark.parametrize("content_type,status", [
    (None, 422), ("", 422), ("application/json; charset=utf-8", 422), ("application/vnd.api+json", 422),
    ("text/plain", 415), ("text/json", 415), ("application/x-www-form-urlencoded", 415), ("application/xml", 415),
    ("multipart/form-data; boundary=----x", 415), ("application/json-patch", 415), ("image/png", 415),
])
def test_content_types(digits_server, content_type, status):
    client = Client(digits_server.url)
    try:
        assert client.send("POST", "/predict", b"{}", content_type).status_code == status
        form = b"------x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n1\r\n------x--\r\n"
        assert client.send("POST", INFER, form, "multipart/form-data; boundary=----x").status_code == 415
    finally:
        client.close()


GOOD_V2 = _v2([1, 1, 8, 8], IMAGE)
PATH_TRICKS = [  # request targets as they go on the wire: no client normalizes them first
    (b"/v2/models/nope/infer", 404), (b"/v2/models/DIGITS/infer", 404), (b"/v2/models/digits%20/infer", 404),
    (b"/v2/models/../infer", 404), (b"/v2/models/./infer", 404), (b"/v2/models/%2e%2e/infer", 404),
    (b"/v2/models/digits/../nope/infer", 404), (b"/v2/models/nope/../digits/ready", 404),
    (b"/v2/models/..%2F..%2Fetc%2Fpasswd/infer", 404), (b"/v2/models/%00/infer", 404),
    (b"/v2/models/%ff%fe/infer", 404), (b"/v2/models/%C0%AE%C0%AE/infer", 404),
    # Repeated slashes are merged before routing and auth (as nginx's merge_slashes does): the first is then
    # /v2/models/infer (a metadata route: POST is 405), the other two are the infer route itself.
    (b"/v2/models//infer", 405), (b"/v2/models/digits//infer", 200), (b"//v2/models/digits/infer", 200),
    (b"/v2/models/digits/versions/2/infer", 404), (b"/v2/models/digits/versions/../infer", 404),
    (b"/v2/models/digits/versions/1/../../nope/infer", 404), (b"/v2/models/" + b"a" * 8000 + b"/infer", 404),
    (b"/v2/models/%F0%9F%99%82/infer", 404), (b"/v2/models/digits/infer/extra", 404),
    (b"/v2/models/digits/infer;x", 404), (b"/_kiln/worker", 404), (b"*", 404),
    # these reach the right route: an encoded slash is decoded before routing, a query or fragment is ignored
    (b"/v2/models/digits%2Finfer", 200), (b"/v2/models/digits/infer?x=1&name=nope", 200),
    (b"/v2/models/digits/versions/1/infer", 200), (b"http://127.0.0.1/v2/models/digits/infer", 200),
]


@pytest.mark.parametrize("target,status", PATH_TRICKS, ids=[t[:50].decode("latin-1") for t, _ in PATH_TRICKS])
def test_unknown_models_and_path_tricks(digits_server, target, status):
    for method in (b"POST", b"GET"):
        request = (method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(GOOD_V2)).encode() + b"\r\n\r\n" + GOOD_V2)
        got, headers, body = raw_request(digits_server.port, request)
        assert got < 500, (method, target, got, body)
        if method == b"POST":
            assert got == status, (target, got, body[:300])
        if got >= 400:
            assert headers["content-type"].startswith("application/json"), (method, target, got, body[:300])
            answer = json.loads(body)
            assert isinstance(answer.get("error"), str) or (got in (404, 405) and isinstance(answer.get("detail"), str))
    assert httpx.get(f"{digits_server.url}/v2/health/ready").status_code == 200


def _stream(port: int, head: bytes, total: int, chunked: bool) -> tuple[int, float, tuple[int, dict, bytes]]:
    """Send `total` body bytes after `head` until the server answers; returns bytes sent, seconds, answer."""
    piece = b"[" + b"0.0," * 16_383 + b"0]"  # 64 KiB of a JSON-looking body
    frame = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
    sent = 0
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        pending = b""
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break  # the answer is here: stop sending
            assert writable, "the server neither reads the body nor answers"
            if not pending:
                pending = frame
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending = pending[n:]
            sent += n
        answer = _read_answer(sock)
    return sent, time.monotonic() - start, answer


def test_a_64_mb_body_is_refused_without_being_read(digits_artifacts):
    limit = 64 * 1024
    server = ServerProcess(digits_artifacts, "--threads", "1", "--max-body-bytes", str(limit)).wait_ready()
    try:
        total = 64 * 1024 * 1024
        assert httpx.post(f"{server.url}/predict", json={"image": [[0.0] * 8] * 8}).status_code == 200  # warm
        rss_before = group_rss_kb(server.proc.pid)
        declared = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
        streamed = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        for head, chunked in ((declared, False), (streamed, True)):
            sent, seconds, (status, _headers, body) = _stream(server.port, head, total, chunked)
            print(f"64 MB body ({'chunked' if chunked else 'Content-Length'}): 413 after {sent / 1e6:.1f} MB sent, "
                  f"{seconds:.2f}s")
            assert status == 413 and "limit" in json.loads(body)["error"], (status, body)
            assert sent < total / 4, f"{sent} bytes were taken in before the 413: the body was read"
        growth_mb = (group_rss_kb(server.proc.pid) - rss_before) / 1024
        print(f"server RSS growth: {growth_mb:.1f} MB")
        assert growth_mb < 16, f"the server's processes grew {growth_mb:.1f} MB on a refused body"
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert httpx.post(f"{server.url}/predict", json={"image": [[0.0] * 8] * 8}).status_code == 200
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ MiniLM


UNICODE_ODDITIES = [
    "", " ", "\u202eevil\u202c", "\ufeffbom", "\u200b" * 100, "e\u0301" * 1000, "🙂" * 5000, "👩‍👩‍👧‍👦" * 100,
    "中文测试 日本語 한국어", "ＦＵＬＬＷＩＤＴＨ", "\U0010ffff\U000e0001", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "İstanbul ǅ ß ﬁ",
    "\u0300\u0301\u0302" * 2000, "\t\n\r\x0b\x0c", "\x7f\x1b[31m", "x" * 20_000, "word " * 4000, "\uffff\ufffe",
]


def embeddings(client: Client, texts: list[str]) -> np.ndarray:
    answer = client.send("POST", "/predict", json.dumps({"texts": texts}).encode())
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["embeddings"], dtype=np.float32)


def test_fuzz_the_minilm_server(minilm_server):
    client = Client(minilm_server.url)
    try:
        pids = set(group_pids(minilm_server.proc.pid))
        known = ["The cat sat on the mat.", "Interest rates rose again this quarter."]
        before = embeddings(client, known)
        for text in UNICODE_ODDITIES:  # each alone and all together: tokenized, never a 5xx
            assert client.send("POST", "/predict", json.dumps({"text": text}).encode()).status_code == 200, text[:40]
        assert embeddings(client, UNICODE_ODDITIES).shape == (len(UNICODE_ODDITIES), 384)
        for text, status in (("x" * 20_001, 413), ("a\x00b", 422)):
            assert client.send("POST", "/predict", json.dumps({"text": text}).encode()).status_code == status
            body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
            assert client.send("POST", "/v2/models/minilm/infer", json.dumps(body).encode()).status_code == status
        fuzz_routes(client, "minilm", v2_body(text_tensor()), text_predict_body(),
                    {"routes": 80, "v2": 100, "predict": 100, "paths": 30})
        binary = fuzz_binary(client, "minilm", "text", 150)
        print(f"minilm binary fuzz: statuses {dict(sorted(binary.items()))}")
        assert binary[200] > 10 and binary[400] > 10
        print(f"minilm fuzz: {client.sent} requests, statuses {dict(sorted(client.statuses.items()))}")
        assert client.sent >= 200 and not [s for s in client.statuses if s >= 500]
        assert client.http.get("/v2/health/ready").status_code == 200
        assert set(group_pids(minilm_server.proc.pid)) == pids, "a server process died or was restarted"
        np.testing.assert_allclose(embeddings(client, known), before, atol=1e-5)
    finally:
        client.close()
