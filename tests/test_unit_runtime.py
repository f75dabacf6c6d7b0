"""Unit tier: the runtime registry of kiln.core.runtime, its options and input casting (no artifact is opened)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kiln.core.errors import RuntimeUnavailable
from kiln.core.runtime import RuntimeOptions, RuntimeSpec, cast_inputs, registry, require_installed, runtime_spec
from kiln.core.signature import Signature, TensorSpec


def test_registry_finds_the_shipped_runtimes():
    found = registry()
    assert {"onnxruntime", "torchscript"} <= set(found)
    assert all(isinstance(spec, RuntimeSpec) and spec.name == name for name, spec in found.items())
    assert found["onnxruntime"].suffix == ".onnx" and found["onnxruntime"].v2_platform == "onnxruntime_onnx"
    assert found["torchscript"].suffix == ".pt" and found["torchscript"].v2_platform == "pytorch_torchscript"
    assert found["onnxruntime"].requires == "onnxruntime" and found["torchscript"].requires == "torch"
    assert all(callable(spec.open) and "cpu" in spec.devices for spec in found.values())
    assert registry() is found  # found once


def test_runtime_spec_by_name():
    assert runtime_spec("onnxruntime") is registry()["onnxruntime"]
    assert require_installed("torchscript", "torchscript-fp32") is registry()["torchscript"]


def test_unknown_runtime_names_the_known_ones():
    with pytest.raises(RuntimeUnavailable, match="the manifest names runtime 'nope'") as info:
        runtime_spec("nope")
    assert "onnxruntime" in str(info.value) and "torchscript" in str(info.value)
    with pytest.raises(RuntimeUnavailable, match="variant 'tflite-fp32' needs runtime 'tflite'"):
        runtime_spec("tflite", "tflite-fp32")
    with pytest.raises(RuntimeUnavailable):
        require_installed("nope", "x")


def test_installed_reflects_the_module():
    spec = registry()["onnxruntime"]
    assert spec.installed
    missing = RuntimeSpec(name="ghost", suffix=".g", requires="kiln_no_such_module_xyz", v2_platform="g",
                          open=spec.open)
    assert not missing.installed


def test_resolved_threads():
    assert RuntimeOptions(threads=3).resolved_threads == 3
    assert RuntimeOptions().resolved_threads == len(os.sched_getaffinity(0))
    assert RuntimeOptions(threads=0).resolved_threads == len(os.sched_getaffinity(0))  # 0: no choice made
    assert RuntimeOptions().device == "cpu"


SIGNATURE = Signature(
    (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("scale", "float32", ("batch",)),
     TensorSpec("text", "string", ("batch",))),
    (TensorSpec("out", "float32", ("batch",)),),
)


def test_cast_inputs_orders_and_casts_to_the_signature():
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    scale = np.arange(8, dtype=np.float64)[::4]  # non-contiguous, wrong dtype
    text = np.array(["a", "b"], dtype=object)
    arrays = cast_inputs(SIGNATURE, {"text": text, "scale": scale, "input_ids": ids, "ignored": np.zeros(1)})
    assert len(arrays) == 3
    assert arrays[0].dtype == np.int64 and arrays[0].tolist() == ids.tolist()
    assert arrays[1].dtype == np.float32 and arrays[1].flags.c_contiguous and arrays[1].tolist() == [0.0, 4.0]
    assert arrays[2] is text  # no numpy dtype (string): passed through as given


def test_cast_inputs_accepts_lists_and_raises_on_a_missing_input():
    arrays = cast_inputs(SIGNATURE, {"input_ids": [[1]], "scale": [0.5], "text": ["x"]})
    assert arrays[0].dtype == np.int64 and arrays[1].dtype == np.float32
    with pytest.raises(KeyError, match="scale"):
        cast_inputs(SIGNATURE, {"input_ids": np.ones((1, 2), dtype=np.int64), "text": np.array(["a"])})
