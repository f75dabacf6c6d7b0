"""Request and response shapes: the simple `/predict` form and the Open Inference Protocol (KServe V2).

Everything a client sends is checked here against the manifest's signature, before it can reach
a model: a bad request becomes a `RequestError` (a 4xx with a JSON body that names the problem and
the expected signature), never an exception inside the runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.core.signature import NUMPY_DTYPES, Signature, TensorSpec
from kiln.serve.kinds import ModelKind, kind_for

MAX_TEXT_CHARS = 20_000


class RequestError(Exception):
    """A client mistake: carries the HTTP status and a JSON-able body."""

    def __init__(self, message: str, status: int = 422, expected: Any = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.expected = expected
        self.param = param  # the request field at fault, and a stable code: protocols that name them (OpenAI) do
        self.code = code
        self.model: str | None = None  # the served model the request reached, where it reached one (metrics)
        self.retry_after = retry_after  # seconds a client should wait before retrying (429, 503): Retry-After

    def __reduce__(self) -> tuple:  # crosses the process boundary of serve.offload whole (Exception pickles args only)
        return _rebuild_error, (str(self), self.status, self.expected, self.param, self.code, self.model,
                                self.retry_after)

    @property
    def retry_after_header(self) -> str | None:
        """Retry-After's value (whole seconds, at least 1), or None where the refusal has no retry hint."""
        return None if self.retry_after is None else retry_after_value(self.retry_after)

    def body(self) -> dict:
        body: dict = {"error": str(self)}
        if self.expected is not None:
            body["expected"] = self.expected
        return body


