"""NNCF static INT8 for OpenVINO models, with a bounded accuracy control judged by kiln's own metric.

Plain `nncf.quantize` first. Its accuracy is judged as the export's verification judges it (the worst cosine
between the quantized and the fp32 outputs, `kiln.export.verify.compare`), but on calibration items the
quantizer was NOT fitted on: the calibration set is split in two halves, quantized on one and judged on the
other (one fold, not two: each step is then one quantization, and the estimate is a little pessimistic, fitted
on half the items the final model is fitted on). Judged on its own calibration items the MiniLM model looked fine (worst cosine 0.996) while held-out
sentences fell to 0.979. Where the held-out worst cosine misses the variant's budget, the quantized layers (MatMul,
convolution) are ranked by what each costs (its activation quantizer removed, the rest kept, judged on the held-out fold), and the
worst are kept in higher precision (NNCF's `ignored_scope`) a few at a time, for at most `max_steps` steps: a
bounded search, seconds per step, where NNCF's own `quantize_with_accuracy_control` ran for minutes. The final
model is quantized on the whole calibration set with the chosen scope; the manifest records the layers kept, the
steps and the quantizer's settings. Where no step reaches the budget, the variant is refused with the reason (a
recommended one is then left out, kiln.export.pipeline).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.core.errors import ExportError, ToolchainMissing
from kiln.core.runtimes.openvino import telemetry_off
from kiln.export import precision, verify
from kiln.export.precision import InferencePrecision, NncfInt8

if TYPE_CHECKING:
    from kiln.export.emitter import EmitJob

FOLD_MIN_ITEMS = 4  # fewer calibration items than this: judged on the items it was fitted on (said so)


@contextlib.contextmanager
def quiet(nncf: Any) -> Iterator[None]:
    """NNCF logs every layer it leaves out at INFO and draws progress bars: kiln's output stays kiln's own."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@precision.register(InferencePrecision)
def precision_hint(config: InferencePrecision, model: Any, job: "EmitJob") -> tuple[Any, None]:
    """Nothing to transform: the precision is the CPU plugin's hint, which the emitter records in the IR."""
    return model, None


def run_model(core: Any, model: Any, inputs: dict[str, np.ndarray], hint: str, threads: int | None = None,
              batch: int = 32) -> np.ndarray:
    """The model's first output over `inputs`, compiled as kiln's runtime compiles it."""
    from kiln.core.machine import default_threads
    from kiln.core.runtimes.openvino import compile_config

    compiled = core.compile_model(model, "CPU", compile_config(threads or default_threads(), hint))
    request = compiled.create_infer_request()
    count = len(next(iter(inputs.values())))
    pieces = []
    for start in range(0, count, batch):
        result = request.infer({k: v[start:start + batch] for k, v in inputs.items()})
        pieces.append(np.array(result[compiled.output(0)], copy=True))
    return np.concatenate(pieces)


QUANTIZABLE = ("MatMul", "Convolution", "GroupConvolution")  # the layers NNCF quantizes that accuracy control ranks


def quantized_layers(model: Any) -> list[str]:
    """The layers NNCF quantized: those with a FakeQuantize on an activation input."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in QUANTIZABLE
            and any(fake_quantized_activation(op, i) is not None for i in range(op.get_input_size()))]


def fake_quantized_activation(op: Any, index: int) -> Any | None:
    source = op.input_value(index).get_node()
    if source.get_type_name() == "FakeQuantize" and source.input_value(0).get_node().get_type_name() != "Constant":
        return source
    return None


def without_activation_quantizers(model: Any, name: str) -> Any:
    """A copy of the quantized model whose layer `name` takes its activations unquantized (weights stay int8)."""
    copy = model.clone()
    op = next(o for o in copy.get_ordered_ops() if o.get_friendly_name() == name)
    for index in range(op.get_input_size()):
        fake = fake_quantized_activation(op, index)
        if fake is not None:
            op.input(index).replace_source_output(fake.input_value(0))
    return copy


@precision.register(NncfInt8)
def nncf_int8(config: NncfInt8, model: Any, job: "EmitJob") -> tuple[Any, dict[str, Any]]:
    telemetry_off()  # before NNCF is imported: it makes its telemetry object at import
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise ToolchainMissing(f"{job.spec.name} needs nncf, which is not installed; pip install 'kiln[export]', or "
                               "leave out ov-int8") from exc
    from kiln.core.machine import bf16_native

    started = time.perf_counter()
    core = ov.Core()
    bundle = job.bundle
    names = bundle.signature.input_names
    data = {k: np.ascontiguousarray(bundle.calibration.inputs[k]) for k in names}
    count = len(bundle.calibration)
    items = [{k: v[i:i + 1] for k, v in data.items()} for i in range(count)]
    floor = job.recipe.tolerances.cosine_min("int8")
    hint = "bf16" if bf16_native() else "f32"  # as kiln's runtime will run it here
    model_type = nncf.ModelType.TRANSFORMER if config.model_type == "transformer" else None
    reference = run_model(core, model, data, "f32")
    indices = np.arange(count)
    fit, judged = (indices[indices % 2 == 0], indices[indices % 2 == 1]) if count >= FOLD_MIN_ITEMS \
        else (indices, indices)

    def quantize(rows: np.ndarray, kept: list[str]) -> Any:
        scope = nncf.IgnoredScope(names=list(kept), validate=False) if kept else None
        with quiet(nncf):
            return nncf.quantize(model, nncf.Dataset([items[i] for i in rows]), model_type=model_type,
                                 subset_size=min(config.subset_size, len(rows)), ignored_scope=scope)

    def worst(quantized: Any, rows: np.ndarray) -> float:
        outputs = run_model(core, quantized, {k: v[rows] for k, v in data.items()}, hint)
        return float(verify.compare(reference[rows], outputs, None, bundle.task)["cosine_min"])

    def held_out(kept: list[str]) -> tuple[float, Any]:
        quantized = quantize(fit, kept)
        return worst(quantized, judged), quantized

    kept: list[str] = []
    score, fold_model = held_out(kept)
    steps = [{"kept": 0, "held_out_cosine_min": round(score, 6)}]
    ranking: list[str] = []
    if score < floor and config.max_steps > 0:
        candidates = quantized_layers(fold_model)
        costs = {name: worst(without_activation_quantizers(fold_model, name), judged) for name in candidates}
        ranking = sorted(candidates, key=lambda name: -costs[name])  # the biggest gain from keeping it first
        per_step = max(1, math.ceil(len(ranking) * config.fraction_per_step))
        for step in range(1, config.max_steps + 1):
            kept = ranking[:per_step * step]
            score, fold_model = held_out(kept)
            steps.append({"kept": len(kept), "held_out_cosine_min": round(score, 6)})
            if score >= floor or len(kept) == len(ranking):
                break
    record = {**config.record(), "calibration_items": count, "budget_cosine_min": floor,
              "validation": (f"worst cosine to fp32 on the {len(judged)} calibration items not fitted on (fitted on "
                             f"the other {len(fit)})" if count >= FOLD_MIN_ITEMS
                             else "worst cosine to fp32 on the calibration items (too few to hold any out)"),
              "steps": steps, "kept_in_higher_precision": kept, "higher_precision": hint,
              "nncf": nncf.__version__}
    if score < floor:
        raise ExportError(f"NNCF INT8 misses the budget: worst held-out cosine {score:.5f} < {floor} after "
                          f"{len(steps) - 1} accuracy-control step(s) keeping {len(kept)} of {len(ranking) or '?'} "
                          "quantized layers in higher precision")
    final = quantize(indices, kept)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return final, record
