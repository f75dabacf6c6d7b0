"""User models: `package.module:factory` plus a checkpoint, a signature and a `.npz` of data.

The checkpoint is loaded with `weights_only=True` (never an arbitrary unpickle), and the
signature is checked by running the model on the user's own data before anything is exported,
so that a mismatch is reported as such and not as an obscure ONNX failure later.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.core.errors import DataError, ModelSourceError, UsageError, one_line
from kiln.core.signature import NUMPY_DTYPES, Signature, TensorSpec, generated_arrays
from kiln.models.base import Dataset, ExportHints, ModelBundle, unsafe_pickle

if TYPE_CHECKING:
    from kiln.models.base import SourceRequest

LABELS_KEY = "labels"
MAX_CALIBRATION = 128


def is_factory_reference(text: str) -> bool:
    return ":" in text and not text.startswith(":") and not text.endswith(":")


def import_factory(reference: str):
    module_name, _, attr = reference.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's own package, run from their project folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(
            f"cannot import module {module_name!r} ({exc}); check --model package.module:factory "
            "and run from the folder that contains the package"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSourceError(f"{module_name!r} has no callable {attr!r}; --model must name a factory function")
    return factory


def build_module(reference: str, checkpoint: str | Path | None):
    import torch

    factory = import_factory(reference)
    try:
        module = factory()
    except Exception as exc:
        raise ModelSourceError(f"factory {reference!r} raised {type(exc).__name__}: {exc}; fix the factory") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelSourceError(f"factory {reference!r} returned {type(module).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelSourceError(f"checkpoint {str(path)!r} does not exist; pass --checkpoint FILE")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise unsafe_pickle(f"checkpoint {str(path)!r}", "save a plain state_dict with "
                                "torch.save(model.state_dict(), path), or the weights as safetensors") from None
        except Exception as exc:
            raise ModelSourceError(
                f"checkpoint {str(path)!r} cannot be loaded with weights_only=True ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); save it with torch.save(model.state_dict(), path)"
            ) from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelSourceError(f"checkpoint {str(path)!r} holds no state_dict; save model.state_dict()")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = one_line(exc, 300)
            raise ModelSourceError(
                f"checkpoint {str(path)!r} does not fit the model from {reference!r}: {first}; "
                "use the checkpoint saved from this architecture"
            ) from exc
    return module.eval()


def load_data(path: str | Path, signature: Signature) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass --data FILE.npz with one array per input")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise DataError(f"data file {str(path)!r} is not a readable .npz ({exc}); write it with numpy.savez") from exc
    inputs = {}
    for spec in signature.inputs:
        if spec.name not in arrays:
            raise DataError(
                f"data file {str(path)!r} has no array {spec.name!r} (it has {sorted(arrays)}); "
                "name one array after each input"
            )
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise UsageError(
                f"signature does not match the data: {spec} has rank {len(spec.shape)} but {spec.name!r} in "
                f"{path.name} has shape {list(array.shape)}; fix --input"
            )
        for dim, size in zip(spec.shape, array.shape):
            if isinstance(dim, int) and dim != size:
                raise UsageError(
                    f"signature does not match the data: {spec} but {spec.name!r} has shape {list(array.shape)}; fix --input"
                )
        if spec.numpy_dtype is None:
            raise UsageError(f"dtype {spec.dtype} is not supported for user models; use one of {', '.join(NUMPY_DTYPES)}")
        inputs[spec.name] = array.astype(spec.numpy_dtype, copy=False)
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1 or 0 in counts:
        raise DataError(f"the arrays in {str(path)!r} must all have the same, non-zero number of items")
    labels = arrays.get(LABELS_KEY)
    return Dataset(inputs, None if labels is None else np.asarray(labels).astype(np.int64))


GENERATED_NOTE = ("task accuracy: not measured (no --data); parity checked on inputs generated from the signature; "
                  "INT8 is dynamic (static INT8 needs real calibration data)")
GENERATED_ITEMS = 64
SYMBOLIC_SIZE = 16  # the size given to a symbolic dimension other than the batch


def generated_data(signature: Signature, items: int = GENERATED_ITEMS, seed: int = 0) -> Dataset:
    """Inputs made from the signature alone, as Optimum exports without data (kiln.core.signature)."""
    return Dataset(generated_arrays(signature, items, seed, SYMBOLIC_SIZE), None)


def check_signature(module, signature: Signature, data: Dataset) -> None:
    """Run the model on two items: a failure here means the signature does not fit the model."""
    import torch

    sample = data.take(slice(0, 2))
    args = [torch.from_numpy(np.ascontiguousarray(sample.inputs[n])) for n in signature.input_names]
    try:
        with torch.inference_mode():
            out = module(*args)
    except Exception as exc:
        raise UsageError(
            f"signature does not match the model: running it on inputs {signature.input_names} raised "
            f"{type(exc).__name__}: {one_line(exc, 200)}; fix --input"
        ) from exc
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outputs) != len(signature.outputs):
        raise UsageError(
            f"the model returns {len(outputs)} output(s) but the signature names {len(signature.outputs)}; "
            "fix --output"
        )


def load(reference: str, checkpoint: str | Path | None, inputs: list[str], outputs: list[str] | None,
         data: str | Path | None, name: str | None = None) -> ModelBundle:
    if not is_factory_reference(reference):
        raise UsageError(f"{reference!r} is neither a zoo name nor package.module:factory")
    if not inputs:
        raise UsageError("a user model needs its signature: --input name:dtype[dims] (e.g. x:float32[batch,3,32,32])")
    input_specs = tuple(TensorSpec.parse(s) for s in inputs)
    output_specs = tuple(TensorSpec.parse(s) if "[" in s else TensorSpec(s, "float32", ("batch",))
                         for s in (outputs or ["output"]))
    signature = Signature(input_specs, output_specs)
    module = build_module(reference, checkpoint)
    dataset = load_data(data, signature) if data is not None else generated_data(signature)
    check_signature(module, signature, dataset)
    count = len(dataset)
    calib_count = min(MAX_CALIBRATION, max(1, count // 2)) if count > 1 else 1
    evaluation = dataset.take(slice(calib_count, None)) if count > calib_count else dataset
    task = "classification" if dataset.labels is not None else "regression"
    default_name = reference.partition(":")[0].rsplit(".", 1)[-1]
    return ModelBundle(
        name=name or default_name,
        module=module,
        signature=signature,
        task=task,
        source={
            "factory": reference,
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "inputs": [str(s) for s in input_specs],
            "outputs": [str(s) for s in output_specs],
            "data": None if data is None else str(Path(data).resolve()),
        },
        calibration=dataset.take(slice(0, calib_count)),
        evaluation=evaluation,
        training=None,
        preprocessing={"kind": "tensor"},
        # Static INT8 calibrates activation ranges on real data; generated inputs would calibrate the wrong ranges.
        hints=ExportHints(int8_mode="static" if data is not None else "dynamic"),
        data_note=None if data is not None else GENERATED_NOTE,
    )


class FactorySource:
    """`package.module:factory` plus a checkpoint, a signature and data, from the user's own code."""

    key = "factory"

    def claims(self, reference: str) -> bool:
        return is_factory_reference(reference)

    def load(self, request: "SourceRequest") -> ModelBundle:
        if request.task:
            raise UsageError("--task applies to a Hugging Face model folder; a factory model's task comes from its "
                             "data (labels: classification)")
        return load(request.reference, request.checkpoint, list(request.inputs), list(request.outputs) or None,
                    request.data, name=request.name)

    def rebuild(self, recorded: dict) -> ModelBundle:
        return load(recorded["factory"], recorded.get("checkpoint"), recorded.get("inputs") or [],
                    recorded.get("outputs"), recorded.get("data"))
