"""Unit tier: kiln.bench.select.choose, the default-variant policy, on hand-built manifests and reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.bench.select import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_BATCH_INVARIANCE, DEFAULT_MIN_COSINE, choose
from kiln.core.errors import UsageError
from kiln.core.manifest import EAGER, Manifest, VariantEntry
from kiln.core.signature import Signature, TensorSpec

CLASSIFIER = Signature((TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
                       (TensorSpec("logits", "float32", ("batch", 10)),))
EMBEDDER = Signature((TensorSpec("input_ids", "int64", ("batch", "sequence")),),
                     (TensorSpec("embedding", "float32", ("batch", 384)),))


def variant(name: str, fmt: str = "onnx", precision: str = "fp32", pruned: bool = False) -> VariantEntry:
    return VariantEntry(name=name, file=f"{name}.bin", format=fmt, runtime="onnxruntime", precision=precision,
                        pruning={"method": "structured"} if pruned else None, quantization=None, bytes=1,
                        sha256="0" * 64)


def manifest(task: str = "classification", accuracy: float | None = 0.99, default: str = "onnx-int8",
             variants: list[VariantEntry] | None = None) -> Manifest:
    return Manifest(folder=Path("."), model="m", task=task,
                    signature=CLASSIFIER if task == "classification" else EMBEDDER, preprocessing={},
                    variants=variants if variants is not None else [], default_variant=default,
                    reference={"accuracy": accuracy} if accuracy is not None else {})


def row(name: str, p50: float, batch: int = 16, **figures) -> dict:
    return {"variant": name, "batch_size": batch, "p50_ms": p50, "speedup_vs_eager": 20.0 / p50, **figures}


def report(*rows: dict) -> dict:
    return {"settings": {"threads": 2}, "machine": {"cpu_model": "Test CPU"}, "results": list(rows)}


def test_fastest_within_the_accuracy_budget_is_chosen():
    bench = report(
        row(EAGER, 20.0, accuracy=0.99, cosine_min=1.0),
        row("onnx-fp32", 10.0, accuracy=0.99, cosine_min=1.0),
        row("pruned-onnx-fp32", 5.0, accuracy=0.987, cosine_min=0.97),  # 0.3 points down: within 0.5
        row("onnx-int8", 3.0, accuracy=0.97, cosine_min=0.999),         # 2 points down: out
        row("pruned-onnx-int8", 1.0, batch=1, accuracy=0.99, cosine_min=1.0),  # another batch size: not counted
    )
    selection = choose(manifest(), bench, 16)
    assert selection["chosen"] == selection["default_variant"] == "pruned-onnx-fp32"
    assert selection["budget"] == {"max_accuracy_drop": DEFAULT_MAX_ACCURACY_DROP,
                                   "min_accuracy": pytest.approx(0.99 - DEFAULT_MAX_ACCURACY_DROP / 100),
                                   "min_batch_invariance": DEFAULT_MIN_BATCH_INVARIANCE}
    assert set(selection["rejected"]) == {"onnx-int8"}
    assert "2.00 points below eager" in selection["rejected"]["onnx-int8"]
    assert selection["measured_p50_ms"] == {EAGER: 20.0, "onnx-fp32": 10.0, "pruned-onnx-fp32": 5.0, "onnx-int8": 3.0}
    assert selection["batch_size"] == 16 and selection["threads"] == 2 and selection["cpu_model"] == "Test CPU"
    assert "fastest of 2 variant(s)" in selection["reason"] and "p50 5.000 ms" in selection["reason"]
    assert selection["selected_at"].endswith("+00:00")


def test_eager_is_never_chosen_even_when_fastest():
    bench = report(row(EAGER, 0.5, accuracy=0.99, cosine_min=1.0), row("onnx-fp32", 10.0, accuracy=0.99, cosine_min=1.0))
    assert choose(manifest(), bench, 16)["chosen"] == "onnx-fp32"


def test_a_wider_accuracy_budget_admits_more():
    bench = report(row("onnx-fp32", 10.0, accuracy=0.99), row("onnx-int8", 3.0, accuracy=0.97))
    assert choose(manifest(), bench, 16, max_accuracy_drop=2.5)["chosen"] == "onnx-int8"
    assert choose(manifest(), bench, 16, max_accuracy_drop=0.0)["chosen"] == "onnx-fp32"


def test_accuracy_exactly_at_the_budget_fits():
    bench = report(row("onnx-int8", 3.0, accuracy=0.985))  # 0.99 - 0.5 points, up to float rounding
    assert choose(manifest(), bench, 16)["chosen"] == "onnx-int8"


def test_a_classifier_variant_without_accuracy_is_rejected():
    bench = report(row("onnx-fp32", 10.0, accuracy=0.99), row("onnx-int8", 3.0))
    selection = choose(manifest(), bench, 16)
    assert selection["chosen"] == "onnx-fp32"
    assert selection["rejected"] == {"onnx-int8": "no accuracy figure in the manifest"}


def test_a_min_cosine_given_to_a_classifier_is_an_extra_condition():
    bench = report(row("onnx-fp32", 10.0, accuracy=0.99, cosine_min=1.0),
                   row("pruned-onnx-int8", 2.0, accuracy=0.992, cosine_min=0.94))
    assert choose(manifest(), bench, 16)["chosen"] == "pruned-onnx-int8"
    strict = choose(manifest(), bench, 16, min_cosine=0.99)
    assert strict["chosen"] == "onnx-fp32"
    assert strict["budget"]["min_cosine"] == 0.99
    assert "cosine_min 0.94000 < 0.99" in strict["rejected"]["pruned-onnx-int8"]


def test_nothing_fits_keeps_the_fp32_default():
    variants = [variant("onnx-int8", precision="int8"), variant("torchscript-fp32", fmt="torchscript"),
                variant("onnx-fp32")]
    bench = report(row(EAGER, 20.0, accuracy=0.99), row("onnx-fp32", 10.0, accuracy=0.90),
                   row("onnx-int8", 3.0, accuracy=0.80))
    selection = choose(manifest(variants=variants, default="onnx-int8"), bench, 16)
    assert selection["chosen"] is None
    assert selection["default_variant"] == "onnx-fp32"  # the unpruned ONNX fp32, not the current default
    assert set(selection["rejected"]) == {"onnx-fp32", "onnx-int8"}
    assert "kept the fp32 default" in selection["reason"]


def test_nothing_fits_without_any_fp32_keeps_the_current_default():
    variants = [variant("onnx-int8", precision="int8"), variant("pruned-onnx-fp32", pruned=True)]
    bench = report(row("onnx-int8", 3.0, accuracy=0.5), row("pruned-onnx-fp32", 4.0, accuracy=0.5))
    selection = choose(manifest(variants=variants, default="pruned-onnx-fp32"), bench, 16)
    assert selection["chosen"] is None and selection["default_variant"] == "pruned-onnx-fp32"


def test_embedding_task_uses_min_cosine_099_by_default():
    bench = report(row(EAGER, 20.0, cosine_min=1.0),
                   row("onnx-fp32", 10.0, cosine_min=0.99999),
                   row("onnx-int8", 3.0, cosine_min=0.985),
                   row("onnx-int8-dynamic", 4.0, cosine_min=DEFAULT_MIN_COSINE),  # exactly at the budget fits
                   row("pruned-onnx-fp32", 2.0))
    selection = choose(manifest(task="embedding", accuracy=None), bench, 16)
    assert DEFAULT_MIN_COSINE == 0.99
    assert selection["budget"] == {"min_cosine": 0.99, "min_batch_invariance": DEFAULT_MIN_BATCH_INVARIANCE}
    assert selection["chosen"] == "onnx-int8-dynamic"
    assert selection["rejected"] == {"onnx-int8": "cosine_min 0.98500 < 0.99",
                                     "pruned-onnx-fp32": "no cosine_min figure in the manifest"}
    looser = choose(manifest(task="embedding", accuracy=None), bench, 16, min_cosine=0.98)
    assert looser["chosen"] == "onnx-int8"


def test_an_unmeasured_batch_size_is_a_usage_error():
    bench = report(row("onnx-fp32", 10.0, batch=1, accuracy=0.99), row("onnx-fp32", 12.0, batch=8, accuracy=0.99))
    with pytest.raises(UsageError, match="batch size 16 was not measured"):
        choose(manifest(), bench, 16)
    assert choose(manifest(), bench, 8)["chosen"] == "onnx-fp32"


def test_max_accuracy_drop_on_a_model_without_accuracy_is_a_usage_error():
    bench = report(row("onnx-fp32", 10.0, cosine_min=1.0))
    with pytest.raises(UsageError, match=r"has no accuracy figure.*--min-cosine"):
        choose(manifest(task="embedding", accuracy=None), bench, 16, max_accuracy_drop=1.0)
    # with a cosine budget given as well, the cosine budget applies
    selection = choose(manifest(task="embedding", accuracy=None), bench, 16, max_accuracy_drop=1.0, min_cosine=0.999)
    assert selection["budget"] == {"min_cosine": 0.999, "min_batch_invariance": DEFAULT_MIN_BATCH_INVARIANCE}
    assert selection["chosen"] == "onnx-fp32"


def test_batch_dependent_variants_are_rejected_below_the_invariance_budget():
    """A variant whose answers move with their batch is refused however fast; one never measured is not judged."""
    bench = report(row("onnx-fp32", 10.0, cosine_min=1.0, batch_invariance=1.0),
                   row("onnx-int8", 3.0, cosine_min=0.996, batch_invariance=0.9956),
                   row("pt2-int8", 4.0, cosine_min=0.996, batch_invariance=0.99999),
                   row("old-export", 5.0, cosine_min=1.0))
    selection = choose(manifest(task="embedding", accuracy=None), bench, 16)
    assert selection["chosen"] == "pt2-int8"
    assert "batch_invariance 0.995600 < 0.999" in selection["rejected"]["onnx-int8"]
    assert "old-export" not in selection["rejected"]
    loose = choose(manifest(task="embedding", accuracy=None), bench, 16, min_batch_invariance=0.99)
    assert loose["chosen"] == "onnx-int8"
