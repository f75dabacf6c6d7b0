"""Unit tier: kiln.export.recipe and kiln.export.variants (validation, TOML, flag overrides, the registry)."""

from __future__ import annotations

import dataclasses

import pytest

from kiln.core.errors import RecipeError, UsageError
from kiln.core.runtime import registry
from kiln.export.recipe import PruneConfig, Recipe, Tolerances, build_recipe
from kiln.export.variants import FORMATS, PRECISIONS, VARIANTS, VariantSpec, variant_spec


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"variants": ("onnx-fp64",)}, "unknown variant"),
    ({"variants": ("onnx-fp32", "bogus", "other")}, "bogus, other"),
    ({"variants": ()}, "names no variants"),
    ({"variants": ("onnx-fp32", "onnx-int8", "onnx-fp32")}, "named twice"),
    ({"variants": ("onnx-fp32",), "opset": 13}, "opset 13 is outside 14..21"),
    ({"variants": ("onnx-fp32",), "opset": 22}, "opset 22"),
    ({"variants": ("onnx-fp32",), "select_batch_size": 0}, "select_batch_size"),
    ({"variants": ("onnx-fp32",), "max_accuracy_drop": -0.1}, "max_accuracy_drop"),
    ({"variants": ("onnx-fp32",), "max_accuracy_drop": 100.5}, "max_accuracy_drop"),
    ({"variants": ("onnx-fp32",), "min_cosine": 1.01}, "min_cosine"),
    ({"variants": ("onnx-fp32",), "min_cosine": -1.5}, "min_cosine"),
])
def test_recipe_rejects_bad_values(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**kwargs)


@pytest.mark.parametrize("opset", [14, 17, 21])
def test_recipe_accepts_the_opset_range(opset):
    assert Recipe(variants=("onnx-fp32",), opset=opset).opset == opset


def test_recipe_accepts_budget_edges():
    recipe = Recipe(variants=("onnx-fp32",), max_accuracy_drop=0.0, min_cosine=-1.0)
    assert recipe.max_accuracy_drop == 0.0 and recipe.min_cosine == -1.0
    assert Recipe(variants=("onnx-fp32",), max_accuracy_drop=100.0, min_cosine=1.0).min_cosine == 1.0


def test_recipe_error_is_a_usage_error():
    with pytest.raises(UsageError):
        Recipe(variants=("nope",))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "random"}, "pruning method 'random'"),
    ({"amount": 0.0}, "between 0 and 1"),
    ({"amount": 1.0}, "between 0 and 1"),
    ({"amount": -0.2}, "between 0 and 1"),
    ({"fine_tune_epochs": -1}, "fine_tune_epochs"),
])
def test_prune_config_rejects_bad_values(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Tolerances)])
def test_tolerances_ranges(field):
    if field.endswith("cosine_min"):
        bad, good = (1.0001, -1.0001), (-1.0, 0.0, 1.0)
    else:
        bad, good = (-0.001, 100.1), (0.0, 50.0, 100.0)
    for value in bad:
        with pytest.raises(RecipeError, match=field):
            Tolerances(**{field: value})
    for value in good:
        assert getattr(Tolerances(**{field: value}), field) == value


def test_tolerances_by_precision():
    tolerances = Tolerances(int8_cosine_min=0.9, bf16_accuracy_drop=2.0)
    assert tolerances.cosine_min("int8") == 0.9
    assert tolerances.accuracy_drop("bf16") == 2.0
    assert tolerances.cosine_min("fp32") == Tolerances().fp32_cosine_min
    for precision in PRECISIONS:  # every precision a variant may have has a tolerance
        tolerances.cosine_min(precision)
        tolerances.accuracy_drop(precision)


def test_recipe_specs_and_pruning_needed():
    recipe = Recipe(variants=("onnx-fp32", "pruned-onnx-int8", "sparse-onnx-fp32", "pruned-onnx-fp32"))
    assert [s.name for s in recipe.specs] == list(recipe.variants)
    assert recipe.pruning_needed == {"structured", "unstructured"}
    assert Recipe(variants=("onnx-fp32", "onnx-int8")).pruning_needed == set()
    assert Recipe(variants=("pruned-torchscript-fp32",)).pruning_needed == {"structured"}


