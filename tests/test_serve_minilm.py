"""The text path: MiniLM served with server-side tokenization, /predict and V2 BYTES."""

import httpx
import numpy as np
import pytest

import kiln
from kiln.models import minilm

pytestmark = pytest.mark.slow
TEXTS = ["The cat sat on the mat.", "Interest rates rose again this quarter.", "ünïcödé — emoji 🙂 and 中文"]


def _expected(folder, texts):
    rt = kiln.load(folder, "onnx-fp32", threads=1)
    return rt.run(minilm.tokenize(texts, folder / "tokenizer.json"))["sentence_embedding"]


def test_predict_texts(minilm_server, minilm_artifacts):
    expected = _expected(minilm_artifacts, TEXTS)
    one = httpx.post(f"{minilm_server.url}/predict", json={"text": TEXTS[0]}).json()
    np.testing.assert_allclose(one["embedding"], _expected(minilm_artifacts, TEXTS[:1])[0], atol=1e-5)
    many = httpx.post(f"{minilm_server.url}/predict", json={"texts": TEXTS}).json()
    np.testing.assert_allclose(np.array(many["embeddings"]), expected, atol=1e-4)


def test_v2_bytes(minilm_server, minilm_artifacts):
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    answer = httpx.post(f"{minilm_server.url}/v2/models/minilm/infer", json=body).json()
    out = answer["outputs"][0]
    assert out["name"] == "sentence_embedding" and out["shape"] == [3, 384]
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 384), _expected(minilm_artifacts, TEXTS), atol=1e-4)
    meta = httpx.get(f"{minilm_server.url}/v2/models/minilm").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("body,status", [
    ({"text": 5}, 422), ({"texts": []}, 422), ({"texts": ["ok", None]}, 422), ({"text": "a", "texts": ["b"]}, 422),
    ({"text": "x" * 20001}, 413), ({"texts": ["a"] * 65}, 413),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": ["a"]}]}, 422),
])
def test_bad_text_requests(minilm_server, body, status):
    path = "/v2/models/minilm/infer" if "inputs" in body else "/predict"
    response = httpx.post(f"{minilm_server.url}{path}", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert httpx.post(f"{minilm_server.url}/predict", json={"text": "still fine"}).status_code == 200
