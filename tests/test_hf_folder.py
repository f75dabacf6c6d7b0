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
                      "--out", str(out), "--name", "sentiment")
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
