"""Hardening round 3 (issue #22): model folders and artifact folders from people you do not trust.

A supplier controls every byte of the folder, the manifest's hashes included, so a hash proves nothing about where a
file lives: everything kiln reads must resolve inside the folder, be a regular file, fit a size cap, and parse, or be
refused with one line naming it; nothing is written outside --out. The unit tests call what the commands call
(inspect_folder, read_manifest, serve's plan_models, bench's preflight, the deploy writers, kiln.load); the slow ones
run the real `kiln` command and check its one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_kiln
from server_process import free_port

import kiln
from kiln.core.errors import IntegrityError, ManifestError, ModelSourceError, UsageError
from kiln.core.manifest import MANIFEST_NAME, read_manifest, sha256_file
from kiln.core.paths import MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, safe_name
from kiln.models import hf_folder

SECRET = "root:x:0:0:secret line that must never leave its folder\n"
TINY_TOKENIZER = json.dumps({
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}, "unk_token": "[UNK]"}})
BERT_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 64}


def one_error_line(text: str, name: str) -> str:
    """The command's stderr holds one `Name: message` line for the error and no traceback."""
    assert "Traceback" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith(f"{name}: ")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every folder under test, standing for /etc/passwd or a private key."""
    path = tmp_path / "elsewhere" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


# --- Hugging Face folders ------------------------------------------------------------------------------------------


def model_folder(root: Path) -> Path:
    """What inspect_folder reads (config, tokenizer files): no weights, nothing loaded."""
    folder = root / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(BERT_CONFIG))
    (folder / "tokenizer.json").write_text(TINY_TOKENIZER)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    (folder / "vocab.txt").write_text("[UNK]\n[PAD]\nhello\nworld\n")
    return folder


@pytest.mark.parametrize("name", ["added_tokens.json", "vocab.txt", "special_tokens_map.json", "tokenizer.json"])
def test_a_tokenizer_file_that_links_outside_the_folder_is_refused_naming_it(tmp_path, secret, name):
    folder = model_folder(tmp_path)
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    with pytest.raises(ModelSourceError) as caught:
        hf_folder.inspect_folder(folder)
    message = str(caught.value)
    assert str(folder / name) in message and "outside the folder" in message and "\n" not in message


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors"])
def test_weights_or_any_other_file_linking_outside_is_refused_before_transformers_reads_it(tmp_path, secret, weights):
    folder = model_folder(tmp_path)
    (folder / weights).symlink_to(secret)
    with pytest.raises(ModelSourceError, match="outside the folder"):
        hf_folder.inspect_folder(folder)


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_a_weights_index_naming_a_shard_outside_is_refused(tmp_path, index):
    folder = model_folder(tmp_path)
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": {
        "embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
        "pooler.dense.weight": "../../../elsewhere/victim.safetensors"}}))
    with pytest.raises(ModelSourceError, match="weights shard") as caught:
        hf_folder.inspect_folder(folder)
    assert "victim.safetensors" in str(caught.value)


def test_a_subfolder_linking_outside_is_refused(tmp_path, secret):
    folder = model_folder(tmp_path)
    (folder / "1_Pooling").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(ModelSourceError, match="1_Pooling"):
        hf_folder.inspect_folder(folder)


@pytest.mark.parametrize("pooling_path", ["../../../../etc", "/etc", "../elsewhere"])
def test_modules_json_naming_a_pooling_folder_outside_is_refused(tmp_path, pooling_path):
    folder = model_folder(tmp_path)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(ModelSourceError, match="pooling module folder") as caught:
        hf_folder.inspect_folder(folder)
    assert pooling_path in str(caught.value)


def test_links_that_stay_inside_are_followed_and_files_to_copy_are_real_files_inside(tmp_path):
    folder = model_folder(tmp_path)
    (folder / "shared").mkdir()
    (folder / "vocab.txt").rename(folder / "shared" / "vocab.txt")
    (folder / "vocab.txt").symlink_to("shared/vocab.txt")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "x.Pooling"}]))
    info = hf_folder.inspect_folder(folder)
    assert info.pooling == "cls" and info.max_length == 32
    assert set(info.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    for path in info.tokenizer_files.values():
        assert path.is_file() and not path.is_symlink() and path.is_relative_to(folder.resolve())
    assert info.tokenizer_files["vocab.txt"] == (folder / "shared" / "vocab.txt").resolve()


def test_a_hugging_face_cache_snapshot_links_into_its_blobs_and_nowhere_else(tmp_path, secret):
    """The hub cache lays one model out in two parts (snapshots/REV/* are links into ../../blobs): users export
    such folders as they are. A link from a snapshot to anywhere else is still refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    source = model_folder(tmp_path / "plain")
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(source.iterdir())):
        shutil.copyfile(file, blobs / f"blob{index}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{index}")
    info = hf_folder.inspect_folder(snapshot)
    assert safe_name(str(snapshot)) == "tiny"
    assert all(path.is_relative_to(blobs.resolve()) for path in info.tokenizer_files.values())
    (snapshot / "vocab.txt").unlink()
    (snapshot / "vocab.txt").symlink_to(secret)
    with pytest.raises(ModelSourceError, match="outside the folder"):
        hf_folder.inspect_folder(snapshot)
    (snapshot / "vocab.txt").unlink()
    (blobs / "evil").symlink_to(secret)  # a blob that is itself a link out: resolved fully, so still outside
    (snapshot / "vocab.txt").symlink_to(Path("../../blobs/evil"))
    with pytest.raises(ModelSourceError, match="outside the folder"):
        hf_folder.inspect_folder(snapshot)


def test_a_fifo_in_place_of_a_tokenizer_file_is_refused_not_waited_on(tmp_path):
    folder = model_folder(tmp_path)
    os.mkfifo(folder / "merges.txt")
    with pytest.raises(ModelSourceError, match="not a regular file"):
        hf_folder.inspect_folder(folder)


def test_oversized_configs_and_tokenizers_are_refused_before_parsing(tmp_path):
    folder = model_folder(tmp_path)
    os.truncate(folder / "tokenizer_config.json", MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ModelSourceError, match="over kiln's limit of 16 MiB"):
        hf_folder.inspect_folder(folder)
    os.truncate(folder / "tokenizer_config.json", 0)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelSourceError, match="not a JSON object"):
        hf_folder.inspect_folder(folder)
    from kiln.core.preprocessing import load_tokenizer

    os.truncate(folder / "tokenizer.json", MAX_TOKENIZER_BYTES + 1)
    with pytest.raises(ModelSourceError, match="over kiln's limit of 64 MiB"):
        load_tokenizer(folder / "tokenizer.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ModelSourceError, match=r"not a valid Hugging Face tokenizer\.json"):
        load_tokenizer(folder / "tokenizer.json")


def test_model_names_are_one_safe_path_segment():
    from kiln.models.registry import resolve

    for bad in ("a/b", "..", "../x", "a b", "", "x" * 129, "名前"):
        with pytest.raises(UsageError, match="one path segment"):
            resolve("digits", name=bad)  # refused before any model is loaded
    assert safe_name("my model (v2)") == "my-model-v2" and safe_name("...") == "model"
    assert safe_name("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_pickle_weights_are_refused_with_advice_that_never_says_weights_only_false(tmp_path):
    pytest.importorskip("transformers")
    import torch

    folder = model_folder(tmp_path)
    marker = tmp_path / "ran"

    class Payload:  # unpickled, it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError) as caught:
        hf_folder.build_module(hf_folder.inspect_folder(folder))
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "will not load pickle" in message
    assert "weights_only" not in message and caught.value.__cause__ is None and not marker.exists()

    from kiln.models.user import build_module

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    torch.save({"fc.weight": Payload()}, tmp_path / "net.pt")
    with pytest.raises(ModelSourceError) as caught:
        build_module("userpkg.nets:iris_mlp", tmp_path / "net.pt")
    assert "will not load pickle" in str(caught.value) and "weights_only=False" not in str(caught.value)
    assert not marker.exists()


# --- artifact folders ----------------------------------------------------------------------------------------------


def tiny_onnx(path: Path) -> None:
    """A real ONNX model over token ids: [sum of ids, sum of mask] per row, so kiln.load and a server really run."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ids_f", "axes"], ["a"], keepdims=1),
             helper.make_node("ReduceSum", ["mask_f", "axes"], ["b"], keepdims=1),
             helper.make_node("Concat", ["a", "b"], ["sentence_embedding"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
                        for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def text_artifact(root: Path, model: str = "tiny") -> Path:
    """An artifact folder as `kiln export` writes one for a text model: one real ONNX variant, a tokenizer listed in
    `files` with its sha256."""
    folder = root / model
    folder.mkdir(parents=True)
    tiny_onnx(folder / "onnx-fp32.onnx")
    (folder / "tokenizer.json").write_text(TINY_TOKENIZER)
    manifest = {
        "schema_version": 1, "model": model, "task": "embedding",
        "signature": {"inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
                                 for n in ("input_ids", "attention_mask")],
                      "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 2]}]},
        "preprocessing": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": 16, "truncation": True,
                          "padding": "longest", "input_names": ["input_ids", "attention_mask"], "task": "embedding"},
        "variants": [{"name": "onnx-fp32", "file": "onnx-fp32.onnx", "format": "onnx", "runtime": "onnxruntime",
                      "precision": "fp32", "pruning": None, "quantization": None,
                      "bytes": (folder / "onnx-fp32.onnx").stat().st_size,
                      "sha256": sha256_file(folder / "onnx-fp32.onnx")}],
        "default_variant": "onnx-fp32",
        "files": [{"file": "tokenizer.json", "sha256": sha256_file(folder / "tokenizer.json")}],
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    change(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def rehash(folder: Path) -> None:
    """What a hostile supplier does after swapping a file: record the new file's real hash."""
    def change(data):
        variant = data["variants"][0]
        variant["bytes"] = (folder / variant["file"]).stat().st_size
        variant["sha256"] = sha256_file(folder / variant["file"])
        for extra in data["files"]:
            extra["sha256"] = sha256_file(folder / extra["file"])
    edit_manifest(folder, change)


def link_variant_outside(folder: Path, secret: Path) -> None:
    (folder / "onnx-fp32.onnx").unlink()
    (folder / "onnx-fp32.onnx").symlink_to(secret)
    rehash(folder)


def link_tokenizer_outside(folder: Path, secret: Path) -> None:
    shutil.copyfile(folder / "tokenizer.json", secret)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)
    rehash(folder)


def damage_tokenizer(folder: Path, secret: Path) -> None:
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    rehash(folder)


def tokenizer_outside_by_absolute_path(folder: Path, secret: Path) -> None:
    shutil.copyfile(folder / "tokenizer.json", secret)

    def change(data):
        data["preprocessing"]["tokenizer"] = str(secret)
        data["files"] = []
    edit_manifest(folder, change)


def tokenizer_outside_by_dotdot(folder: Path, secret: Path) -> None:
    shutil.copyfile(folder / "tokenizer.json", secret)

    def change(data):
        data["preprocessing"]["tokenizer"] = f"../elsewhere/{secret.name}"
        data["files"] = [{"file": f"../elsewhere/{secret.name}", "sha256": sha256_file(secret)}]
    edit_manifest(folder, change)


def tokenizer_unlisted(folder: Path, secret: Path) -> None:
    edit_manifest(folder, lambda data: data.update(files=[]))


def model_named_with_a_slash(folder: Path, secret: Path) -> None:
    edit_manifest(folder, lambda data: data.update(model="a/b"))


HOSTILE = {  # case: (how the folder is made hostile, the error, text the one line must hold)
    "variant symlink outside": (link_variant_outside, ManifestError, "outside the folder"),
    "tokenizer symlink outside": (link_tokenizer_outside, ManifestError, "outside the folder"),
    "tokenizer absolute path": (tokenizer_outside_by_absolute_path, ManifestError, "points outside its folder"),
    "tokenizer via ..": (tokenizer_outside_by_dotdot, ManifestError, "points outside its folder"),
    "tokenizer not in files": (tokenizer_unlisted, ManifestError, "not listed in `files`"),
    "damaged tokenizer, hash matching": (damage_tokenizer, ManifestError, "not a valid Hugging Face tokenizer.json"),
    "model named a/b": (model_named_with_a_slash, ManifestError, "one path segment"),
}


def serve_plan(folder: Path):
    from kiln.serve.repository import plan_models
    from kiln.serve.server import ServeConfig

    return plan_models(ServeConfig(artifact_dirs=(str(folder),)))


def bench_preflight(folder: Path):
    from kiln.bench.driver import BenchSettings, preflight

    return preflight(folder, BenchSettings(), writing=True)


def deploy_triton(folder: Path, out: Path):
    from kiln.deploy.triton import TritonOptions, write_triton

    return write_triton(folder, TritonOptions(out=out), progress=lambda message: None)


def deploy_kserve(folder: Path, out: Path):
    from kiln.deploy.kserve import KServeOptions, write_kserve

    return write_kserve(folder, KServeOptions(out=out, image="registry.example.com/kiln:0.1.0",
                                              storage_uri="s3://models/tiny"), progress=lambda message: None)


CONSUMERS = {
    "kiln.load": lambda folder, out: kiln.load(folder, threads=1),
    "serve": lambda folder, out: serve_plan(folder),
    "bench": lambda folder, out: bench_preflight(folder),
    "deploy triton": deploy_triton,
    "deploy kserve": deploy_kserve,
}


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def test_the_untouched_artifact_passes_every_consumer(tmp_path):
    """The control: what the hostile cases change is all that makes them fail."""
    folder = text_artifact(tmp_path)
    runtime = kiln.load(folder, threads=1)
    from kiln.core.preprocessing import text_preprocessor

    out = runtime.run(text_preprocessor(read_manifest(folder))(["hello world", "hello"]))
    # [sum of ids, sum of mask]: "hello" is padded with the tokenizer's own [PAD] (id 1; kiln.core.preprocessing.pad_of)
    assert out["sentence_embedding"].tolist() == [[5.0, 2.0], [3.0, 1.0]]
    for name, consume in CONSUMERS.items():
        consume(folder, tmp_path / f"out-{name.replace(' ', '-')}")
    assert (tmp_path / "out-deploy-triton" / "tiny" / "1" / "model.onnx").read_bytes() == \
        (folder / "onnx-fp32.onnx").read_bytes()


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_artifact_folders_are_refused_by_every_consumer_with_nothing_written(tmp_path, secret, case, consumer):
    folder = text_artifact(tmp_path / "artifacts")
    make_hostile, error, text = HOSTILE[case]
    make_hostile(folder, secret)
    out = tmp_path / "out"
    before = files_under(tmp_path)
    with pytest.raises(error) as caught:
        CONSUMERS[consumer](folder, out)
    assert text in str(caught.value) and "\n" not in str(caught.value)
    assert files_under(tmp_path) == before  # nothing written, in --out or anywhere else


def test_a_variant_linking_to_another_file_inside_the_folder_is_still_checked_by_hash(tmp_path):
    folder = text_artifact(tmp_path)
    shutil.move(folder / "onnx-fp32.onnx", folder / "real.onnx")
    (folder / "onnx-fp32.onnx").symlink_to("real.onnx")
    assert read_manifest(folder).verify_file() == (folder / "real.onnx").resolve()
    (folder / "real.onnx").write_bytes(b"changed")
    with pytest.raises(IntegrityError):
        read_manifest(folder).verify_file()


def test_a_huge_manifest_is_refused_before_it_is_read(tmp_path):
    """The probe's 100 MB manifest took 498 MB to refuse; now its size is the first thing checked."""
    folder = text_artifact(tmp_path)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    with open(folder / MANIFEST_NAME, "w") as handle:  # valid JSON, 100 MB of it
        handle.write(json.dumps(data)[:-1] + ', "padding": "')
        for _ in range(100):
            handle.write("x" * (1 << 20))
        handle.write('"}')
    code = ("import resource, sys\nfrom kiln.core.manifest import read_manifest\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    read_manifest({str(folder)!r})\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    *message, grown_kb = result.stdout.strip().splitlines()
    assert message and message[0].startswith("ManifestError") and "over kiln's limit of 8 MiB" in message[0], result
    assert int(grown_kb) < 20 * 1024, f"reading the manifest grew the process by {int(grown_kb) // 1024} MB"


def test_bench_and_cache_files_in_the_folder_are_capped_and_ignored_when_hostile(tmp_path, secret):
    from kiln.core.autoselect import read_cache
    from kiln.deploy.common import read_bench

    folder = text_artifact(tmp_path)
    manifest = read_manifest(folder)
    (folder / "bench.json").symlink_to(secret)
    figures, note = read_bench(manifest, manifest.variant())
    assert figures is None and "outside the folder" in note
    (folder / "bench.json").unlink()
    (folder / "bench.json").touch()
    os.truncate(folder / "bench.json", MAX_CONFIG_BYTES + 1)
    figures, note = read_bench(manifest, manifest.variant())
    assert figures is None and "over kiln's limit" in note
    (folder / "auto-variant.json").touch()
    os.truncate(folder / "auto-variant.json", MAX_CONFIG_BYTES + 1)
    assert read_cache(folder, "machine", "digest") is None


# --- the commands themselves: one line, no traceback, nothing written ---------------------------------------------


COMMANDS = {
    "serve": ["serve", "{folder}", "--port", "{port}"],
    "bench": ["bench", "{folder}", "--batch-sizes", "1", "--rounds", "1"],
    "deploy triton": ["deploy", "triton", "{folder}", "--out", "{out}"],
    "deploy kserve": ["deploy", "kserve", "{folder}", "--out", "{out}", "--image", "registry.example.com/kiln:0.1",
                      "--storage-uri", "s3://models/tiny"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["variant symlink outside", "damaged tokenizer, hash matching"])
def test_commands_refuse_hostile_artifacts_with_one_line(tmp_path, secret, case, command):
    folder = text_artifact(tmp_path / "artifacts")
    HOSTILE[case][0](folder, secret)
    out = tmp_path / "out"
    args = [a.format(folder=folder, out=out, port=free_port()) for a in COMMANDS[command]]
    result = run_kiln(*args, timeout=120)
    assert result.returncode != 0
    line = one_error_line(result.stderr, "ManifestError")
    assert HOSTILE[case][2] in line
    assert not out.exists() and not any((folder / name).exists() for name in ("bench.json", "bench.csv"))


@pytest.mark.slow
def test_export_refuses_a_folder_with_a_tokenizer_file_linking_outside(tmp_path, secret):
    folder = model_folder(tmp_path)
    (folder / "added_tokens.json").symlink_to(secret)
    out = tmp_path / "out"
    result = run_kiln("export", str(folder), "--variants", "onnx-fp32", "--out", str(out), timeout=120)
    assert result.returncode == 1
    line = one_error_line(result.stderr, "ModelSourceError")
    assert str(folder / "added_tokens.json") in line and "outside the folder" in line
    assert not out.exists() and {p.name for p in tmp_path.iterdir()} == {"elsewhere", "model"}


@pytest.mark.slow
def test_export_refuses_a_model_name_that_is_not_one_path_segment(tmp_path):
    out = tmp_path / "out"
    result = run_kiln("export", "digits", "--name", "a/b", "--out", str(out), timeout=120)
    assert result.returncode == 2
    assert "one path segment" in one_error_line(result.stderr, "UsageError") and not out.exists()


@pytest.mark.slow
def test_export_of_pickle_weights_ends_in_one_line_that_suggests_safetensors(tmp_path):
    import torch

    folder = model_folder(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    result = run_kiln("export", str(folder), "--variants", "onnx-fp32", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 1
    line = one_error_line(result.stderr, "ModelSourceError")
    assert "safetensors" in line and "weights_only" not in result.stderr and "UnpicklingError" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
