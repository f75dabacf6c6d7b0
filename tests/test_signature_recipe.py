import pytest

from kiln.core.errors import RecipeError, UsageError
from kiln.core.signature import Signature, TensorSpec
from kiln.export.recipe import PruneConfig, Recipe, Tolerances


def test_tensor_spec_parses_symbolic_and_fixed_dims():
    spec = TensorSpec.parse("image:float32[batch, 1, 8, 8]")
    assert spec == TensorSpec("image", "float32", ("batch", 1, 8, 8))
    assert str(spec) == "image:float32[batch,1,8,8]"
    assert spec.v2_datatype == "FP32"


@pytest.mark.parametrize("text", ["image", "image:float32", "image:float99[1]", "1x:float32[1]", "x:float32[0]"])
def test_tensor_spec_rejects_bad_specs(text):
    with pytest.raises(UsageError):
        TensorSpec.parse(text)


def test_signature_round_trips():
    sig = Signature((TensorSpec("a", "int64", ("batch", "sequence")),), (TensorSpec("b", "float32", ("batch", 4)),))
    assert Signature.from_dict(sig.to_dict()) == sig


def test_recipe_checks_itself():
    with pytest.raises(RecipeError, match="unknown variant"):
        Recipe(variants=("onnx-fp64",))
    with pytest.raises(RecipeError, match="names no variants"):
        Recipe(variants=())
    with pytest.raises(RecipeError, match="between 0 and 1"):
        PruneConfig(amount=1.5)
    with pytest.raises(RecipeError):
        Tolerances(int8_cosine_min=2.0)
    with pytest.raises(RecipeError, match="opset"):
        Recipe(variants=("onnx-fp32",), opset=5)


def test_recipe_from_toml_with_overrides(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('variants = ["onnx-fp32", "pruned-onnx-int8"]\nopset = 18\n[prune]\namount = 0.25\n'
                    '[tolerances]\nint8_accuracy_drop = 0.5\n')
    recipe = Recipe.from_toml(path)
    assert recipe.variants == ("onnx-fp32", "pruned-onnx-int8")
    assert recipe.prune.amount == 0.25 and recipe.opset == 18
    assert recipe.tolerances.int8_accuracy_drop == 0.5
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path.write_text("variantz = []\n")
    with pytest.raises(RecipeError, match="unknown recipe key"):
        Recipe.from_toml(path)
    path.write_text("variants = [\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml(path)


def test_export_select_without_budgets_chooses_as_bench_select_does():
    """`kiln export --select` hands the recipe's budgets to choose(); unset, they must mean choose's own per-task
    defaults, or a classifier's fine-tuned pruned variant (low cosine to eager, accuracy within budget) is refused."""
    from pathlib import Path

    from kiln.bench.select import choose
    from kiln.core.manifest import Manifest
    from kiln.models.digits import SIGNATURE

    recipe = Recipe(variants=("onnx-fp32", "pruned-onnx-int8"), select=True)
    manifest = Manifest(folder=Path("."), model="digits", task="classification", signature=SIGNATURE,
                        preprocessing={}, variants=[], default_variant="onnx-fp32", reference={"accuracy": 0.9911})
    report = {"settings": {"threads": 1}, "machine": {"cpu_model": "cpu"}, "results": [
        {"variant": "onnx-fp32", "batch_size": 16, "p50_ms": 10.0, "speedup_vs_eager": 2.4, "accuracy": 0.9911, "cosine_min": 1.0},
        {"variant": "pruned-onnx-int8", "batch_size": 16, "p50_ms": 2.7, "speedup_vs_eager": 9.5, "accuracy": 0.9933, "cosine_min": 0.9426}]}
    selection = choose(manifest, report, 16, recipe.max_accuracy_drop, recipe.min_cosine)
    assert selection["default_variant"] == "pruned-onnx-int8" and "min_cosine" not in selection["budget"]
    strict = choose(manifest, report, 16, recipe.max_accuracy_drop, 0.99)  # a cosine given is an extra condition
    assert strict["default_variant"] == "onnx-fp32"