def test_recipe_dict_round_trip():
    recipe = Recipe(variants=("onnx-fp32", "onnx-int8"), prune=PruneConfig("unstructured", 0.25, 0),
                    tolerances=Tolerances(int8_cosine_min=0.95), opset=18, select=True, max_accuracy_drop=1.0,
                    min_cosine=0.9, select_batch_size=4, seed=7)
    data = recipe.to_dict()
    assert data["prune"] == {"method": "unstructured", "amount": 0.25, "fine_tune_epochs": 0}
    assert Recipe.from_dict(data) == recipe
    assert Recipe.from_dict({"variants": ["onnx-fp32"]}) == Recipe(variants=("onnx-fp32",))


@pytest.mark.parametrize(("data", "message"), [
    ({"variants": ["onnx-fp32"], "colour": "red"}, "unknown recipe key.*colour"),
    ({"variants": ["onnx-fp32"], "prune": {"amont": 0.3}}, "wrong key or type"),
    ({"variants": ["onnx-fp32"], "tolerances": {"fp64_cosine_min": 0.3}}, "wrong key or type"),
    ({"variants": ["onnx-fp32"], "opset": "17"}, "not an integer"),
    ({"variants": ["onnx-fp32"], "prune": {"method": "structured", "amount": 2.0}}, "between 0 and 1"),
    ({}, "wrong key or type"),  # no variants at all
])
def test_recipe_from_dict_errors(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_recipe_from_toml(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('variants = ["onnx-fp32", "sparse-onnx-fp32"]\nselect = true\nmin_cosine = 0.98\n'
                    '[prune]\nmethod = "unstructured"\namount = 0.7\n[tolerances]\nfp32_cosine_min = 0.999\n')
    recipe = Recipe.from_toml(path)
    assert recipe.variants == ("onnx-fp32", "sparse-onnx-fp32") and recipe.select and recipe.min_cosine == 0.98
    assert recipe.prune == PruneConfig("unstructured", 0.7, 3)
    assert recipe.tolerances.fp32_cosine_min == 0.999 and recipe.tolerances.int8_cosine_min == 0.99
    # keyword overrides win over the file; None means "not given"
    overridden = Recipe.from_toml(path, opset=19, min_cosine=None)
    assert overridden.opset == 19 and overridden.min_cosine == 0.98


def test_recipe_from_toml_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_toml(tmp_path / "missing.toml")
    path = tmp_path / "bad.toml"
    path.write_text("variants = [\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml(path)
    path.write_text('variants = ["onnx-fp32"]\nopset = 99\n')
    with pytest.raises(RecipeError, match="opset 99"):
        Recipe.from_toml(path)


def test_build_recipe_without_file_or_flags_is_the_recommended_set():
    recommended = ("onnx-fp32", "onnx-int8")
    assert build_recipe(recommended) == Recipe(variants=recommended, optional_variants=recommended)


def test_only_the_recommended_set_is_optional():
    """A variant the user names is never silently left out; the model's own set may be (missing toolchain)."""
    assert build_recipe(("onnx-fp32", "pt2-fp32"), variants=["pt2-fp32"]).optional_variants == ()


def test_build_recipe_flags_over_the_recommended_set():
    recipe = build_recipe(("onnx-fp32",), variants=["onnx-int8", "pruned-onnx-int8"], opset=18, select=True,
                          max_accuracy_drop=0.25, min_cosine=0.95, prune="structured:0.3", fine_tune_epochs=1)
    assert recipe.variants == ("onnx-int8", "pruned-onnx-int8")
    assert recipe.opset == 18 and recipe.select
    assert recipe.max_accuracy_drop == 0.25 and recipe.min_cosine == 0.95
    assert recipe.prune == PruneConfig("structured", 0.3, 1)


def test_build_recipe_file_values_then_flags(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('variants = ["onnx-fp32", "pruned-onnx-fp32"]\nopset = 18\nselect = true\n'
                    '[prune]\nmethod = "unstructured"\namount = 0.6\nfine_tune_epochs = 5\n')
    # the file replaces the recommended set; no flags: the file as written
    from_file = build_recipe(("torchscript-fp32",), path)
    assert from_file.variants == ("onnx-fp32", "pruned-onnx-fp32") and from_file.opset == 18 and from_file.select
    assert from_file.prune == PruneConfig("unstructured", 0.6, 5)
    # flags win over the file; --prune keeps the file's fine_tune_epochs, select=False is "not given"
    flagged = build_recipe(("torchscript-fp32",), path, variants=["onnx-fp32"], opset=20, prune="structured:0.3")
    assert flagged.variants == ("onnx-fp32",) and flagged.opset == 20 and flagged.select
    assert flagged.prune == PruneConfig("structured", 0.3, 5)
    epochs_only = build_recipe(("torchscript-fp32",), path, fine_tune_epochs=0)
    assert epochs_only.prune == PruneConfig("unstructured", 0.6, 0)


@pytest.mark.parametrize(("prune", "expected"), [
    ("structured:0.3", PruneConfig("structured", 0.3)),
    ("unstructured:0.9", PruneConfig("unstructured", 0.9)),
    ("structured", PruneConfig("structured", 0.5)),   # amount defaults to 0.5
    ("unstructured:", PruneConfig("unstructured", 0.5)),
])
def test_build_recipe_prune_strings(prune, expected):
    assert build_recipe(("onnx-fp32",), prune=prune).prune == expected


@pytest.mark.parametrize(("prune", "message"), [
    ("structured:abc", "not METHOD:AMOUNT"),
    ("structured:0.3:1", "not METHOD:AMOUNT"),
    ("channels:0.3", "pruning method 'channels'"),
    ("structured:1.5", "between 0 and 1"),
    ("structured:0", "between 0 and 1"),
])
def test_build_recipe_bad_prune_strings(prune, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(("onnx-fp32",), prune=prune)


def test_build_recipe_checks_flags_too():
    with pytest.raises(RecipeError, match="unknown variant"):
        build_recipe(("onnx-fp32",), variants=["onnx-fp33"])
    with pytest.raises(RecipeError, match="min_cosine"):
        build_recipe(("onnx-fp32",), min_cosine=2.0)


def test_every_variant_names_a_format_whose_runtime_is_registered():
    runtimes = registry()
    assert VARIANTS, "no variants registered"
    for name, spec in VARIANTS.items():
        assert spec.name == name
        assert spec.format in FORMATS
        assert spec.runtime == FORMATS[spec.format].runtime
        assert spec.runtime in runtimes, f"{name}: runtime {spec.runtime!r} is not in the runtime registry"
        assert spec.precision in PRECISIONS
        # a quantized variant is int8, and an int8 variant says how it is quantized
        assert (spec.quantization is not None) == (spec.precision == "int8"), name
    for fmt in FORMATS.values():
        assert fmt.emitter.startswith("kiln.export.emit_")


def test_variant_specs_match_their_names():
    for name, spec in VARIANTS.items():
        assert (spec.pruning is not None) == name.startswith(("pruned-", "sparse-")), name
        short = {"openvino": "ov-"}.get(spec.format, spec.format)  # the names: ov-fp32, ov-bf16, ov-int8
        assert short in name and spec.precision in name, name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "tflite"}, "format 'tflite' is unknown"),
    ({"format": "onnx", "precision": "fp64"}, "precision 'fp64'"),
    ({"format": "onnx", "precision": "int8", "quantization": "weird"}, "quantization 'weird'"),
    ({"format": "onnx", "pruning": "magnitude"}, "pruning 'magnitude'"),
])
def test_variant_spec_rejects_unknown_values(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        VariantSpec("custom", **kwargs)


def test_variant_spec_lookup():
    assert variant_spec("onnx-int8") is VARIANTS["onnx-int8"]
    with pytest.raises(RecipeError, match="unknown variant 'onnx-int4'"):
        variant_spec("onnx-int4")


def test_a_models_own_defaults_go_beneath_the_recipe_file_and_flags(tmp_path):
    """A family's opset and tolerances apply unless the user sets them (kiln.models.families)."""
    model = {"opset": 18, "tolerances": {"int8_cosine_min": 0.98, "bf16_cosine_min": 0.998}}
    plain = build_recipe(("onnx-fp32",), model_defaults=model)
    assert plain.opset == 18 and plain.tolerances.int8_cosine_min == 0.98
    assert build_recipe(("onnx-fp32",), opset=17, model_defaults=model).opset == 17
    recipe = tmp_path / "r.toml"
    recipe.write_text('variants = ["onnx-int8"]\nopset = 19\n[tolerances]\nint8_cosine_min = 0.995\n')
    built = build_recipe(("onnx-fp32",), recipe, model_defaults=model)
    assert built.opset == 19 and built.tolerances.int8_cosine_min == 0.995
    assert built.tolerances.bf16_cosine_min == 0.998  # the model's, where the file says nothing


def test_a_variant_may_name_another_runtime_for_its_format():
    assert VariantSpec("onnx-fp32-b", "onnx").runtime == FORMATS["onnx"].runtime
    assert VariantSpec("onnx-fp32-b", "onnx", runtime="second-runtime").runtime == "second-runtime"


def test_every_variant_resolves_to_one_precision_workflow_with_a_registered_handler():
    from dataclasses import FrozenInstanceError

    import kiln.export.ov_quantize  # registers the OpenVINO workflows, as the OpenVINO emitter's import does
    import kiln.export.quantize  # noqa: F401  registers the ONNX INT8 handlers, as the ONNX emitter's import does
    from kiln.export import precision
    from kiln.models.base import ExportHints

    expected = {"bf16": precision.Bf16Weights, "pt2-int8": precision.TorchaoInt8,
                "ov-bf16": precision.InferencePrecision, "ov-int8": precision.NncfInt8}
    for mode, onnx_int8 in (("static", precision.OnnxStaticInt8), ("dynamic", precision.OnnxDynamicInt8)):
        hints = ExportHints(int8_mode=mode, int8_activations="asymmetric", int8_keep_fp32="pooler")
        for name, spec in VARIANTS.items():
            config = precision.workflow(spec, hints)
            if spec.precision == "fp32":
                assert config is None, name
                continue
            wanted = expected.get(name) or expected.get(spec.precision)
            if spec.format == "onnx":
                wanted = {"auto": onnx_int8, "static": precision.OnnxStaticInt8,
                          "dynamic": precision.OnnxDynamicInt8}[spec.quantization]
            assert type(config) is wanted, name
            assert type(config) in precision.HANDLERS, name
            with pytest.raises(FrozenInstanceError):
                config.extra = 1  # a config is a frozen value, as torchao's are
    hints = ExportHints(int8_activations="asymmetric", int8_keep_fp32="pooler")
    assert precision.workflow(VARIANTS["pt2-int8"], hints) == precision.TorchaoInt8("asymmetric")
    assert precision.workflow(VARIANTS["onnx-int8-dynamic"], hints) == precision.OnnxDynamicInt8("pooler")


def test_a_precision_without_a_workflow_or_a_handler_is_one_clear_error():
    from dataclasses import dataclass

    from kiln.core.errors import ExportError
    from kiln.export import precision
    from kiln.models.base import ExportHints

    with pytest.raises(ExportError, match="no bf16 workflow for the onnx format"):
        precision.workflow(VariantSpec("onnx-bf16", "onnx", "bf16"), ExportHints())

    @dataclass(frozen=True)
    class Unregistered:
        pass

    with pytest.raises(ExportError, match="no handler is registered for Unregistered"):
        precision.apply(Unregistered(), object())


def test_an_artifacts_files_lie_beside_it_and_go_with_a_variant_left_out(tmp_path):
    from kiln.core.errors import ExportError
    from kiln.export.pipeline import companion_of, leave_out

    target = tmp_path / "onnx-int8.onnx"
    for name in ("onnx-int8.onnx", "onnx-int8.weights.bin", "onnx-int8-dynamic.onnx", "manifest.json"):
        (tmp_path / name).write_bytes(b"x")
    assert companion_of(target, tmp_path / "onnx-int8.weights.bin") == tmp_path / "onnx-int8.weights.bin"
    for wrong in (tmp_path / "onnx-int8-dynamic.onnx", tmp_path / "sub" / "onnx-int8.bin", tmp_path / "onnx-int8.gone"):
        with pytest.raises(ExportError, match="fix the emitter"):
            companion_of(target, wrong)
    skipped: list[dict[str, str]] = []
    leave_out(skipped, VARIANTS["onnx-int8"], "missed", tmp_path, progress=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "onnx-int8-dynamic.onnx"]
    assert skipped == [{"variant": "onnx-int8", "reason": "missed"}]
