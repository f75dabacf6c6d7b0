"""`kiln export` as a user runs it: a factory model on real data, and every bad input."""

import json

import numpy as np
import pytest
from conftest import run_kiln

pytestmark = pytest.mark.slow  # real exports and `kiln` subprocesses


def _one_line_error(result, name):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines, result.stderr
    assert lines[-1].startswith(f"{name}: "), result.stderr
    assert "; " in lines[-1], "the message must say what to do"
    assert "Traceback" not in result.stderr


def _user_args(iris, out, model="userpkg.nets:iris_mlp", checkpoint="default", inputs=("features:float32[batch,4]",),
               variants="torchscript-fp32,onnx-fp32"):
    """checkpoint: "default" for the trained iris checkpoint, None for none (a factory with no weights)."""
    args = ["export", model, "--data", str(iris["data"]), "--output", "logits", "--out", str(out),
            "--variants", variants, "--no-select"]
    if checkpoint is not None:
        args += ["--checkpoint", str(iris["checkpoint"] if checkpoint == "default" else checkpoint)]
    for spec in inputs:
        args += ["--input", spec]
    return args


def test_user_model_through_module_factory(iris_user_model, tmp_path):
    out = tmp_path / "iris"
    result = run_kiln(*_user_args(iris_user_model, out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "nets"  # the module's last component
    assert manifest["signature"]["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 4]}]
    assert manifest["source"]["factory"] == "userpkg.nets:iris_mlp"
    for v in manifest["variants"]:
        assert v["accuracy"] >= 0.9 and v["cosine_min"] > 0.99
    import kiln

    rt = kiln.load(out, "onnx-fp32")
    with np.load(iris_user_model["data"]) as data:
        logits = rt.run({"features": data["features"][:7]})["logits"]
    assert logits.shape == (7, 3)


def test_name_flag_renames_the_model(iris_user_model, tmp_path):
    out = tmp_path / "named"
    result = run_kiln(*_user_args(iris_user_model, out, variants="onnx-fp32"), "--name", "iris")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["model"] == "iris"


@pytest.mark.parametrize("case,name,code", [
    ("missing module", "ModelSourceError", 1),
    ("no factory", "ModelSourceError", 1),
    ("factory raises", "ModelSourceError", 1),
    ("checkpoint does not fit", "ModelSourceError", 1),
    ("checkpoint missing", "ModelSourceError", 1),
    ("signature rank", "UsageError", 2),
    ("signature width", "UsageError", 2),
    ("bad spec", "UsageError", 2),
    ("unknown variant", "RecipeError", 2),
    ("onnx export fails", "ExportError", 1),
])
def test_bad_input_fails_cleanly(iris_user_model, tmp_path, case, name, code):
    out = tmp_path / "out"
    args = {
        "missing module": lambda: _user_args(iris_user_model, out, model="userpkg.nope:iris_mlp"),
        "no factory": lambda: _user_args(iris_user_model, out, model="userpkg.nets:nothing"),
        "factory raises": lambda: _user_args(iris_user_model, out, model="userpkg.nets:broken"),
        "checkpoint does not fit": lambda: _user_args(iris_user_model, out, model="userpkg.nets:wide_mlp"),
        "checkpoint missing": lambda: _user_args(iris_user_model, out, checkpoint=tmp_path / "none.pt"),
        "signature rank": lambda: _user_args(iris_user_model, out, inputs=("features:float32[batch,4,1]",)),
        "signature width": lambda: _user_args(iris_user_model, out, inputs=("features:float32[batch,5]",)),
        "bad spec": lambda: _user_args(iris_user_model, out, inputs=("features-float32",)),
        "unknown variant": lambda: _user_args(iris_user_model, out, variants="onnx-fp64"),
        "onnx export fails": lambda: _user_args(iris_user_model, out, model="userpkg.nets:not_exportable",
                                                checkpoint=None, variants="onnx-fp32"),
    }[case]()
    result = run_kiln(*args)
    assert result.returncode == code, (result.returncode, result.stderr)
    _one_line_error(result, name)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "staging folder left behind"


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_kiln("export", "digits", "--out", str(tmp_path / "x"), "--quantise", "int8")
    assert result.returncode == 2
    assert "UsageError: unrecognized arguments: --quantise" in result.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_zoo_model(tmp_path):
    result = run_kiln("export", "resnet9000", "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    _one_line_error(result, "ModelSourceError")



def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_kiln("export", "digits", "--out", str(blocker / "digits"), "--variants", "onnx-fp32")
    assert result.returncode == 2
    _one_line_error(result, "UsageError")
    result = run_kiln("export", "digits", "--out", str(blocker), "--variants", "onnx-fp32")
    assert result.returncode == 2
    _one_line_error(result, "UsageError")
    assert blocker.read_text() == "not a folder"


def test_existing_folder_needs_force(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = run_kiln("export", "digits", "--out", str(out), "--variants", "onnx-fp32")
    assert result.returncode == 2
    _one_line_error(result, "UsageError")
    assert (out / "precious.txt").read_text() == "mine"


def test_failed_verification_exits_3_and_writes_nothing(tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('variants = ["onnx-fp32", "torchscript-bf16"]\n[tolerances]\nbf16_cosine_min = 1.0\n'
                      'fp32_cosine_min = 0.9999\n')
    out = tmp_path / "digits"
    result = run_kiln("export", "digits", "--out", str(out), "--recipe", str(recipe))
    assert result.returncode == 3, result.stderr
    _one_line_error(result, "VerificationError")
    assert "torchscript-bf16: cosine_min" in result.stderr
    assert not out.exists()
