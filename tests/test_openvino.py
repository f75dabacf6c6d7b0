"""The OpenVINO runtime on a real IR built with OpenVINO's own graph API (no torch), and its telemetry kept off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kiln.core.errors import RuntimeUnavailable
from kiln.core.runtime import RuntimeOptions, open_artifact, registry
from kiln.core.signature import Signature, TensorSpec

SIGNATURE = Signature(inputs=(TensorSpec("x", "float32", ("batch", 4)),),
                      outputs=(TensorSpec("y", "float32", ("batch", 3)),))
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def write_ir(path, precision: str) -> None:
    """A one-MatMul model with a dynamic batch, its precision recorded as kiln's emitter records it."""
    import openvino as ov
    from openvino import opset13 as ops

    from kiln.core.runtimes.openvino import PRECISION_KEY

    x = ops.parameter([-1, 4], np.float32, name="x")
    y = ops.matmul(x, ops.constant(WEIGHTS), False, False)
    model = ov.Model([y], [x], "tiny")
    model.inputs[0].get_tensor().set_names({"x"})
    model.outputs[0].get_tensor().set_names({"y"})
    model.set_rt_info(precision, PRECISION_KEY)
    ov.save_model(model, str(path), compress_to_fp16=False)


def test_registered_with_its_suffix_and_no_torch():
    spec = registry()["openvino"]
    assert spec.suffix == ".xml" and spec.requires == "openvino" and not spec.needs_torch


