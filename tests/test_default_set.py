"""The recommended set is a proposal: a variant in it that misses its budget is left out with its reason (the
worst item's text included), the rest export; the same variant named by the user fails the export."""

from __future__ import annotations

import pytest
from test_hf_folder import save_tiny_classifier

from kiln.core.errors import VerificationError
from kiln.core.manifest import read_manifest
from kiln.export.pipeline import droppable, run_export
from kiln.export.recipe import Recipe, Tolerances
from kiln.export.variants import VARIANTS
from kiln.models import hf_folder

pytestmark = pytest.mark.slow  # real ONNX exports

# No INT8 variant reaches a cosine of 1.0: the budget is impossible on purpose, to make it miss.
IMPOSSIBLE = Tolerances(int8_cosine_min=1.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return hf_folder.load(save_tiny_classifier(tmp_path_factory.mktemp("hf") / "tiny"))


def test_a_recommended_variant_that_misses_its_budget_is_left_out_with_its_reason(bundle, tmp_path):
    variants = ("onnx-fp32", "onnx-int8")
    recipe = Recipe(variants=variants, optional_variants=variants, tolerances=IMPOSSIBLE)
    lines: list[str] = []
    manifest = run_export(bundle, recipe, tmp_path / "out", progress=lines.append)
    assert manifest.variant_names == ["onnx-fp32"]
    assert not (tmp_path / "out" / "onnx-int8.onnx").exists()
    (left,) = read_manifest(tmp_path / "out").skipped
    assert left["variant"] == "onnx-int8" and left["reason"].startswith("failed verification: onnx-int8: cosine_min")
    assert "worst item #" in left["reason"]  # the text it was worst on, quoted
    assert "--data with your own texts" in left["reason"] and "int8_cosine_min" in left["reason"]
    assert any(line.startswith("[kiln] left out: onnx-int8") for line in lines)


def test_a_variant_the_user_named_still_fails_the_export(bundle, tmp_path):
    recipe = Recipe(variants=("onnx-fp32", "onnx-int8"), tolerances=IMPOSSIBLE)  # named: nothing optional
    with pytest.raises(VerificationError, match=r"onnx-int8: cosine_min .*\(worst item #"):
        run_export(bundle, recipe, tmp_path / "out", progress=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_only_lossy_or_pruned_variants_may_be_dropped():
    assert not droppable(VARIANTS["onnx-fp32"]) and not droppable(VARIANTS["pt2-fp32"])
    assert droppable(VARIANTS["onnx-int8"]) and droppable(VARIANTS["pt2-bf16"])
    assert droppable(VARIANTS["pruned-onnx-fp32"])
