"""Every encoder family kiln supports, for every text task, as a user brings it: a tiny folder made in the test
(random weights from the family's config class, a tokenizer of its real kind trained here; tests/tiny_families.py),
exported with the real `kiln export PATH --out DIR`, served by one real `kiln serve` over all of them, and answered
equal to transformers / sentence-transformers eager on /v2/models/NAME/predict, V2 infer and /v1/embeddings.

CI's budget: six cells (one per distinct modeling code, NO_FLAG) export the whole recommended set with no flag at
all, `.pt2` compiles included; the other 18 export `onnx-fp32` only (`--variants onnx-fp32`), because 18 more pairs of
AOTInductor compiles (about 35 s of CPU each pair here) would take the matrix far past CI's budget on 2 cores, and a
named INT8 variant on random tiny weights may rightly fail its budget. KILN_FAMILY_MATRIX=full exports every cell
with no flag.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_kiln
from server_process import ServerProcess
from tiny_families import KINDS, save_folder

from kiln.core.manifest import read_manifest
from kiln.models.families import FAMILIES

pytestmark = pytest.mark.slow  # real exports and a real server

TASKS = ("embedding", "classification", "token-classification")
CELLS = [(family, task) for family in KINDS for task in TASKS]
# The cells that export the default set with no flag: one per distinct modeling code (ELECTRA's encoder is BERT's,
# XLM-R's is RoBERTa's, so their pt2 paths are those), each task twice, DeBERTa-v2's token classifier among them
# because its random tiny INT8 misses the budget and is left out (the drop rule, end to end).
NO_FLAG = {("bert", "embedding"), ("distilbert", "classification"), ("roberta", "token-classification"),
           ("mpnet", "embedding"), ("deberta-v2", "token-classification"), ("modernbert", "classification")}
FULL = os.environ.get("KILN_FAMILY_MATRIX") == "full"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé façade naïve café", "ok",
         "Numbers 3.14159 and symbols #@$% in a longer sentence about serving models on CPUs."]


def name_of(family: str, task: str) -> str:
    return f"{family}-{task}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """All folders built, all exported (two `kiln export` processes at a time), one server over the repository."""
    root = tmp_path_factory.mktemp("families")
    folders = {cell: save_folder(*cell, root / "folders") for cell in CELLS}
    repository = root / "artifacts"

    def export(cell):
        flags = ["--no-select"] if FULL or cell in NO_FLAG else ["--variants", "onnx-fp32"]
        return cell, run_kiln("export", str(folders[cell]), "--out", str(repository / name_of(*cell)), *flags)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(export, CELLS))
    failed = {name_of(*c): r.stderr.strip().splitlines()[-1:] for c, r in results.items() if r.returncode}
    assert not failed, failed
    server = ServerProcess(repository, log=root / "serve.log")
    try:
        server.wait_ready(300)
        yield {"folders": folders, "repository": repository, "results": results, "url": server.url}
    finally:
        server.stop(60)


def eager(folder: Path, task: str, texts: list[str]) -> list[np.ndarray]:
    """transformers / sentence-transformers themselves, one text at a time (no padding to compare against)."""
    import torch

    if task == "embedding":
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(str(folder), device="cpu")
        return list(encoder.encode(texts, convert_to_numpy=True))
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    tokenizer, model = AutoTokenizer.from_pretrained(folder), auto.from_pretrained(folder).eval()
    answers = []
    with torch.inference_mode():
        for text in texts:
            logits = model(**tokenizer(text, truncation=True, max_length=128, return_tensors="pt")).logits[0]
            answers.append(torch.softmax(logits.double(), -1).numpy())
    return answers


def assert_probabilities_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Probabilities within 1e-4 and the same labels (where eager's top two are not a tie at float precision)."""
    np.testing.assert_allclose(got, expected, atol=1e-4)
    top2 = np.sort(expected, -1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 1e-5
    assert decided.mean() > 0.5  # random tiny models still mostly decide: the label check is not vacuous
    assert (got.argmax(-1) == expected.argmax(-1))[decided].all()


def cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)


