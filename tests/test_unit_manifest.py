"""Unit tier: kiln.core.manifest (schema, round trip, integrity, validation, the fp32 default policy)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kiln.core.errors import IntegrityError, ManifestError
from kiln.core.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    VariantEntry,
    fp32_default,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from kiln.core.signature import Signature, TensorSpec

SIGNATURE = Signature((TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
                      (TensorSpec("logits", "float32", ("batch", 10)),))


def entry(name: str, file: str, fmt: str = "onnx", precision: str = "fp32", pruning: dict | None = None,
          folder: Path | None = None, **figures) -> VariantEntry:
    """A variant entry; with `folder`, its file is written there and its bytes and sha256 are the real ones."""
    size, digest = 0, "0" * 64
    if folder is not None:
        path = folder / file
        path.write_bytes(f"artifact {name}".encode() * 10)
        size, digest = path.stat().st_size, sha256_file(path)
    runtime = {"onnx": "onnxruntime", "torchscript": "torchscript"}[fmt]
    quantization = {"mode": "static"} if precision == "int8" else None
    return VariantEntry(name=name, file=file, format=fmt, runtime=runtime, precision=precision, pruning=pruning,
                        quantization=quantization, bytes=size, sha256=digest, **figures)


def make_manifest(folder: Path) -> Manifest:
    (folder / "tokenizer.json").write_text('{"fake": true}')
    return Manifest(
        folder=folder, model="digits", task="classification", signature=SIGNATURE,
        preprocessing={"kind": "tensor"},
        variants=[
            entry("onnx-fp32", "model.onnx", folder=folder, accuracy=0.99, max_abs_error=1e-6, cosine_min=1.0),
            entry("onnx-int8", "model.int8.onnx", precision="int8", folder=folder, accuracy=0.985, cosine_min=0.995),
            entry("torchscript-fp32", "model.pt", fmt="torchscript", folder=folder),
        ],
        default_variant="onnx-fp32",
        source={"zoo": "digits"},
        reference={"accuracy": 0.99},
        files=[{"file": "tokenizer.json", "sha256": sha256_file(folder / "tokenizer.json")}],
        versions={"kiln": "0.1.0"},
        recipe={"variants": ["onnx-fp32", "onnx-int8", "torchscript-fp32"]},
        created="2024-01-01T00:00:00+00:00",
        export_seconds=1.5,
    )


def write_raw(folder: Path, data) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def raw(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_save_then_read_round_trips(tmp_path):
    manifest = make_manifest(tmp_path)
    manifest.save()
    again = read_manifest(tmp_path)
    assert again.to_dict() == manifest.to_dict()
    assert again.folder == tmp_path
    assert again.signature == SIGNATURE
    assert again.variant_names == ["onnx-fp32", "onnx-int8", "torchscript-fp32"]
    assert again.variant().name == "onnx-fp32"
    assert again.variant("onnx-int8").figures == {"accuracy": 0.985, "cosine_min": 0.995}
    assert again.reference_accuracy == 0.99 and not again.is_text
    # absent optional figures are not written as nulls
    written = raw(tmp_path)
    assert "accuracy" not in written["variants"][2] and "max_abs_error" not in written["variants"][1]
    assert "selection" not in written and written["schema_version"] == SCHEMA_VERSION


def test_unknown_keys_survive_a_read_and_a_save(tmp_path):
    make_manifest(tmp_path).save()
    data = raw(tmp_path)
    data["future_field"] = {"nested": [1, 2]}
    data["variants"][0]["future_figure"] = 0.5
    write_raw(tmp_path, data)

    manifest = read_manifest(tmp_path)
    assert manifest.extra == {"future_field": {"nested": [1, 2]}}
    assert manifest.variants[0].extra == {"future_figure": 0.5}
    manifest.default_variant = "onnx-int8"
    manifest.selection = {"chosen": "onnx-int8"}
    manifest.save()

    written = raw(tmp_path)
    assert written["future_field"] == {"nested": [1, 2]}
    assert written["variants"][0]["future_figure"] == 0.5
    assert written["default_variant"] == "onnx-int8" and written["selection"] == {"chosen": "onnx-int8"}
    assert read_manifest(tmp_path).to_dict() == manifest.to_dict()


def test_verify_file_accepts_intact_artifacts(tmp_path):
    manifest = make_manifest(tmp_path)
    assert manifest.verify_file() == tmp_path / "model.onnx"
    assert manifest.verify_file("torchscript-fp32") == tmp_path / "model.pt"


def test_verify_file_detects_one_changed_byte(tmp_path):
    manifest = make_manifest(tmp_path)
    path = tmp_path / "model.int8.onnx"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        manifest.verify_file("onnx-int8")
    manifest.verify_file("onnx-fp32")  # the others are still fine


def test_verify_file_detects_truncation_and_a_missing_file(tmp_path):
    manifest = make_manifest(tmp_path)
    path = tmp_path / "model.onnx"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="sha256"):
        manifest.verify_file()
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        manifest.verify_file()


def test_verify_file_checks_the_extra_files(tmp_path):
    manifest = make_manifest(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"fake": false}')
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        manifest.verify_file()
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        manifest.verify_file()


def test_integrity_error_is_a_manifest_error(tmp_path):
    manifest = make_manifest(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ManifestError):
        manifest.verify_file()


def test_variant_lookup_of_an_unknown_name(tmp_path):
    manifest = make_manifest(tmp_path)
    with pytest.raises(ManifestError, match="onnx-fp32, onnx-int8, torchscript-fp32"):
        manifest.variant("onnx-fp64")


def _break(mutate):
    def apply(data: dict) -> dict:
        mutate(data)
        return data
    return apply


@pytest.mark.parametrize(("mutate", "message"), [
    (_break(lambda d: d.pop("signature")), "lacks signature"),
    (_break(lambda d: (d.pop("model"), d.pop("task"))), "lacks model, task"),
    (_break(lambda d: d.update(schema_version=2)), "schema version 2"),
    (_break(lambda d: d.update(schema_version="1")), "schema version"),
    (_break(lambda d: d.update(variants=[])), "lists no variants"),
    (_break(lambda d: d.update(variants={"onnx-fp32": {}})), "lists no variants"),
    (_break(lambda d: d["variants"][0].pop("sha256")), "lacks sha256"),
    (_break(lambda d: d["variants"].append("onnx-fp32")), "a variant .* lacks"),
    (_break(lambda d: d["variants"][1].update(file="../elsewhere/model.onnx")), "points outside"),
    (_break(lambda d: d["variants"][1].update(file="sub/../../model.onnx")), "points outside"),
    (_break(lambda d: d["variants"][1].update(file="/etc/passwd")), "points outside"),
    (_break(lambda d: d.update(preprocessing="text")), "preprocessing is not an object"),
    (_break(lambda d: d.update(signature={"inputs": [{"name": "x"}], "outputs": []})), "malformed"),
    (_break(lambda d: d["variants"][0].pop("name")), "lacks name"),
    (_break(lambda d: d.update(default_variant="onnx-fp64")), "default_variant 'onnx-fp64' is not among"),
])
def test_read_manifest_rejects_malformed_files(tmp_path, mutate, message):
    make_manifest(tmp_path).save()
    write_raw(tmp_path, mutate(raw(tmp_path)))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_read_manifest_rejects_non_json_and_non_objects(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    write_raw(tmp_path, [1, 2, 3])
    with pytest.raises(ManifestError, match="not a JSON object"):
        read_manifest(tmp_path)


def test_read_manifest_of_a_missing_folder_or_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match=f"has no {MANIFEST_NAME}"):
        read_manifest(tmp_path)


def test_fp32_default_prefers_unpruned_onnx_fp32():
    variants = [
        entry("torchscript-fp32", "a.pt", fmt="torchscript"),
        entry("pruned-onnx-fp32", "b.onnx", pruning={"method": "structured", "amount": 0.5}),
        entry("onnx-int8", "c.onnx", precision="int8"),
        entry("onnx-fp32", "d.onnx"),
    ]
    assert fp32_default(variants) == "onnx-fp32"


def test_fp32_default_falls_back_to_any_unpruned_fp32():
    variants = [
        entry("pruned-onnx-fp32", "b.onnx", pruning={"method": "structured"}),
        entry("onnx-int8", "c.onnx", precision="int8"),
        entry("torchscript-bf16", "e.pt", fmt="torchscript", precision="bf16"),
        entry("torchscript-fp32", "a.pt", fmt="torchscript"),
    ]
    assert fp32_default(variants) == "torchscript-fp32"


def test_fp32_default_is_none_without_an_unpruned_fp32():
    variants = [
        entry("pruned-onnx-fp32", "b.onnx", pruning={"method": "structured"}),
        entry("sparse-onnx-fp32", "s.onnx", pruning={"method": "unstructured"}),
        entry("onnx-int8", "c.onnx", precision="int8"),
    ]
    assert fp32_default(variants) is None
    assert fp32_default([]) is None


def test_variant_entry_properties():
    pruned = entry("pruned-onnx-int8", "p.onnx", precision="int8", pruning={"method": "structured", "amount": 0.3})
    assert pruned.pruning_method == "structured" and pruned.quantization_mode == "static"
    plain = entry("onnx-fp32", "m.onnx")
    assert plain.pruning_method is None and plain.quantization_mode is None
    assert VariantEntry.from_dict(pruned.to_dict()) == pruned


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "data.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2, "b": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
    assert json.loads(target.read_text()) == {"a": 2, "b": [1, 2]}
    assert target.read_text().endswith("\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by a server running as another user


def test_write_json_atomic_keeps_the_mode_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "data.json"
    target.write_text('{"old": true}\n')
    target.chmod(0o640)
    write_json_atomic(target, {"new": True})
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(TypeError):
        write_json_atomic(target, {"unserialisable": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
    assert json.loads(target.read_text()) == {"new": True}  # the old file is untouched by a failed write


def two_file_manifest(folder: Path) -> Manifest:
    """A manifest whose onnx-fp32 is two files, as an OpenVINO model (`.xml` + `.bin`) will be."""
    manifest = make_manifest(folder)
    weights = folder / "model.bin"
    weights.write_bytes(b"weights" * 100)
    manifest.variants[0].companions = [{"file": "model.bin", "sha256": sha256_file(weights),
                                        "bytes": weights.stat().st_size}]
    manifest.save()
    return read_manifest(folder)


def test_a_variant_of_several_files_round_trips_and_one_file_variants_are_written_as_before(tmp_path):
    manifest = two_file_manifest(tmp_path)
    written = raw(tmp_path)
    assert written["variants"][0]["companions"][0]["file"] == "model.bin"
    assert "companions" not in written["variants"][1]  # a one-file variant: the same keys as before
    assert [f.file for f in manifest.variants[0].artifact_files] == ["model.onnx", "model.bin"]
    assert [f.file for f in manifest.variants[1].artifact_files] == ["model.int8.onnx"]
    assert manifest.paths_of(manifest.variants[0]) == [tmp_path / "model.onnx", tmp_path / "model.bin"]
    assert manifest.verify_file() == tmp_path / "model.onnx"  # the file its runtime opens


def test_verify_file_checks_every_file_of_a_variant(tmp_path):
    manifest = two_file_manifest(tmp_path)
    weights = tmp_path / "model.bin"
    data = bytearray(weights.read_bytes())
    data[3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"'model\.bin' of variant 'onnx-fp32' does not match its sha256"):
        manifest.verify_file("onnx-fp32")
    weights.unlink()
    with pytest.raises(IntegrityError, match=r"'model\.bin' of variant 'onnx-fp32' is missing"):
        manifest.verify_file("onnx-fp32")
    manifest.verify_file("onnx-int8")  # the others are still fine


@pytest.mark.parametrize("companions, message", [
    ([{"file": "../outside.bin", "sha256": "0" * 64, "bytes": 1}], "points outside its folder"),
    ([{"file": "/etc/passwd", "sha256": "0" * 64, "bytes": 1}], "points outside its folder"),
    ([{"file": "model.bin", "sha256": "0" * 64}], "companions is not a list"),
    ("model.bin", "companions is not a list"),
])
def test_read_manifest_keeps_every_file_of_a_variant_inside_the_folder(tmp_path, companions, message):
    make_manifest(tmp_path).save()
    data = raw(tmp_path)
    data["variants"][0]["companions"] = companions
    write_raw(tmp_path, data)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_a_companion_symlinked_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    manifest = make_manifest(folder)
    (folder / "model.bin").symlink_to(secret)
    manifest.variants[0].companions = [{"file": "model.bin", "sha256": sha256_file(secret), "bytes": 6}]
    manifest.save()
    with pytest.raises(ManifestError, match="outside the folder"):
        read_manifest(folder).verify_file("onnx-fp32")