def retry_after_value(seconds: float) -> str:
    """A Retry-After value (HTTP header, gRPC trailing metadata): whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _rebuild_error(message: str, status: int, expected: Any, param: str | None, code: str | None,
                   model: str | None, retry_after: float | None = None) -> RequestError:
    error = RequestError(message, status, expected, param, code, retry_after)
    error.model = model
    return error


@dataclass(frozen=True)
class ServedModel:
    """What the server exposes: the manifest's signature, with text models taking raw strings."""

    name: str
    task: str
    signature: Signature
    text: bool
    max_items: int  # items per request (--max-items)
    version: str = "1"
    platform: str = ""
    max_batch_items: int | None = None  # items per batch (--max-batch-items): no larger request could ever run
    labels: tuple[str, ...] = ()  # a text classifier's class names (the manifest's preprocessing)
    # Which variant is served and why (V2 metadata `parameters`, `kiln_info`): variant, how (default, forced,
    # chosen, cached, fallback), reason.
    served_variant: dict[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def request_limit(self) -> int:
        """Items one request may hold: --max-items, or the batch cap where that is smaller."""
        return min(self.max_items, self.max_batch_items or self.max_items)

    def too_many(self, where: str, count: int, noun: str, expected: Any) -> RequestError:
        limit = self.request_limit
        if limit < self.max_items:
            why = (f"a batch never exceeds {limit} items (--max-batch-items), so a larger request could never run; "
                   "split it")
        else:
            why = "send the rest in further requests (--max-items)"
        return RequestError(f"{where} holds {count} {noun}; at most {limit} per request: {why}", status=413,
                            expected=expected)

    # Cached: the request path reads these on every request, and they never change.
    @functools.cached_property
    def kind(self) -> ModelKind:
        """How `/predict` answers for this model's task (serve.kinds)."""
        return kind_for(self.task, self.labels)

    @functools.cached_property
    def v2_inputs(self) -> list[dict]:
        if self.text:
            return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        return [_v2_tensor(spec) for spec in self.signature.inputs]

    @functools.cached_property
    def v2_input_names(self) -> list[str]:
        return [t["name"] for t in self.v2_inputs]

    @functools.cached_property
    def v2_outputs(self) -> list[dict]:
        return [_v2_tensor(spec) for spec in self.signature.outputs] + self.kind.v2_extra_specs()

    @functools.cached_property
    def output_names(self) -> list[str]:
        """The signature's output names (Signature.output_names builds a new list each call; this is per request)."""
        return self.signature.output_names

    @functools.cached_property
    def extra_output_names(self) -> frozenset[str]:
        """The V2 outputs the model's kind adds (a text classifier's label and probabilities)."""
        return frozenset(t["name"] for t in self.kind.v2_extra_specs())

    @functools.cached_property
    def v2_output_names(self) -> list[str]:
        return [t["name"] for t in self.v2_outputs]

    @functools.cached_property
    def expected_v2(self) -> dict:
        return {"inputs": self.v2_inputs, "max_items": self.request_limit}

    @functools.cached_property
    def expected_predict(self) -> dict:
        if self.text:
            return {"text": "a sentence", "or": {"texts": ["a sentence", "another"]}, "max_items": self.request_limit}
        if len(self.signature.inputs) == 1:
            spec = self.signature.inputs[0]
            one = list(spec.shape[1:])
            return {spec.name: f"{spec.dtype} array of shape {one}",
                    "or": {"inputs": {spec.name: f"{spec.dtype} array of shape [n, {', '.join(map(str, one))}]"}},
                    "max_items": self.request_limit}
        return {"inputs": {s.name: f"{s.dtype}{list(s.shape)}" for s in self.signature.inputs},
                "max_items": self.request_limit}


def _v2_tensor(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.v2_datatype,
            "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


def _to_array(data: Any, spec: TensorSpec, where: str, expected: Any) -> np.ndarray:
    """Nested JSON lists -> a finite array of the spec's dtype, or a RequestError."""
    if not isinstance(data, list):
        raise RequestError(f"{where} must be a (nested) JSON array of numbers", expected=expected)
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise RequestError(f"{where} is ragged or not numeric ({exc})", expected=expected) from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise RequestError(f"{where} must hold numbers of one nesting depth", expected=expected)
    if array.dtype.kind == "b" and spec.dtype != "bool":
        raise RequestError(f"{where} holds booleans; {spec.name!r} takes {spec.dtype} numbers", expected=expected)
    # Cast once, to the dtype the runtime takes (it then uses the array as it is), and check what the cast made.
    target = NUMPY_DTYPES.get(spec.dtype)
    if spec.dtype.startswith("float"):
        # Checked after the cast: a finite JSON number past the dtype's range (1e300) becomes infinity there.
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(target or np.float32)
        if not np.all(np.isfinite(array)):
            raise RequestError(f"{where} holds NaN, infinity or a number beyond {spec.dtype}'s range, which "
                               f"{spec.name!r} does not allow", expected=expected)
    elif spec.dtype == "bool":
        # The rule binary BOOL data follows (serve.v2_binary.read_array): each element false or true, 0 or 1.
        if array.dtype.kind == "f" or (array.dtype.kind in "iu" and array.size
                                       and (array.max() > 1 or array.min() < 0)):
            raise RequestError(f"{where} must hold booleans (true/false or 0/1) for {spec.name!r}",
                               expected=expected)
        array = array.astype(np.bool_)
    elif spec.dtype.startswith("int"):
        if array.dtype.kind == "f":
            raise RequestError(f"{where} must hold integers for {spec.name!r} ({spec.dtype})", expected=expected)
        limits = np.iinfo(target or np.int64)
        if array.size and (array.max() > limits.max or array.min() < limits.min):
            raise RequestError(f"{where} holds an integer beyond {spec.dtype}'s range", expected=expected)
        array = array.astype(target or np.int64)
    return array


def conform(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Accept items that differ from the signature only by dims of size 1 (an 8x8 image for [1, 8, 8])."""
    item_dims = spec.shape[1:]
    if array.ndim < 1 or array.ndim == len(spec.shape) or not all(isinstance(d, int) for d in item_dims):
        return array
    if tuple(d for d in array.shape[1:] if d != 1) == tuple(d for d in item_dims if d != 1):
        return array.reshape((array.shape[0], *item_dims))
    return array


def check_shape(array: np.ndarray, spec: TensorSpec, where: str, model: ServedModel, expected: Any) -> None:
    problem = spec.shape_problem(array.shape)  # the rule kiln.load's runtimes check too (core.signature)
    if problem:
        raise RequestError(f"{where} {problem}", expected=expected)
    shape = array.shape
    if shape[0] < 1:
        raise RequestError(f"{where} holds no items; send at least one", expected=expected)
    if shape[0] > model.request_limit:
        raise model.too_many(where, shape[0], "items", expected)


def check_texts(texts: Any, where: str, model: ServedModel, expected: Any) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise RequestError(f"{where} must be a non-empty list of strings", expected=expected)
    if len(texts) > model.request_limit:
        raise model.too_many(where, len(texts), "texts", expected)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"{where}[{i}] is {type(text).__name__}, not a string", expected=expected)
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(f"{where}[{i}] has {len(text)} characters; at most {MAX_TEXT_CHARS}", status=413,
                               expected=expected)
        if "\x00" in text:
            raise RequestError(f"{where}[{i}] contains a NUL character", expected=expected)
    return texts


@dataclass
class InferenceRequest:
    """A validated request: either named arrays (first axis = items) or texts."""

    arrays: dict[str, np.ndarray] | None
    texts: list[str] | None
    count: int
    single: bool  # answer with one item rather than a list
    requested_outputs: list[str] | None = None
    request_id: str | None = None
    tokens: int | None = None  # set from the worker's Result for text models (OpenAI `usage`)
    encoding: str = "float"  # OpenAI `encoding_format`: float or base64
    binary_outputs: frozenset[str] = frozenset()  # V2 outputs answered as raw bytes (the binary tensor extension)


def parse_predict(body: Any, model: ServedModel) -> InferenceRequest:
    expected = model.expected_predict
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", expected=expected)
    if model.text:
        if "text" in body and "texts" not in body:
            text = body["text"]
            return InferenceRequest(None, check_texts([text], "'text'", model, expected), 1, True)
        if "texts" in body and "text" not in body:
            texts = check_texts(body["texts"], "'texts'", model, expected)
            return InferenceRequest(None, texts, len(texts), False)
        raise RequestError("send exactly one of 'text' (a string) or 'texts' (a list of strings)", expected=expected)
    specs = model.signature.inputs
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            raise RequestError("'inputs' must be an object of named arrays", expected=expected)
        single = False
    elif len(specs) == 1 and specs[0].name in body:
        inputs = {specs[0].name: [body[specs[0].name]]}
        single = True
    else:
        raise RequestError(f"send {specs[0].name!r} (one item) or 'inputs' (a batch)", expected=expected)
    unknown = sorted(set(inputs) - {s.name for s in specs})
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; this model takes {[s.name for s in specs]}", expected=expected)
    arrays = {}
    for spec in specs:
        if spec.name not in inputs:
            raise RequestError(f"input {spec.name!r} is missing", expected=expected)
        array = conform(_to_array(inputs[spec.name], spec, f"input {spec.name!r}", expected), spec)
        check_shape(array, spec, f"input {spec.name!r}", model, expected)
        arrays[spec.name] = array
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise RequestError("all inputs must hold the same number of items", expected=expected)
    return InferenceRequest(arrays, None, counts.pop(), single)


def _binary_flag(parameters: Any, key: str, where: str, expected: Any) -> bool | None:
    """A boolean V2 parameter (`binary_data`, `binary_data_output`), or None where it is not given."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}: 'parameters' must be an object", expected=expected)
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{where}: parameters.{key} must be true or false", expected=expected)
    return value


def parse_v2(body: Any, model: ServedModel, section: Any = None) -> InferenceRequest:
    """A V2 inference request. `section` is the binary part of the body (serve.v2_binary.BinarySection) where the
    request used the binary tensor extension: inputs with `parameters.binary_data_size` take their bytes from it,
    in the order they are listed. Checked in this order, so the first fault found is the one a client is told:
    the body's shape, the requested outputs, the inputs listed, then each input's values."""
    expected = model.expected_v2
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with 'inputs'", expected=expected)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list of tensors", expected=expected)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string", expected=expected)
    requested, binary = _v2_outputs(body, model, expected)
    by_name, chunks = _v2_inputs(inputs, model, section, expected)
    if model.text:
        texts = _v2_texts(by_name["text"], chunks, model, section, expected)
        return InferenceRequest(None, texts, len(texts), False, requested, request_id, binary_outputs=binary)
    arrays = _v2_arrays(by_name, chunks, model, section, expected)
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise RequestError("all inputs must hold the same number of items", expected=expected)
    return InferenceRequest(arrays, None, counts.pop(), False, requested, request_id, binary_outputs=binary)


def _v2_outputs(body: dict, model: ServedModel, expected: Any) -> tuple[list[str] | None, frozenset[str]]:
    """The outputs a V2 request asks for (None: all), and those to be answered as binary tensors."""
    all_binary = bool(_binary_flag(body.get("parameters"), "binary_data_output", "the request", expected))
    requested = None
    binary_outputs: set[str] = set()
    if "outputs" in body:
        outs = body["outputs"]
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
            raise RequestError("'outputs' must be a list of {name}", expected=expected)
        requested = [o["name"] for o in outs]
        unknown = sorted(set(requested) - set(model.v2_output_names))
        if unknown:
            raise RequestError(f"unknown output(s) {unknown}; this model has {model.v2_output_names}",
                               expected=expected)
        for out in outs:
            flag = _binary_flag(out.get("parameters"), "binary_data", f"output {out['name']!r}", expected)
            if flag or (flag is None and all_binary):
                binary_outputs.add(out["name"])
    elif all_binary:
        binary_outputs = set(model.v2_output_names)
    return requested, frozenset(binary_outputs)


def _v2_inputs(inputs: list, model: ServedModel, section: Any, expected: Any) -> tuple[dict[str, dict], dict[str, Any]]:
    """The listed input tensors by name, each checked for its keys, and the binary-section bytes of those sent
    there; every model input is present and none other."""
    by_name: dict[str, dict] = {}
    chunks: dict[str, Any] = {}  # input name -> its bytes in the binary section
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise RequestError("each input must be an object {name, shape, datatype, data}", expected=expected)
        parameters = tensor.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        needed = ("name", "shape", "datatype") if size is not None else ("name", "shape", "datatype", "data")
        missing = [k for k in needed if k not in tensor]
        if missing:
            raise RequestError(f"an input lacks {missing}", expected=expected)
        name = tensor["name"]
        if not isinstance(name, str):
            raise RequestError("an input's 'name' must be a string", expected=expected)
        if name in by_name:
            raise RequestError(f"input {name!r} is given twice", expected=expected)
        if size is not None:
            if "data" in tensor:
                raise RequestError(f"input {name!r} has both 'data' and parameters.binary_data_size; send one",
                                   400, expected)
            if section is None:
                raise RequestError(f"input {name!r}: binary_data_size is given but the request has no binary "
                                   "section (send its JSON length in Inference-Header-Content-Length)", 400, expected)
            chunks[name] = section.take(size, f"input {name!r}")  # in list order, as the bytes follow the JSON
        by_name[name] = tensor
    if section is not None:
        section.finish()
    wanted = model.v2_input_names
    unknown = sorted(set(by_name) - set(wanted))
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; this model takes {wanted}", expected=expected)
    missing_inputs = [w for w in wanted if w not in by_name]
    if missing_inputs:
        raise RequestError(f"input(s) {missing_inputs} are missing", expected=expected)
    return by_name, chunks


def _v2_shape(tensor: dict, expected: Any) -> list[int]:
    shape = tensor["shape"]
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise RequestError(f"input {tensor['name']!r}: 'shape' must be a list of integers", expected=expected)
    if any(d < 0 for d in shape):
        raise RequestError(f"input {tensor['name']!r}: shape {shape} has a negative dimension", expected=expected)
    if math.prod(shape) > 64 * 1024 * 1024:
        raise RequestError(f"input {tensor['name']!r}: shape {shape} is too large", status=413, expected=expected)
    return shape


def _v2_texts(tensor: dict, chunks: dict[str, Any], model: ServedModel, section: Any, expected: Any) -> list[str]:
    """A text model's `text` input: BYTES of rank 1, as JSON strings or from the binary section."""
    if tensor["datatype"] != "BYTES":
        raise RequestError(f"input 'text' has datatype {tensor['datatype']!r}; it must be BYTES", expected=expected)
    shape = _v2_shape(tensor, expected)
    if len(shape) != 1:  # as check_shape refuses a wrong rank for every other input
        raise RequestError(f"input 'text' has shape {shape}; it needs rank 1 ([-1]: one string per item)",
                           expected=expected)
    if "text" in chunks:
        if math.prod(shape) > model.request_limit:
            raise model.too_many("input 'text'", math.prod(shape), "texts", expected)
        data = section.strings(chunks["text"], math.prod(shape), "input 'text'")
    else:
        data = _flatten(tensor["data"], "input 'text'", expected)
    if len(data) != math.prod(shape):
        raise RequestError(f"input 'text': shape {shape} needs {math.prod(shape)} strings but data has {len(data)}",
                           expected=expected)
    return check_texts(data, "input 'text'", model, expected)


def _v2_arrays(by_name: dict[str, dict], chunks: dict[str, Any], model: ServedModel, section: Any,
               expected: Any) -> dict[str, np.ndarray]:
    """A tensor model's inputs as arrays, in signature order, each checked against its spec."""
    arrays = {}
    for spec in model.signature.inputs:
        tensor = by_name[spec.name]
        where = f"input {spec.name!r}"
        if tensor["datatype"] != spec.v2_datatype:
            raise RequestError(
                f"input {spec.name!r} has datatype {tensor['datatype']!r}; it must be {spec.v2_datatype}",
                expected=expected)
        shape = _v2_shape(tensor, expected)
        # Checked before a value is converted: an 8 MiB body of zeros must not cost a parse of millions of numbers.
        if shape[0] > model.request_limit:
            raise model.too_many(where, shape[0], "items", expected)
        if spec.name not in chunks and isinstance(tensor["data"], list) and len(tensor["data"]) > math.prod(shape):
            raise RequestError(f"{where}: shape {shape} needs {math.prod(shape)} values but data has more",
                               expected=expected)
        if spec.name in chunks:
            array = _checked(section.array(chunks[spec.name], spec.v2_datatype, shape, where), spec, where, expected)
        else:
            flat = _flatten(tensor["data"], where, expected)
            if len(flat) != math.prod(shape):
                raise RequestError(f"{where}: shape {shape} needs {math.prod(shape)} values but data has {len(flat)}",
                                   expected=expected)
            array = _to_array(flat, spec, where, expected).reshape(shape)
        check_shape(array, spec, where, model, expected)
        arrays[spec.name] = array
    return arrays


def _checked(array: np.ndarray, spec: TensorSpec, where: str, expected: Any) -> np.ndarray:
    """Binary data gets the checks JSON numbers get: finite floats, and the dtype the runtime takes."""
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise RequestError(f"{where} holds NaN or infinity, which {spec.name!r} does not allow", expected=expected)
    target = NUMPY_DTYPES.get(spec.dtype)
    if target is not None and array.dtype != target:
        array = array.astype(target)
    return array


def _flatten(data: Any, where: str, expected: Any, depth: int = 0) -> list:
    """V2 allows row-major flat or nested data; depth is bounded against hostile nesting."""
    if not isinstance(data, list):
        raise RequestError(f"{where}: 'data' must be a JSON array", expected=expected)
    if depth > 8:
        raise RequestError(f"{where}: 'data' is nested too deeply", expected=expected)
    if all(not isinstance(x, list) for x in data):
        return data
    out: list = []
    for x in data:
        out.extend(_flatten(x, where, expected, depth + 1) if isinstance(x, list) else [x])
    return out


def v2_response(model: ServedModel, outputs: dict[str, np.ndarray], request: InferenceRequest) -> dict:
    names = request.requested_outputs or model.output_names
    tensors = []
    for spec in model.signature.outputs:
        if spec.name not in names:
            continue
        array = outputs[spec.name]
        tensors.append({"name": spec.name, "datatype": spec.v2_datatype, "shape": list(array.shape),
                        "data": np.ascontiguousarray(array).reshape(-1)})
    if model.extra_output_names and (not request.requested_outputs
                                     or not model.extra_output_names.isdisjoint(request.requested_outputs)):
        for extra in model.kind.v2_extra_outputs(outputs, model.output_names):
            if extra["name"] in names or not request.requested_outputs:
                tensors.append(extra)
    body = {"model_name": model.name, "model_version": model.version, "outputs": tensors}
    if request.request_id is not None:
        body["id"] = request.request_id
    return body


def predict_response(model: ServedModel, outputs: dict[str, np.ndarray], request: InferenceRequest) -> dict:
    """The `/predict` answer: shaped by the model's kind (serve.kinds), one item or a batch as the request was."""
    return model.kind.predict_response(outputs, model.output_names, request.single)