@pytest.mark.parametrize("family,task", CELLS, ids=[name_of(*c) for c in CELLS])
def test_family_exports_verifies_and_serves_like_eager(matrix, family, task):
    name = name_of(family, task)
    folder = matrix["repository"] / name
    manifest = read_manifest(folder)
    assert manifest.task == task and manifest.source["family"] == family
    if FULL or (family, task) in NO_FLAG:
        # The recommended set: fp32 and bf16 always kept here; an INT8 variant may be left out (random tiny weights
        # can miss INT8's budget), and then only with its one-line reason.
        kept, left = manifest.variant_names, {s["variant"]: s["reason"] for s in manifest.skipped}
        assert sorted([*kept, *left]) == ["onnx-fp32", "onnx-int8", "pt2-bf16", "pt2-int8"], (kept, left)
        assert {"onnx-fp32", "pt2-bf16"} <= set(kept), left
        assert all(name.endswith("int8") and "failed verification" in why for name, why in left.items()), left
    else:
        assert manifest.variant_names == ["onnx-fp32"]
    onnx = manifest.variant("onnx-fp32").build
    if FAMILIES[family].ort_model_type:  # the families ONNX Runtime's transformer optimizer handles
        assert onnx["optimizer"] == "onnxruntime.transformers" and onnx["fused"], onnx
    reference = eager(matrix["folders"][(family, task)], task, TEXTS)
    url = matrix["url"]

    predict = httpx.post(f"{url}/v2/models/{name}/predict", json={"texts": TEXTS}, timeout=60)
    assert predict.status_code == 200, predict.text
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    infer = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
    assert infer.status_code == 200, infer.text
    outputs = {o["name"]: o for o in infer.json()["outputs"]}

    if task == "embedding":
        expected = np.stack(reference)
        served = {
            "predict": np.asarray(predict.json()["embeddings"]),
            "v2": np.asarray(outputs["sentence_embedding"]["data"]).reshape(len(TEXTS), -1),
        }
        openai = httpx.post(f"{url}/v1/embeddings", json={"model": name, "input": TEXTS}, timeout=60)
        assert openai.status_code == 200, openai.text
        served["openai"] = np.asarray([d["embedding"] for d in openai.json()["data"]])
        for route, got in served.items():
            assert cosines(got, expected).min() >= 0.9999, route
    elif task == "classification":
        expected = np.stack(reference)
        predictions = predict.json()["predictions"]
        labels = manifest.preprocessing["labels"]
        got = np.asarray([[p["scores"][label] for label in labels] for p in predictions])
        assert_probabilities_equal(got, expected)
        assert [p["label"] for p in predictions] == outputs["label"]["data"]
        assert_probabilities_equal(np.asarray(outputs["probabilities"]["data"]).reshape(expected.shape), expected)
    else:
        logits = np.asarray(predict.json()["outputs"]["logits"])
        v2 = np.asarray(outputs["logits"]["data"]).reshape(logits.shape)
        np.testing.assert_allclose(v2, logits, atol=1e-5)
        for row, expected in zip(logits, reference, strict=True):  # each text's own tokens, padding left out
            shifted = np.exp(row[:len(expected)] - row[:len(expected)].max(-1, keepdims=True))
            assert_probabilities_equal(shifted / shifted.sum(-1, keepdims=True), expected)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_token_classifier_answers_its_own_tokens_whatever_it_is_batched_with(matrix, family):
    """Per-token outputs (a token classifier's logits, `batch, sequence, labels`) are cut to each request's own
    longest text when requests share a batch (core.runner.own_lengths): the same text answers the same shape and
    values alone and beside a longer one (RoBERTa pads with id 1, BERT with 0)."""
    import time

    from kiln.core.runner import ModelRunner, WorkItem

    folder = matrix["repository"] / name_of(family, "token-classification")
    runner = ModelRunner(str(folder), "onnx-fp32", 1)
    try:
        alone = runner.run(runner.prepare([WorkItem(None, ["ok"], 1, time.time())])).outcomes[0][0]["logits"]
        for measured in (False, True):  # the rows path, and the worker's measure-then-pad path
            items = [WorkItem(None, ["ok"], 1, time.time()), WorkItem(None, [TEXTS[3]], 1, time.time())]
            if measured:
                runner.measure(items)
            ran = runner.run(runner.prepare(items))
            got, other = (outputs["logits"] for outputs, _ in ran.outcomes)
            assert got.shape == alone.shape and other.shape[1] > got.shape[1], (got.shape, other.shape)
            np.testing.assert_allclose(got, alone, atol=1e-5)
    finally:
        runner.close()
