"""Many models in one server: `kiln serve DIR [DIR ...]` or a repository folder of artifact folders.

The pure parts first (folder discovery, per-model options, the model lookup), then one real server with digits and
MiniLM behind an API key: the repository index, each model's routes, per-model metrics, and a model whose worker is
killed while the other keeps serving.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_kiln
from server_process import ServerProcess

from kiln.core.errors import ManifestError, UsageError
from kiln.core.signature import Signature, TensorSpec
from kiln.serve.protocol import RequestError, ServedModel
from kiln.serve.repository import model_folders, per_model
from kiln.serve.routes import Endpoint, Inference

API_KEY = "many-models-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --- pure parts ----------------------------------------------------------------------------------------------------


def test_per_model_options_take_one_value_or_name_value_forms():
    names = ["digits", "minilm"]
    assert per_model(None, names, "--workers") == (None, {})
    assert per_model(["2"], names, "--workers", int) == (2, {})
    assert per_model(["1", "minilm=2"], names, "--workers", int) == (1, {"minilm": 2})
    assert per_model(["digits=3,minilm=1"], names, "--threads", int) == (None, {"digits": 3, "minilm": 1})
    assert per_model(["digits=pruned-onnx-int8", "minilm=auto"], names, "--variant") == (
        None, {"digits": "pruned-onnx-int8", "minilm": "auto"})
    with pytest.raises(UsageError, match="names model 'bert'; this server serves digits, minilm"):
        per_model(["bert=2"], names, "--workers", int)
    with pytest.raises(UsageError, match="'two' is not a valid value"):
        per_model(["digits=two"], names, "--workers", int)


def _artifact(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


def test_a_repository_expands_to_the_artifact_folders_inside_it(tmp_path):
    one = _artifact(tmp_path / "one")
    repo = tmp_path / "repo"
    b, a = _artifact(repo / "b"), _artifact(repo / "a")
    (repo / "notes").mkdir()  # a folder without a manifest is not a model
    assert model_folders([str(one), str(repo)]) == [one, a, b]
    with pytest.raises(ManifestError, match=r"no manifest\.json and no artifact folders"):
        model_folders([str(repo / "notes")])
    with pytest.raises(ManifestError, match="is not a folder"):
        model_folders([str(tmp_path / "missing")])


def _model(name: str) -> ServedModel:
    return ServedModel(name=name, task="classification", text=False, max_items=8, signature=Signature(
        inputs=(TensorSpec("x", "float32", ("batch", 2)),), outputs=(TensorSpec("logits", "float32", ("batch", 3)),)))


def test_the_lookup_finds_a_model_by_name_and_the_one_model_without_a_name():
    one = Inference({"a": Endpoint(_model("a"), None)})
    assert one.lookup(None).model.name == "a"
    two = Inference({"a": Endpoint(_model("a"), None), "b": Endpoint(_model("b"), None)})
    assert two.lookup("b").model.name == "b"
    with pytest.raises(RequestError, match=r"serves 2 models \(a, b\); name one") as raised:
        two.lookup(None)
    assert raised.value.status == 404
    with pytest.raises(RequestError, match="no model named 'c'; this server serves 'a', 'b'"):
        two.lookup("c")
    with pytest.raises(RequestError) as hidden:
        two.lookup("c", reveal=False)
    assert "'a'" not in str(hidden.value)
    with pytest.raises(RequestError, match="no version '2'"):
        two.lookup("a", "2")


# --- one real server with two models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(digits_artifacts, minilm_artifacts, tmp_path_factory) -> Path:
    """A model repository: a folder of artifact folders (links to the suite's exports)."""
    repo = tmp_path_factory.mktemp("repository")
    (repo / "digits").symlink_to(digits_artifacts)
    (repo / "minilm").symlink_to(minilm_artifacts)
    return repo


@pytest.fixture(scope="module")
def two_models(repository):
    server = ServerProcess(repository, "--variant", "digits=onnx-fp32,minilm=onnx-fp32", "--workers", "1",
                           "--api-key-env", "KILN_TEST_KEY", env={"KILN_TEST_KEY": API_KEY}).wait_ready(240)
    yield server
    server.stop()


@pytest.mark.slow
def test_the_repository_index_lists_both_models_ready(two_models):
    index = httpx.post(f"{two_models.url}/v2/repository/index", headers=AUTH)
    assert index.status_code == 200
    assert index.json() == [{"name": "digits", "version": "1", "state": "READY"},
                            {"name": "minilm", "version": "1", "state": "READY"}]
    ready_only = httpx.post(f"{two_models.url}/v2/repository/index", json={"ready": True}, headers=AUTH)
    assert [m["name"] for m in ready_only.json()] == ["digits", "minilm"]
    bad = httpx.post(f"{two_models.url}/v2/repository/index", json={"ready": "yes"}, headers=AUTH)
    assert bad.status_code == 400 and "ready" in bad.json()["error"]
    meta = httpx.get(f"{two_models.url}/v2", headers=AUTH).json()
    assert meta["models"] == ["digits", "minilm"] and "model_repository" in meta["extensions"]


@pytest.mark.slow
def test_each_model_answers_on_its_own_routes(two_models, digits_artifacts, minilm_artifacts):
    import openai

    import kiln
    from kiln.models.digits import splits

    images = splits()[1].inputs["image"][:4]
    expected = kiln.load(digits_artifacts, "onnx-fp32", threads=1).run({"image": images})["logits"]
    answer = httpx.post(f"{two_models.url}/v2/models/digits/predict", json={"inputs": {"image": images.tolist()}},
                        headers=AUTH).json()
    assert [p["class"] for p in answer["predictions"]] == expected.argmax(1).tolist()
    v2 = httpx.post(f"{two_models.url}/v2/models/digits/infer", headers=AUTH, json={"inputs": [
        {"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.reshape(-1).tolist()}]})
    np.testing.assert_allclose(np.array(v2.json()["outputs"][0]["data"]).reshape(4, 10), expected, atol=1e-4)
    texts = ["The cat sat on the mat.", "Interest rates rose again."]
    embeddings = httpx.post(f"{two_models.url}/v2/models/minilm/predict", json={"texts": texts}, headers=AUTH).json()
    client = openai.OpenAI(base_url=f"{two_models.url}/v1", api_key=API_KEY)
    served = client.embeddings.create(model="minilm", input=texts)  # the body's `model` picks the model
    np.testing.assert_allclose([d.embedding for d in served.data], embeddings["embeddings"], atol=1e-6)
    with pytest.raises(openai.NotFoundError, match="no model named 'bert'"):
        client.embeddings.create(model="bert", input=texts)
    with pytest.raises(openai.NotFoundError, match="is not a text embedding model"):
        client.embeddings.create(model="digits", input=texts)
    ambiguous = httpx.post(f"{two_models.url}/predict", json={"texts": texts}, headers=AUTH)
    assert ambiguous.status_code == 404 and "digits, minilm" in ambiguous.json()["error"]


@pytest.mark.slow
def test_auth_covers_the_new_routes(two_models):
    url = two_models.url
    for method, path in [("POST", "/v2/repository/index"), ("POST", "/v2/models/digits/predict"),
                         ("POST", "/v2/models/minilm/infer"), ("POST", "/v1/embeddings"), ("GET", "/v2/models/minilm"),
                         ("POST", "/V2/Repository/Index/"), ("POST", "//v2/models/digits/predict")]:
        answer = httpx.request(method, f"{url}{path}", json={})
        assert answer.status_code == 401, (method, path, answer.status_code)
    assert httpx.get(f"{url}/v2/models/minilm/ready").status_code == 200  # probes stay open
    unknown = httpx.get(f"{url}/v2/models/bert/ready")
    assert unknown.status_code == 404 and "minilm" not in unknown.text  # no model names for the unauthenticated


@pytest.mark.slow
def test_metrics_are_labelled_by_model(two_models):
    httpx.post(f"{two_models.url}/v2/models/digits/predict", json={"image": np.zeros((8, 8)).tolist()}, headers=AUTH)
    httpx.post(f"{two_models.url}/v2/models/minilm/predict", json={"text": "hello"}, headers=AUTH)
    assert httpx.get(f"{two_models.url}/metrics").status_code == 401  # it names the models: behind the key
    text = httpx.get(f"{two_models.url}/metrics", headers=AUTH).text
    for model in ("digits", "minilm"):
        assert re.search(rf'^kiln_batch_size_count{{model="{model}"}} [1-9]', text, re.M), model
        assert re.search(rf'^kiln_info{{how="forced",model="{model}",variant="onnx-fp32",version="1"}} 1$', text, re.M)
        assert re.search(rf'^kiln_requests_total{{route="/v2/models/{{name}}/predict",method="POST",status="200",'
                         rf'model="{model}"}} [1-9]', text, re.M), model


def _worker_pid(server: ServerProcess, model: str) -> int:
    pids = re.findall(rf"^kiln: {model} worker 0 ready \(pid (\d+);", server.log_path.read_text(), re.M)
    assert pids, server.log_path.read_text()[-2000:]
    return int(pids[-1])


@pytest.mark.slow
def test_killing_one_models_worker_leaves_the_other_serving(two_models):
    url = two_models.url
    pid = _worker_pid(two_models, "digits")
    os.kill(pid, signal.SIGKILL)
    saw_down = False
    minilm_statuses = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/v2/models/digits/ready")
        minilm_statuses.append(httpx.post(f"{url}/v2/models/minilm/predict", json={"text": "still here"},
                                          headers=AUTH, timeout=30).status_code)
        if ready.status_code == 503:
            saw_down = True
            index = httpx.post(f"{url}/v2/repository/index", headers=AUTH).json()
            assert index[1] == {"name": "minilm", "version": "1", "state": "READY"}
            if index[0]["state"] == "UNAVAILABLE":  # unless the restarted worker connected in between
                assert index[0]["name"] == "digits" and "workers connected" in index[0]["reason"]
            meanwhile = httpx.post(f"{url}/v2/models/digits/predict", json={"image": np.zeros((8, 8)).tolist()},
                                   headers=AUTH)
            assert meanwhile.status_code in (200, 503), meanwhile.text  # 503 while no worker: a clear retry
            if meanwhile.status_code == 503:
                assert "worker" in meanwhile.json()["error"]
        elif saw_down:
            break
        time.sleep(0.05)
    assert saw_down, "digits never reported not-ready after its worker was killed"
    assert set(minilm_statuses) == {200}, minilm_statuses  # the other model never failed a request
    assert httpx.get(f"{url}/v2/models/digits/ready").status_code == 200  # restarted by LitServe
    assert _worker_pid(two_models, "digits") != pid
    back = httpx.post(f"{url}/v2/models/digits/predict", json={"image": np.zeros((8, 8)).tolist()}, headers=AUTH)
    assert back.status_code == 200 and "class" in back.json()


@pytest.mark.slow
def test_bad_model_sets_fail_the_start_with_one_line(digits_artifacts, tmp_path):
    cases = [
        ([str(digits_artifacts), str(digits_artifacts)], "UsageError", "two folders serve a model named 'digits'"),
        ([str(digits_artifacts), "--workers", "bert=2"], "UsageError", "names model 'bert'"),
        ([str(digits_artifacts), "--threads", "digits=0"], "UsageError", "is not a valid value"),
        ([str(tmp_path)], "ManifestError", "no manifest.json and no artifact folders"),
        ([str(digits_artifacts), "--variant", "digits=onnx-int9"], "ManifestError", "choose one of"),
    ]
    for args, kind, words in cases:
        result = run_kiln("serve", *args, "--port", "18999", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"{kind}:"), result.stderr
        assert words in lines[0], lines[0]