def test_runs_dynamic_batches_in_the_threads_it_is_given(tmp_path):
    write_ir(tmp_path / "m.xml", "fp32")
    runtime = open_artifact(tmp_path / "m.xml", "openvino", SIGNATURE, "ov-fp32", RuntimeOptions(threads=1))
    assert runtime.threads == 1 and runtime.precision == "f32"
    assert runtime.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(runtime.compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        first = runtime.run({"x": x})["y"]
        np.testing.assert_allclose(first, x @ WEIGHTS, rtol=1e-5, atol=1e-6)
        runtime.run({"x": x * 2})
        np.testing.assert_allclose(first, x @ WEIGHTS, rtol=1e-5, atol=1e-6)  # a copy, not the request's tensor
    runtime.close()
    runtime.close()


def test_bf16_is_refused_where_the_cpu_only_emulates_it(tmp_path, monkeypatch):
    import kiln.core.machine

    write_ir(tmp_path / "m.xml", "bf16")
    monkeypatch.setattr(kiln.core.machine, "bf16_native", lambda info=None: False)
    with pytest.raises(RuntimeUnavailable, match="bf16"):
        open_artifact(tmp_path / "m.xml", "openvino", SIGNATURE, "ov-bf16")
    write_ir(tmp_path / "q.xml", "int8")  # an INT8 model's unquantized layers fall back to f32 instead
    assert open_artifact(tmp_path / "q.xml", "openvino", SIGNATURE, "ov-int8").precision == "f32"


TELEMETRY_PROBE = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from openvino_telemetry.backend import backend_ga4
backend_ga4.GA4Backend.send = lambda self, message: attempts.append("ga4 send")  # what posts to the network
if sys.argv[1] == "off":
    from kiln.core.runtimes.openvino import telemetry_off
    telemetry_off()
import nncf
from nncf.telemetry.wrapper import telemetry
from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry
ovc = init_ovc_telemetry()
telemetry.send_event("kiln-test", "probe", "label")
ovc.send_event("kiln-test", "probe", "label")
import time; time.sleep(1)  # the sender calls the backend from a thread pool
print(json.dumps({"nncf": bool(telemetry._impl.consent), "ovc": bool(ovc.consent), "attempts": attempts}))
"""


def _probe(mode: str, home) -> dict:
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # the telemetry package turns itself off under CI=true; test the ordinary case
    result = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, mode], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_telemetry_never_sends(tmp_path):
    """Left alone, NNCF and the converter count a missing consent file as consent and try to send; with kiln's
    switch nothing consents, nothing reaches for the network, and nothing is written in the user's home."""
    on, off = tmp_path / "on", tmp_path / "off"
    on.mkdir()
    off.mkdir()
    plain = _probe("plain", on)
    assert plain["nncf"] and plain["ovc"] and plain["attempts"]  # what the switch is for
    switched = _probe("off", off)
    assert switched == {"nncf": False, "ovc": False, "attempts": []}
    assert not list(off.iterdir())


# --- real exports (the session's MiniLM has ov-int8 in its recommended set) --------------------------------------

TORCH_ABSENT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # what the serve-only install lacks
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchao", "nncf", "onnx", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
import os, pathlib
pathlib.Path(os.environ["KILN_TEST_MARKER"]).touch()  # the block was in place in the server's processes
"""


@pytest.mark.slow
def test_minilm_ov_int8_is_verified_and_served_without_torch(minilm_artifacts, tmp_path):
    import httpx
    from server_process import ServerProcess

    import kiln
    from kiln.core.manifest import read_manifest
    from kiln.models import minilm

    entry = read_manifest(minilm_artifacts).variant("ov-int8")
    assert entry.runtime == "openvino" and [c["file"] for c in entry.companions] == ["ov-int8.bin"]
    assert entry.cosine_min >= 0.99 and entry.batch_invariance["cosine_min"] >= 0.999
    record = entry.quantization
    assert record["library"] == "nncf" and record["steps"][-1]["held_out_cosine_min"] >= record["budget_cosine_min"]
    assert len(record["kept_in_higher_precision"]) == record["steps"][-1]["kept"]

    texts = ["The cat sat on the mat.", "Interest rates rose again this quarter."]
    reference = kiln.load(minilm_artifacts, "onnx-fp32", threads=1).run(
        minilm.tokenize(texts, minilm_artifacts / "tokenizer.json"))["sentence_embedding"]
    (tmp_path / "sitecustomize.py").write_text(TORCH_ABSENT)
    server = ServerProcess(minilm_artifacts, "--variant", "ov-int8", "--threads", "1",
                           env={"PYTHONPATH": str(tmp_path), "KILN_TEST_MARKER": str(tmp_path / "blocked")})
    try:
        server.wait_ready(120)
        answer = httpx.post(f"{server.url}/predict", json={"texts": texts}, timeout=30).json()
        served = np.array(answer["embeddings"])
        cosine = (served * reference).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(reference, axis=1)
        assert served.shape == (2, 384) and cosine.min() >= 0.99, cosine
    finally:
        server.stop()
    assert (tmp_path / "blocked").exists()

    # A default this install cannot load (pt2-int8 needs torch) is re-chosen among the variants that load here.
    import shutil

    from kiln.core.manifest import read_manifest as read

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_artifacts, folder)
    manifest = read(folder)
    manifest.default_variant = "pt2-int8"
    manifest.save()
    server = ServerProcess(folder, "--threads", "1", env={"PYTHONPATH": str(tmp_path),
                                                          "KILN_TEST_MARKER": str(tmp_path / "blocked")})
    try:
        server.wait_ready(180)
        parameters = httpx.get(f"{server.url}/v2/models/minilm", timeout=10).json()["parameters"]
        assert parameters["variant"] in ("onnx-fp32", "onnx-int8", "ov-int8"), parameters
        assert parameters["reason"].startswith("re-chosen: the default pt2-int8 needs torch"), parameters
    finally:
        server.stop()


def _tiny_quantization_job(budget: float):
    """A two-MatMul OpenVINO model and what the NNCF handler reads from an export job (no torch involved)."""
    from types import SimpleNamespace

    import openvino as ov
    from openvino import opset13 as ops

    from kiln.export.recipe import Recipe, Tolerances
    from kiln.models.base import Dataset

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 16], np.float32, name="x")
    hidden = ops.relu(ops.matmul(x, ops.constant(rng.standard_normal((16, 32)).astype(np.float32)), False, False))
    y = ops.matmul(hidden, ops.constant(rng.standard_normal((32, 8)).astype(np.float32)), False, False)
    model = ov.Model([y], [x], "tiny")
    model.inputs[0].get_tensor().set_names({"x"})
    model.outputs[0].get_tensor().set_names({"y"})
    signature = Signature(inputs=(TensorSpec("x", "float32", ("batch", 16)),),
                          outputs=(TensorSpec("y", "float32", ("batch", 8)),))
    # A heavy-tailed calibration set: a few large activations make per-tensor INT8 ranges coarse.
    data = rng.standard_normal((32, 16)).astype(np.float32) * rng.choice([0.1, 1.0, 8.0], size=(32, 1))
    bundle = SimpleNamespace(signature=signature, calibration=Dataset({"x": data.astype(np.float32)}),
                             task="embedding")
    recipe = Recipe(variants=("ov-int8",), tolerances=Tolerances(int8_cosine_min=budget))
    return model, SimpleNamespace(spec=SimpleNamespace(name="ov-int8"), bundle=bundle, recipe=recipe)


@pytest.mark.slow  # real NNCF runs (about 10 s)
def test_accuracy_control_keeps_layers_until_the_held_out_budget_holds_or_refuses():
    from kiln.core.errors import ExportError
    from kiln.export import ov_quantize
    from kiln.export.precision import NncfInt8

    model, job = _tiny_quantization_job(0.5)
    quantized, record = ov_quantize.nncf_int8(NncfInt8(model_type=""), model, job)
    assert record["steps"] == [{"kept": 0, "held_out_cosine_min": record["steps"][0]["held_out_cosine_min"]}]
    assert record["kept_in_higher_precision"] == [] and len(ov_quantize.quantized_layers(quantized)) == 2

    model, job = _tiny_quantization_job(0.9)  # plain INT8 misses it on the held-out half (0.88 here)
    quantized, record = ov_quantize.nncf_int8(NncfInt8(model_type=""), model, job)
    assert record["steps"][0]["held_out_cosine_min"] < 0.9 <= record["steps"][-1]["held_out_cosine_min"]
    kept = record["kept_in_higher_precision"]
    assert len(kept) == record["steps"][-1]["kept"] == 1 and len(record["steps"]) == 2
    assert not set(kept) & set(ov_quantize.quantized_layers(quantized))  # kept out of INT8 in the final model

    model, job = _tiny_quantization_job(0.99)  # one step allowed, and one kept layer is not enough: refused
    with pytest.raises(ExportError, match=r"misses the budget.*after 1 accuracy-control step\(s\) keeping 1 of 2"):
        ov_quantize.nncf_int8(NncfInt8(model_type="", max_steps=1), model, job)
