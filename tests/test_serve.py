"""Real `kiln serve` processes on 127.0.0.1: round-trips, batching, validation, auth, metrics, shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import time

import httpx
import numpy as np
import pytest
from conftest import run_kiln
from server_process import ServerProcess

import kiln

pytestmark = pytest.mark.slow
API_KEY = "k" * 8 + "-test-key-0123456789"


@pytest.fixture(scope="module")
def digits_images():
    from kiln.models.digits import splits

    _, test = splits()
    return test.inputs["image"][:8]


def test_predict_matches_the_in_process_runtime(digits_server, digits_artifacts, digits_images):
    rt = kiln.load(digits_artifacts, threads=1)
    expected = rt.run({"image": digits_images})["logits"]
    one = httpx.post(f"{digits_server.url}/predict", json={"image": digits_images[0, 0].tolist()}).json()
    assert one["class"] == int(expected[0].argmax())
    probs = np.exp(expected[0] - expected[0].max())
    np.testing.assert_allclose(one["probabilities"], probs / probs.sum(), atol=1e-5)
    batch = httpx.post(f"{digits_server.url}/predict", json={"inputs": {"image": digits_images.tolist()}}).json()
    assert [p["class"] for p in batch["predictions"]] == expected.argmax(1).tolist()


def test_v2_infer_matches_the_in_process_runtime(digits_server, digits_artifacts, digits_images):
    rt = kiln.load(digits_artifacts, threads=1)
    expected = rt.run({"image": digits_images})["logits"]
    body = {"id": "r1", "inputs": [{"name": "image", "shape": list(digits_images.shape), "datatype": "FP32",
                                    "data": digits_images.reshape(-1).tolist()}],
            "outputs": [{"name": "logits"}]}
    answer = httpx.post(f"{digits_server.url}/v2/models/digits/infer", json=body).json()
    assert answer["id"] == "r1" and answer["model_name"] == "digits"
    out = answer["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [8, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(8, 10), expected, atol=1e-4)


def test_stock_tritonclient_works_unchanged(digits_server, digits_artifacts, digits_images):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=digits_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    tensor = triton.InferInput("image", list(digits_images.shape), "FP32")
    tensor.set_data_from_numpy(digits_images, binary_data=False)
    result = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
    expected = kiln.load(digits_artifacts, threads=1).run({"image": digits_images})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)


def test_v2_metadata_and_health(digits_server):
    assert httpx.get(f"{digits_server.url}/v2").json()["name"] == "kiln"
    assert httpx.get(f"{digits_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{digits_server.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{digits_server.url}/v2/models/digits/ready").status_code == 200
    missing = httpx.get(f"{digits_server.url}/v2/models/nope")
    assert missing.status_code == 404 and "digits" in missing.json()["error"]


GOOD = {"image": [[0.0] * 8] * 8}
BAD_CASES = [
    ("malformed json", "/predict", b"{not json", "application/json", 400),
    ("empty body", "/predict", b"", "application/json", 400),
    ("wrong content type", "/predict", b"image=1", "application/x-www-form-urlencoded", 415),
    ("not an object", "/predict", b"[1, 2]", "application/json", 422),
    ("wrong input name", "/predict", json.dumps({"picture": [[0] * 8] * 8}).encode(), "application/json", 422),
    ("wrong shape", "/predict", json.dumps({"image": [[0] * 7] * 8}).encode(), "application/json", 422),
    ("ragged", "/predict", json.dumps({"image": [[0] * 8, [0] * 7]}).encode(), "application/json", 422),
    ("booleans", "/predict", json.dumps({"image": [[True] * 8] * 8}).encode(), "application/json", 422),
    ("strings", "/predict", json.dumps({"image": [["a"] * 8] * 8}).encode(), "application/json", 422),
    ("nan", "/predict", b'{"image": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', "application/json", 400),
    ("infinity", "/predict", json.dumps({"inputs": {"image": [[[[1e999] * 8] * 8]]}}).encode(),
     "application/json", 400),
    ("too many items", "/predict", json.dumps({"inputs": {"image": [[[[0] * 8] * 8]] * 65}}).encode(),
     "application/json", 413),
    ("deep nesting", "/predict", b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),
    ("v2 wrong datatype", "/v2/models/digits/infer", json.dumps({"inputs": [
        {"name": "image", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]}).encode(),
     "application/json", 422),
    ("v2 shape/data mismatch", "/v2/models/digits/infer", json.dumps({"inputs": [
        {"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]}).encode(),
     "application/json", 422),
    ("v2 negative dim", "/v2/models/digits/infer", json.dumps({"inputs": [
        {"name": "image", "shape": [-1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]}).encode(),
     "application/json", 422),
    ("v2 missing field", "/v2/models/digits/infer", json.dumps({"inputs": [{"name": "image"}]}).encode(),
     "application/json", 422),
    ("v2 unknown model", "/v2/models/other/infer", json.dumps({"inputs": []}).encode(), "application/json", 404),
    ("v2 unknown output", "/v2/models/digits/infer", json.dumps({"inputs": [
        {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}],
        "outputs": [{"name": "probs"}]}).encode(), "application/json", 422),
]


@pytest.mark.parametrize("case,path,body,ctype,status", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gets_a_json_4xx(digits_server, case, path, body, ctype, status):
    response = httpx.post(f"{digits_server.url}{path}", content=body, headers={"content-type": ctype})
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["error"], str) and error["error"]
    if status in (413, 422):
        assert "expected" in error  # names the signature the server wanted
    assert httpx.get(f"{digits_server.url}/v2/health/ready").status_code == 200
    assert httpx.post(f"{digits_server.url}/predict", json=GOOD).status_code == 200


def test_body_over_the_limit_is_refused(digits_artifacts):
    server = ServerProcess(digits_artifacts, "--max-body-bytes", "4096").wait_ready()
    try:
        big = b'{"image": [' + b"0," * 5000 + b"0]}"
        response = httpx.post(f"{server.url}/predict", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "limit" in response.json()["error"]

        def chunks():  # no Content-Length: refused while streaming
            for _ in range(100):
                yield b" " * 1024

        response = httpx.post(f"{server.url}/predict", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert httpx.post(f"{server.url}/predict", json=GOOD).status_code == 200
    finally:
        server.stop()


def _metric(text: str, name: str, model: str = "digits") -> float:
    match = re.search(rf'^{re.escape(name)}{{model="{model}"}} ([0-9.e+-]+)$', text, re.M)
    assert match, name
    return float(match.group(1))


def test_metrics_are_prometheus_text(digits_server):
    httpx.post(f"{digits_server.url}/predict", json=GOOD)
    text = httpx.get(f"{digits_server.url}/metrics").text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.e+-]+|\+Inf$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("kiln_requests_total", "kiln_request_duration_seconds", "kiln_queue_duration_seconds",
                 "kiln_inference_duration_seconds", "kiln_batch_size"):
        assert f"# TYPE {name} " in text
    assert re.search(r'kiln_requests_total\{route="/predict",method="POST",status="200",model="digits"\} \d+', text)


def test_concurrent_requests_form_batches_and_a_lone_request_does_not_wait(digits_artifacts, digits_images):
    # A long batch window: the adaptive loop must still run a lone request at once.
    server = ServerProcess(digits_artifacts, "--max-batch-size", "32", "--max-batch-delay-ms", "1000",
                           "--threads", "1").wait_ready()
    try:
        body = {"image": digits_images[0, 0].tolist()}
        with httpx.Client() as client:
            client.post(f"{server.url}/predict", json=body)
            start = time.perf_counter()
            assert client.post(f"{server.url}/predict", json=body).status_code == 200
            lone = time.perf_counter() - start
        assert lone < 0.8, f"a lone request waited {lone:.2f}s: the batch window was not skipped"
        before = httpx.get(f"{server.url}/metrics").text
        batches_before = _metric(before, "kiln_batch_size_count")
        # 32 images a request keep the worker busy long enough (tens of ms a request) that the others queue up
        # behind it however slowly the client threads start: those must be run together, not one by one.
        heavy = {"inputs": {"image": np.repeat(digits_images[:1], 32, axis=0).tolist()}}

        def call(_):
            return httpx.post(f"{server.url}/predict", json=heavy, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(call, range(64)))
        assert statuses == [200] * 64
        after = httpx.get(f"{server.url}/metrics").text
        batches = _metric(after, "kiln_batch_size_count") - batches_before
        requests = _metric(after, "kiln_batch_size_sum") - _metric(before, "kiln_batch_size_sum")
        assert requests == 64
        assert batches < 64 and requests / batches > 1.5, (requests, batches)
    finally:
        server.stop()


def test_auth(digits_artifacts):
    server = ServerProcess(digits_artifacts, "--api-key-env", "KILN_TEST_KEY", env={"KILN_TEST_KEY": API_KEY})
    server.wait_ready()
    try:
        url = server.url
        for path in ("/predict", "/v2/models/digits/infer", "/v2/models/digits", "/v2"):
            response = httpx.post(f"{url}{path}", json=GOOD) if "infer" in path or path == "/predict" \
                else httpx.get(f"{url}{path}")
            assert response.status_code == 401, path
            assert "API key" in response.json()["error"]
        assert httpx.post(f"{url}/predict", json=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{url}/predict", json=GOOD, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.post(f"{url}/predict", json=GOOD, headers={"X-API-Key": API_KEY}).status_code == 200
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready"):
            assert httpx.get(f"{url}{path}").status_code == 200, path
        # /metrics names every model and variant: behind the key (--metrics-open opens it)
        anonymous = httpx.get(f"{url}/metrics")
        assert anonymous.status_code == 401 and "digits" not in anonymous.text
        assert "kiln_info" in httpx.get(f"{url}/metrics", headers={"X-API-Key": API_KEY}).text
        assert API_KEY not in server.log_path.read_text()
    finally:
        server.stop()


def test_unset_key_variable_refuses_to_start(digits_artifacts):
    result = run_kiln("serve", str(digits_artifacts), "--api-key-env", "KILN_NO_SUCH_VARIABLE")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("UsageError: ")


def test_tampered_artifact_refuses_to_start(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    with open(copy / "onnx-fp32.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    result = run_kiln("serve", str(copy), "--port", "18765")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("IntegrityError: ")
    result = run_kiln("serve", str(copy), "--variant", "nope")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("ManifestError: ")


def test_sigterm_stops_the_whole_group(digits_artifacts):
    server = ServerProcess(digits_artifacts).wait_ready()
    assert httpx.post(f"{server.url}/predict", json=GOOD).status_code == 200
    elapsed = server.stop()  # raises if any process of the group is left
    assert server.proc.returncode is not None
    assert elapsed < 20


def test_a_backlog_batch_waits_only_where_a_fuller_batch_was_measured_cheaper():
    from kiln.serve.batching import batch_bucket, worth_waiting

    assert [batch_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 31, 32, 33)] == [1, 1, 2, 2, 4, 4, 8, 16, 32, 32]
    assert not worth_waiting({}, 4)  # nothing measured yet: run at once
    flat = {1: 1.2e-3, 2: 1.2e-3, 4: 1.19e-3, 8: 1.18e-3, 16: 1.2e-3, 32: 1.15e-3}  # digits on one thread
    assert not any(worth_waiting(flat, k) for k in (2, 3, 4, 8, 16, 31))
    falling = {1: 4.6e-3, 2: 3.6e-3, 4: 3.0e-3, 8: 2.8e-3, 16: 2.7e-3, 32: 2.9e-3}  # MiniLM, short sentences
    assert worth_waiting(falling, 2) and worth_waiting(falling, 3)
    assert not worth_waiting(falling, 8) and not worth_waiting(falling, 16)
    # Sizes count items, not requests: 40 items from a few multi-item requests wait where 64 were cheaper.
    assert worth_waiting({32: 3.0e-3, 64: 2.0e-3}, 40) and not worth_waiting({32: 3.0e-3, 64: 2.9e-3}, 40)
    assert not worth_waiting({1: 4e-3, 4: 3e-3}, 2)  # no measurement at this size: no wait


def test_loadtest_reports_levels_and_a_ceiling_in_the_servers_shape(digits_artifacts, tmp_path):
    server = ServerProcess(digits_artifacts, "--threads", "1", "--workers", "2").wait_ready()
    try:
        out = tmp_path / "lt"
        result = run_kiln("loadtest", server.url, "--concurrency", "1,8", "--requests", "60", "--ceiling",
                          str(digits_artifacts), "--threads", "1", "--workers", "2", "--rounds", "2", "--out", str(out))
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "loadtest.json").read_text())
        assert (out / "loadtest.png").stat().st_size > 0
        assert [level["concurrency"] for level in report["levels"]] == [1, 8]
        for level in report["levels"]:
            assert level["ok"] == level["requests"] == 60 and level["error_count"] == 0
            assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"]
            ceiling = level["ceiling"]
            assert len(ceiling["rounds"]) == 2 and all(r["workers"] == 2 for r in ceiling["rounds"])
            assert len(level["fraction_of_ceiling_by_round"]) == 2 and level["fraction_of_ceiling"] > 0
        assert report["levels"][0]["mean_batch_items"] == 1.0  # one client: nothing to batch with
        assert "fraction" in result.stdout
    finally:
        server.stop()


def test_loadtest_refuses_bad_arguments_and_unreachable_servers():
    bad = run_kiln("loadtest", "http://127.0.0.1:9", "--concurrency", "0,x")
    assert bad.returncode == 2 and "UsageError: --concurrency" in bad.stderr
    unreachable = run_kiln("loadtest", "http://127.0.0.1:9", "--requests", "5")
    assert unreachable.returncode == 2 and "cannot reach http://127.0.0.1:9" in unreachable.stderr


def test_v2_values_are_checked_in_the_dtype_the_runtime_takes():
    from kiln.core.signature import Signature, TensorSpec
    from kiln.serve.protocol import RequestError, ServedModel, parse_v2

    model = ServedModel(name="m", task="t", text=False, max_items=8, signature=Signature(
        inputs=(TensorSpec("ids", "int32", ("batch", 2)), TensorSpec("x", "float16", ("batch", 2))),
        outputs=(TensorSpec("y", "float32", ("batch", 1)),)))

    def body(ids, x):
        return {"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT32", "data": ids},
                           {"name": "x", "shape": [1, 2], "datatype": "FP16", "data": x}]}

    parsed = parse_v2(body([1, -2], [0.5, 1.0]), model)
    assert parsed.arrays["ids"].dtype == np.int32 and parsed.arrays["x"].dtype == np.float16
    for ids, x, words in (([2**40, 1], [0.5, 1.0], "int32's range"), ([1, -2**31 - 1], [0.5, 1.0], "int32's range"),
                          ([1, 2], [1e5, 1.0], "float16's range")):
        with pytest.raises(RequestError) as caught:
            parse_v2(body(ids, x), model)
        assert caught.value.status == 422 and words in str(caught.value)
