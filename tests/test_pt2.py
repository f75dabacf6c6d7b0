"""`.pt2` artifacts (torch.export + AOTInductor): exported, verified, loaded, served, refused when foreign or
tampered with; and the batch-invariance figure every variant now carries."""

import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_kiln

import kiln
from kiln.core.errors import IntegrityError, RuntimeUnavailable
from kiln.core.manifest import read_manifest
from kiln.core.runtime import run_batched

pytestmark = pytest.mark.slow  # every fixture here compiles C++ (15-60 s a variant on 2 cores)


@pytest.fixture(scope="session")
def digits_pt2(tmp_path_factory) -> Path:
    """digits with the fp32 and bf16 packages beside ONNX fp32, compiled once for the module."""
    out = tmp_path_factory.mktemp("pt2") / "digits"
    result = run_kiln("export", "digits", "--out", str(out), "--variants", "onnx-fp32,pt2-fp32,pt2-bf16",
                      "--no-select")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _digits_eval():
    from kiln.models.digits import splits

    return splits()[1]


@pytest.mark.parametrize("variant,atol", [("pt2-fp32", 1e-4), ("pt2-bf16", 0.5)])
def test_pt2_matches_onnx_and_keeps_the_accuracy(digits_pt2, variant, atol):
    data = _digits_eval()
    reference = run_batched(kiln.load(digits_pt2, "onnx-fp32", threads=2), data.inputs)["logits"]
    got = run_batched(kiln.load(digits_pt2, variant, threads=2), data.inputs)["logits"]
    np.testing.assert_allclose(got, reference, atol=atol)
    accuracy = float((got.argmax(1) == data.labels).mean())
    entry = read_manifest(digits_pt2).variant(variant)
    assert entry.format == "pt2" and entry.runtime == "aotinductor" and entry.file.endswith(".pt2")
    assert entry.accuracy == pytest.approx(accuracy, abs=1e-9) and accuracy >= 0.98
    # The package's provenance, which AOTInductor itself does not record.
    for key in ("torch", "compiler", "inductor_configs", "compile_seconds", "export_seconds"):
        assert key in entry.build, key
    assert entry.build["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert entry.build["dynamic_dims"] == ["batch"]


@pytest.mark.parametrize("variant", ["pt2-bf16", "pt2-int8"])
def test_minilm_pt2_embeddings_match_fp32_at_any_length(minilm_artifacts, variant):
    """MiniLM's recommended set carries its pt2 variants; batch and sequence are both dynamic."""
    from kiln.models import minilm

    texts = minilm.sentences()[:20]
    reference = kiln.load(minilm_artifacts, "onnx-fp32", threads=2)
    runtime = kiln.load(minilm_artifacts, variant, threads=2)
    for batch, pad_to in ((20, None), (1, None), (3, 64)):
        inputs = minilm.tokenize(texts[:batch], minilm_artifacts / "tokenizer.json", pad_to=pad_to)
        want = reference.run(inputs)["sentence_embedding"]
        got = runtime.run(inputs)["sentence_embedding"]
        cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
        assert got.shape == want.shape and cosine.min() > 0.99, (batch, pad_to, cosine.min())
    entry = read_manifest(minilm_artifacts).variant(variant)
    assert entry.build["dynamic_dims"] == ["batch", "sequence"]
    assert entry.batch_invariance["cosine_min"] > 0.9999  # per-token INT8 scales, unlike ONNX dynamic INT8
    if variant == "pt2-int8":
        assert entry.quantization["library"] == "torchao" and "per token" in entry.quantization["activations"]


def test_pt2_batch_dimension_is_dynamic(digits_pt2):
    runtime = kiln.load(digits_pt2, "pt2-fp32", threads=1)
    images = _digits_eval().inputs["image"]
    for batch in (1, 3, 64, 200):  # exported from a batch of 2; 1 must not have been specialized away
        assert runtime.run({"image": images[:batch]})["logits"].shape == (batch, 10)


def test_every_variant_records_batch_invariance(digits_pt2, minilm_artifacts):
    for folder in (digits_pt2, minilm_artifacts):
        for entry in read_manifest(folder).variants:
            figure = entry.batch_invariance
            assert figure and figure["items"] >= 1 and figure["batch"] >= 2, entry.name
    # fp32 answers do not depend on their batch; ONNX Runtime's dynamic INT8 (one activation scale per batch) does.
    minilm = read_manifest(minilm_artifacts)
    assert minilm.variant("onnx-fp32").batch_invariance["cosine_min"] > 0.99999
    assert minilm.variant("onnx-int8").quantization["mode"] == "dynamic"
    assert minilm.variant("onnx-int8").batch_invariance["cosine_min"] < 0.999
    assert read_manifest(digits_pt2).variant("pt2-fp32").batch_invariance["cosine_min"] > 0.99999


def test_a_tampered_package_is_refused(digits_pt2, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(digits_pt2, folder)
    path = folder / "pt2-fp32.pt2"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        kiln.load(folder, "pt2-fp32")
    result = run_kiln("serve", str(folder), "--variant", "pt2-fp32", "--port", "8999")
    assert result.returncode == 1 and result.stderr.strip().startswith("IntegrityError:")


def test_a_package_from_another_torch_is_refused_clearly(digits_pt2, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(digits_pt2, folder)
    manifest = read_manifest(folder)
    manifest.variant("pt2-fp32").build["torch"] = "2.99.0+cpu"
    manifest.save()
    with pytest.raises(RuntimeUnavailable, match=r"torch 2\.99\.0\+cpu.*this machine has torch 2\.13"):
        kiln.load(folder, "pt2-fp32")
    kiln.load(folder, "onnx-fp32")  # the other variants still load
    for args in (("serve", str(folder), "--variant", "pt2-fp32", "--port", "8999"),
                 ("bench", str(folder), "--variants", "pt2-fp32", "--batch-sizes", "1", "--max-seconds", "0.1")):
        result = run_kiln(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines[-1].startswith("RuntimeUnavailable:") and "2.99.0" in lines[-1], \
            result.stderr[-2000:]


def test_served_pt2_answers_what_the_runtime_answers(digits_pt2):
    from server_process import ServerProcess

    images = _digits_eval().inputs["image"][:16]
    expected = kiln.load(digits_pt2, "pt2-fp32", threads=1).run({"image": images})["logits"]
    server = ServerProcess(digits_pt2, "--variant", "pt2-fp32", "--threads", "1").wait_ready(180)
    try:
        body = {"inputs": [{"name": "image", "shape": [16, 1, 8, 8], "datatype": "FP32",
                            "data": images.reshape(-1).tolist()}]}
        answer = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=30).json()
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(16, 10)
        np.testing.assert_array_equal(got, expected)
        meta = httpx.get(f"{server.url}/v2/models/digits", timeout=10).json()
        assert meta["platform"] == "pytorch_aotinductor"
    finally:
        server.stop()


def test_without_a_compiler_pt2_fails_clearly_and_the_rest_still_build(tmp_path):
    """No C++ compiler: a pt2 variant the user named is a collected failure (exit 3, nothing written) naming the fix;
    the same variant in a model's recommended set is skipped with a note, and the others export."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = {"PATH": str(bin_dir), "CXX": ""}
    named = tmp_path / "named"
    result = run_kiln("export", "digits", "--out", str(named), "--variants", "onnx-fp32,pt2-fp32",
                      "--no-select", env=env)
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("VerificationError:") and "pt2-fp32" in last and "C++ compiler" in last
    assert not named.exists()
    from kiln.export.pipeline import run_export
    from kiln.export.recipe import build_recipe
    from kiln.models.registry import get_model

    bundle = get_model("digits")
    recipe = build_recipe(("onnx-fp32", "pt2-fp32"))  # as a model's recommended set
    saved = {k: os.environ.get(k) for k in ("PATH", "CXX")}
    os.environ.update(env)
    try:
        manifest = run_export(bundle, recipe, tmp_path / "recommended", progress=lambda m: None)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert manifest.variant_names == ["onnx-fp32"]
    assert manifest.skipped and manifest.skipped[0]["variant"] == "pt2-fp32"
    assert "C++ compiler" in read_manifest(tmp_path / "recommended").skipped[0]["reason"]
