"""The digits zoo model through the whole export: parity, pruning, INT8, manifest, tampering."""

import json
import shutil

import numpy as np
import onnx
import pytest

import kiln
from kiln.core.errors import IntegrityError, ManifestError
from kiln.core.manifest import read_manifest
from kiln.core.runtime import run_batched
from kiln.export.quantize import int8_node_counts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eager():
    import torch

    from kiln.models.registry import get_model

    bundle = get_model("digits")
    with torch.inference_mode():
        logits = bundle.module(torch.from_numpy(bundle.evaluation.inputs["image"])).numpy()
    return bundle, logits


def test_manifest_lists_the_recommended_set(digits_artifacts):
    manifest = read_manifest(digits_artifacts)
    assert manifest.model == "digits" and manifest.task == "classification"
    assert set(manifest.variant_names) == {"torchscript-fp32", "torchscript-bf16", "onnx-fp32", "onnx-int8",
                                           "pruned-onnx-int8", "ov-int8"}
    assert manifest.default_variant in manifest.variant_names
    for v in manifest.to_dict()["variants"]:
        for key in ("name", "file", "format", "runtime", "precision", "pruning", "quantization", "bytes", "sha256",
                    "accuracy", "cosine_min", "max_abs_error", "max_rel_error", "top1_agreement"):
            assert key in v, (v["name"], key)
        assert (digits_artifacts / v["file"]).stat().st_size == v["bytes"]
    assert manifest.signature.inputs[0].shape == ("batch", 1, 8, 8)
    for key in ("torch", "onnxruntime", "onnx", "python"):
        assert key in manifest.versions
    assert manifest.recipe["variants"]
    assert not list(digits_artifacts.parent.glob(".digits.tmp-*")), "staging folder left behind"


@pytest.mark.parametrize("variant,atol", [("torchscript-fp32", 1e-4), ("onnx-fp32", 1e-3)])
def test_fp32_artifacts_match_eager(digits_artifacts, eager, variant, atol):
    bundle, logits = eager
    rt = kiln.load(digits_artifacts, variant, threads=2)
    out = run_batched(rt, bundle.evaluation.inputs)["logits"]
    np.testing.assert_allclose(out, logits, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("variant", ["torchscript-bf16", "onnx-int8", "pruned-onnx-int8"])
def test_reduced_precision_keeps_accuracy(digits_artifacts, eager, variant):
    bundle, logits = eager
    rt = kiln.load(digits_artifacts, variant, threads=2)
    out = run_batched(rt, bundle.evaluation.inputs)["logits"]
    accuracy = float((out.argmax(1) == bundle.evaluation.labels).mean())
    reference = float((logits.argmax(1) == bundle.evaluation.labels).mean())
    assert reference >= 0.99
    assert accuracy >= reference - 0.01
    recorded = read_manifest(digits_artifacts).variant(variant).accuracy
    assert recorded == pytest.approx(accuracy, abs=1e-9)


def test_pruned_int8_meets_the_target(digits_artifacts):
    v = read_manifest(digits_artifacts).variant("pruned-onnx-int8")
    assert v.accuracy >= 0.99


def test_structured_pruning_really_removes_channels(digits_artifacts, eager):
    bundle, _ = eager
    pruning = read_manifest(digits_artifacts).variant("pruned-onnx-int8").pruning
    assert pruning["method"] == "structured"
    assert pruning["params_after"] < 0.5 * pruning["params_before"]
    assert pruning["macs_after"] < 0.5 * pruning["macs_before"]
    model = onnx.load(str(digits_artifacts / "pruned-onnx-int8.onnx"))
    dense = onnx.load(str(digits_artifacts / "onnx-int8.onnx"))

    def conv_out_channels(m):
        inits = {t.name: t for t in m.graph.initializer}
        shapes = []
        for node in m.graph.node:
            if node.op_type == "Conv":
                weight = node.input[1]
                for dq in m.graph.node:  # QDQ: the conv's weight comes through a DequantizeLinear
                    if dq.op_type == "DequantizeLinear" and dq.output[0] == weight:
                        weight = dq.input[0]
                shapes.append(inits[weight].dims[0])
        return shapes

    pruned_channels, dense_channels = conv_out_channels(model), conv_out_channels(dense)
    assert len(pruned_channels) == len(dense_channels) == 4
    assert all(p < d for p, d in zip(pruned_channels, dense_channels))
    rt = kiln.load(digits_artifacts, "pruned-onnx-int8")
    assert rt.run({"image": bundle.evaluation.inputs["image"][:5]})["logits"].shape == (5, 10)


@pytest.mark.parametrize("variant", ["onnx-int8", "pruned-onnx-int8"])
def test_int8_artifacts_are_really_int8(digits_artifacts, variant):
    counts = int8_node_counts(digits_artifacts / f"{variant}.onnx")
    assert counts.get("QuantizeLinear", 0) >= 4 and counts.get("DequantizeLinear", 0) >= 4
    assert counts["int8_initializers"] >= 5
    q = read_manifest(digits_artifacts).variant(variant).quantization
    assert q["mode"] == "static" and "per-channel" in q["weights"]


def test_bf16_artifact_holds_bf16_weights(digits_artifacts):
    import torch

    module = torch.jit.load(str(digits_artifacts / "torchscript-bf16.pt"))
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    constants = str(module.graph)
    assert torch.bfloat16 in dtypes or "BFloat16" in constants


def test_tampered_artifact_is_refused(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    path = copy / "onnx-fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        kiln.load(copy, "onnx-fp32")
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(IntegrityError):
        kiln.load(copy, "onnx-fp32")
    kiln.load(copy, "torchscript-fp32")  # the others are intact


def test_manifest_errors_are_clear(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    with pytest.raises(ManifestError, match="not in"):
        kiln.load(copy, "no-such-variant")
    manifest = copy / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["signature"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lacks signature"):
        read_manifest(copy)
    manifest.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(copy)
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        read_manifest(tmp_path)


def test_manifest_round_trips(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    manifest = read_manifest(copy)
    manifest.save()
    assert read_manifest(copy).to_dict() == manifest.to_dict()
