"""Unit tier: kiln.core.signature (tensor specs, the dtype table, signatures as JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.core.errors import UsageError
from kiln.core.signature import (
    DTYPE_TABLE,
    DTYPES,
    NUMPY_DTYPES,
    V2_DATATYPES,
    Signature,
    TensorSpec,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("image:float32[batch,1,28,28]", TensorSpec("image", "float32", ("batch", 1, 28, 28))),
    ("  input_ids:int64[ batch , sequence ]  ", TensorSpec("input_ids", "int64", ("batch", "sequence"))),
    ("_x.y:bool[3]", TensorSpec("_x.y", "bool", (3,))),
    ("scalar:float16[]", TensorSpec("scalar", "float16", ())),
    ("t:string[batch]", TensorSpec("t", "string", ("batch",))),
    ("m:bfloat16[batch,,4]", TensorSpec("m", "bfloat16", ("batch", 4))),  # empty dims are skipped
])
def test_parse_good_specs(text, expected):
    spec = TensorSpec.parse(text)
    assert spec == expected
    assert TensorSpec.parse(str(spec)) == spec  # str() is the parseable form


@pytest.mark.parametrize("text", [
    "",
    "image",
    "image:float32",
    "image[1]",
    "image:float32(1)",
    "image:FLOAT32[1]",       # dtypes are lower case
    "image:float64[1]",       # not in the table
    "image:float32[1]extra",
    "9image:float32[1]",      # name must not start with a digit
    "my-image:float32[1]",
    "x:float32[0]",           # dims are positive
    "x:float32[1]:int64[1]",
])
def test_parse_rejects_bad_specs(text):
    with pytest.raises(UsageError):
        TensorSpec.parse(text)


def test_parse_error_shows_the_expected_form():
    with pytest.raises(UsageError, match=r"name:dtype\[dims\]"):
        TensorSpec.parse("image")


@pytest.mark.parametrize("dtype", ["float64", "int8", "uint8", "", "Float32"])
def test_constructor_rejects_unknown_dtypes_naming_the_known_ones(dtype):
    with pytest.raises(UsageError, match="unknown") as info:
        TensorSpec("x", dtype, (1,))
    for known in DTYPES:
        assert known in str(info.value)


@pytest.mark.parametrize("dim", [0, -1, True, False, 1.0, None, b"batch"])
def test_constructor_rejects_bad_dims(dim):
    with pytest.raises(UsageError, match="must be a positive int"):
        TensorSpec("x", "float32", ("batch", dim))


@pytest.mark.parametrize("name", ["", "1x", "a b", "a-b", "é"])
def test_constructor_rejects_bad_names(name):
    with pytest.raises(UsageError, match="not an identifier"):
        TensorSpec(name, "float32", (1,))


def test_dtype_table_is_the_single_source():
    assert tuple(DTYPE_TABLE) == DTYPES
    assert all(name == entry.name for name, entry in DTYPE_TABLE.items())
    assert {name: entry.v2 for name, entry in DTYPE_TABLE.items()} == V2_DATATYPES
    assert set(V2_DATATYPES) == set(DTYPES)
    assert len(set(V2_DATATYPES.values())) == len(V2_DATATYPES)  # the V2 wire names are unambiguous
    # numpy has no bfloat16 or string type: those are left out, every other dtype is there.
    assert set(NUMPY_DTYPES) == {n for n, e in DTYPE_TABLE.items() if e.numpy is not None}
    assert set(DTYPES) - set(NUMPY_DTYPES) == {"bfloat16", "string"}
    for name, numpy_type in NUMPY_DTYPES.items():
        # the numpy type is the one the signature name says
        assert np.dtype(numpy_type) == np.dtype(name)


@pytest.mark.parametrize(("dtype", "v2", "numpy_type"), [
    ("float32", "FP32", np.float32),
    ("float16", "FP16", np.float16),
    ("bfloat16", "BF16", None),
    ("int64", "INT64", np.int64),
    ("int32", "INT32", np.int32),
    ("bool", "BOOL", np.bool_),
    ("string", "BYTES", None),
])
def test_tensor_spec_dtype_properties(dtype, v2, numpy_type):
    spec = TensorSpec("x", dtype, ("batch",))
    assert spec.v2_datatype == v2
    assert spec.numpy_dtype is numpy_type


def test_signature_round_trips_through_json():
    sig = Signature(
        (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("mask", "bool", ("batch", 7))),
        (TensorSpec("embedding", "float32", ("batch", 384)),),
    )
    data = sig.to_dict()
    assert data == {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                   {"name": "mask", "dtype": "bool", "shape": ["batch", 7]}],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 384]}],
    }
    again = Signature.from_dict(json.loads(json.dumps(data)))
    assert again == sig
    assert isinstance(again.inputs[0].shape, tuple)  # lists from JSON become tuples, so specs stay hashable
    assert again.input_names == ["input_ids", "mask"] and again.output_names == ["embedding"]
    assert str(again) == "inputs input_ids:int64[batch,sequence], mask:bool[batch,7] -> outputs embedding:float32[batch,384]"


def test_signature_from_dict_validates_its_specs():
    with pytest.raises(UsageError):
        Signature.from_dict({"inputs": [{"name": "x", "dtype": "float99", "shape": [1]}], "outputs": []})
    with pytest.raises(KeyError):
        Signature.from_dict({"inputs": []})
