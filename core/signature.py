"""Input/output signatures: the contract between an artifact, its runtime and the server.

A signature is what the manifest promises and what the server validates against, so it is
plain data (names, dtypes, shapes with symbolic dims) that round-trips through JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.core.errors import InvalidInput, UsageError


@dataclass(frozen=True)
class DType:
    """One dtype as every layer names it: the signature, numpy (None where numpy has no such type), V2 and Triton's
    model configuration (`kiln deploy triton`; V2's BYTES is TYPE_STRING there, so it is a column, not a rule)."""

    name: str
    numpy: Any
    v2: str
    triton: str


# The one dtype table: the signature, the runtimes, the server's validation, the V2 wire and Triton's config read it.
DTYPE_TABLE: dict[str, DType] = {d.name: d for d in (
    DType("float32", np.float32, "FP32", "TYPE_FP32"),
    DType("float16", np.float16, "FP16", "TYPE_FP16"),
    DType("bfloat16", None, "BF16", "TYPE_BF16"),
    DType("int64", np.int64, "INT64", "TYPE_INT64"),
    DType("int32", np.int32, "INT32", "TYPE_INT32"),
    DType("bool", np.bool_, "BOOL", "TYPE_BOOL"),
    DType("string", None, "BYTES", "TYPE_STRING"),
)}
DTYPES = tuple(DTYPE_TABLE)
V2_DATATYPES = {name: d.v2 for name, d in DTYPE_TABLE.items()}
NUMPY_DTYPES = {name: d.numpy for name, d in DTYPE_TABLE.items() if d.numpy is not None}
_SPEC = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.]*):(?P<dtype>[a-z0-9]+)\[(?P<dims>[^\]]*)\]$")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dims are ints (fixed) or strings (symbolic, such as `batch`)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not self.name or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", self.name):
            raise UsageError(f"tensor name {self.name!r} is not an identifier; use letters, digits and _")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r} of {self.name!r} is unknown; use one of {', '.join(DTYPES)}")
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim <= 0):
                raise UsageError(f"dim {dim!r} of {self.name!r} must be a positive int or a symbolic name")

    @classmethod
    def parse(cls, text: str) -> "TensorSpec":
        """Parse `name:dtype[dim,dim,...]`, e.g. `image:float32[batch,1,8,8]`."""
        match = _SPEC.match(text.strip())
        if not match:
            raise UsageError(
                f"input spec {text!r} is not of the form name:dtype[dims]; "
                "e.g. --input image:float32[batch,1,28,28]"
            )
        dims: list[int | str] = []
        for raw in filter(None, (d.strip() for d in match["dims"].split(","))):
            dims.append(int(raw) if raw.isascii() and raw.isdigit() else raw)
        return cls(match["name"], match["dtype"], tuple(dims))

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPES[self.dtype]

    @property
    def numpy_dtype(self) -> Any:
        """The numpy dtype arrays of this tensor travel as (None for strings and bfloat16)."""
        return NUMPY_DTYPES.get(self.dtype)

    def shape_problem(self, shape: Sequence[int]) -> str | None:
        """Why an array of `shape` cannot be this tensor (its rank, or a fixed dim), or None. The server's
        validation and `kiln.load(...).run` both ask here, so a caller hears the same reason from either."""
        got = [int(d) for d in shape]
        if len(got) != len(self.shape):
            return f"has shape {got}; {self.name!r} needs rank {len(self.shape)} ({list(self.shape)})"
        if any(isinstance(want, int) and have != want for have, want in zip(got, self.shape)):
            return f"has shape {got}; {self.name!r} needs {list(self.shape)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Signature":
        return cls(
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def __str__(self) -> str:
        return f"inputs {', '.join(map(str, self.inputs))} -> outputs {', '.join(map(str, self.outputs))}"


def check_arrays(signature: Signature, inputs: Any) -> None:
    """Raise InvalidInput unless `inputs` are exactly the signature's tensors, as numpy arrays of its dtypes and
    shapes (first axis: at least one item, the same count in each). A runtime would otherwise cast float64
    silently or fail with its own message; this names the input, the dtype and the shape it needs."""
    if not isinstance(inputs, Mapping):
        raise InvalidInput(f"run() takes a dict of named numpy arrays, not {type(inputs).__name__}; "
                           f"this model takes {', '.join(map(str, signature.inputs))}")
    names = signature.input_names
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise InvalidInput(f"inputs {sorted(inputs)} do not match the signature"
                           + (f": {missing} missing" if missing else "") + (f": {unknown} unknown" if unknown else "")
                           + f"; this model takes {', '.join(map(str, signature.inputs))}")
    counts = set()
    for spec in signature.inputs:
        array, want = inputs[spec.name], f"{spec.dtype} with shape {list(spec.shape)}"
        if not isinstance(array, np.ndarray):
            raise InvalidInput(f"input {spec.name!r} is a {type(array).__name__}; it must be a numpy array of {want} "
                               f"(np.asarray(x, np.{spec.dtype}))")
        if spec.numpy_dtype is not None and array.dtype != spec.numpy_dtype:
            raise InvalidInput(f"input {spec.name!r} is {array.dtype}; it must be {want} "
                               f"(cast it: x.astype(np.{spec.dtype}))")
        problem = spec.shape_problem(array.shape)
        if problem:
            raise InvalidInput(f"input {spec.name!r} {problem}; it must be {want}")
        if array.shape[0] < 1:
            raise InvalidInput(f"input {spec.name!r} holds no items; send at least one ({want})")
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise InvalidInput(f"the inputs hold different numbers of items ({sorted(counts)}); the first axis is the "
                           "batch and must agree")


def generated_arrays(signature: Signature, items: int, seed: int = 0, symbolic_size: int = 16) -> dict[str, Any]:
    """Inputs made from a signature alone: standard-normal floats, small non-negative integers (valid indices into
    most embeddings), random booleans; a symbolic dimension other than the batch gets `symbolic_size`."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}
    for spec in signature.inputs:
        shape = [items if i == 0 else (dim if isinstance(dim, int) else symbolic_size)
                 for i, dim in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        elif spec.dtype.startswith("int"):
            arrays[spec.name] = rng.integers(0, 100, shape).astype(spec.numpy_dtype)
        elif spec.dtype == "bool":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            raise UsageError(f"input {spec.name!r} ({spec.dtype}) cannot be generated; give real data")
    return arrays
