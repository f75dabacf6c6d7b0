"""`kiln.load(...).run` checks its inputs against the signature as the server does (core.signature.check_arrays).

The unit tier checks the rule on a signature alone; the slow test runs it through a real ONNX Runtime session of
the digits export, where a float64 array used to be cast silently and a wrong rank raised ONNX Runtime's own error.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.core.errors import InvalidInput, UsageError
from kiln.core.signature import Signature, TensorSpec, check_arrays

IMAGE = Signature((TensorSpec("image", "float32", ("batch", 1, 8, 8)),), (TensorSpec("logits", "float32", ("batch", 10)),))
TEXT = Signature((TensorSpec("input_ids", "int64", ("batch", "sequence")),
                  TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                 (TensorSpec("embedding", "float32", ("batch", 384)),))


def test_fitting_inputs_pass():
    check_arrays(IMAGE, {"image": np.zeros((4, 1, 8, 8), np.float32)})
    ids = np.ones((2, 7), np.int64)
    check_arrays(TEXT, {"input_ids": ids, "attention_mask": ids})


@pytest.mark.parametrize("inputs, words", [
    ({"image": np.zeros((4, 1, 8, 8))}, ["'image'", "float64", "float32", "['batch', 1, 8, 8]"]),
    ({"image": np.zeros((4, 8, 8), np.float32)}, ["'image'", "[4, 8, 8]", "rank 4", "float32"]),
    ({"image": np.zeros((4, 1, 8, 9), np.float32)}, ["'image'", "[4, 1, 8, 9]", "['batch', 1, 8, 8]"]),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, ["'image'", "no items"]),
    ({"image": [[0.0] * 8] * 8}, ["'image'", "list", "numpy array", "float32"]),
    ({"pixels": np.zeros((4, 1, 8, 8), np.float32)}, ["'image'", "missing", "'pixels'", "unknown"]),
    ({}, ["'image'", "missing", "image:float32[batch,1,8,8]"]),
    (np.zeros((4, 1, 8, 8), np.float32), ["dict", "image:float32[batch,1,8,8]"]),
])
def test_a_misfit_names_the_input_its_dtype_and_shape(inputs, words):
    with pytest.raises(InvalidInput) as caught:
        check_arrays(IMAGE, inputs)
    assert isinstance(caught.value, UsageError)  # a KilnError of the usage kind: the caller fixes the call
    for word in words:
        assert word in str(caught.value)


def test_inputs_must_agree_on_the_item_count():
    with pytest.raises(InvalidInput, match="different numbers of items"):
        check_arrays(TEXT, {"input_ids": np.ones((2, 7), np.int64), "attention_mask": np.ones((3, 7), np.int64)})
    with pytest.raises(InvalidInput, match="'attention_mask' is int32; it must be int64"):
        check_arrays(TEXT, {"input_ids": np.ones((2, 7), np.int64), "attention_mask": np.ones((2, 7), np.int32)})


def test_the_server_reports_shape_in_the_same_words():
    """serve.protocol.check_shape asks TensorSpec.shape_problem too: one rule, one wording."""
    from kiln.serve.protocol import RequestError, ServedModel, check_shape

    model = ServedModel("digits", "classification", IMAGE, text=False, max_items=64)
    spec = IMAGE.inputs[0]
    with pytest.raises(RequestError) as caught:
        check_shape(np.zeros((4, 8, 8), np.float32), spec, "input 'image'", model, None)
    assert str(caught.value) == f"input 'image' {spec.shape_problem((4, 8, 8))}"


@pytest.mark.slow
def test_kiln_load_refuses_what_onnx_runtime_would_cast_or_reject(digits_artifacts):
    import kiln

    runtime = kiln.load(digits_artifacts, "onnx-fp32", threads=1)
    good = np.zeros((4, 1, 8, 8), np.float32)
    assert runtime.run({"image": good})["logits"].shape == (4, 10)
    with pytest.raises(kiln.InvalidInput, match="'image' is float64; it must be float32 with shape"):
        runtime.run({"image": good.astype(np.float64)})
    with pytest.raises(kiln.KilnError, match=r"'image' has shape \[4, 8, 8\]; 'image' needs rank 4"):
        runtime.run({"image": good[:, 0]})
    assert runtime.variant == "onnx-fp32" and runtime.signature.input_names == ["image"]
