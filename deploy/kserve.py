"""`kiln deploy kserve`: a KServe ServingRuntime that runs `kiln serve` in the kiln image, and an InferenceService
that uses it, as two YAML files an operator applies unchanged (`kubectl apply -f DIR`).

Checked against KServe v0.20.0's CRDs (tests/test_deploy.py). The runtime follows KServe's custom V2 runtime
contract: one container named `kserve-container` with one port, the model at /mnt/models (the storage initializer
downloads storageUri there), probes on kiln's V2 health routes, Prometheus annotations for /metrics on the same port.

Figures come from the artifact folder where kiln measured them, with documented defaults where it did not
(kiln.deploy.common.size_replica, which any writer for a stack that sizes replicas shares):
- memory: bench.json's peak RSS of the variant (one inference worker, at its largest batch) times MEMORY_MARGIN,
  plus SERVER_OVERHEAD_MIB for the server's other processes (`kiln serve` is 5 processes; on digits, serve-only
  install, the four besides the worker held ~190 MiB); DEFAULT_MEMORY_MIB without a bench.
- CPU: --threads (else bench.json's threads, else 1) cores requested for the inference worker; the limit adds one
  core for the HTTP and batching processes. The server is always given --threads: inside a container ONNX Runtime
  and torch would otherwise size their pools to the node's cores, not to the CPU limit.
- scaleTarget (concurrency per replica): --target-concurrency, else the highest concurrency of the last
  `kiln loadtest` (loadtest.json) that answered everything with p99 within --p99-budget-ms, else
  DEFAULT_TARGET_CONCURRENCY.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.console import Progress, to_stderr
from kiln.core.errors import UsageError
from kiln.core.manifest import Manifest, VariantEntry, read_manifest
from kiln.core.runtime import needs_torch
from kiln.deploy.common import ScalingOptions, resolve_variant, staged_folder

KSERVE_RELEASE = "v0.20.0"  # the release whose CRD schemas the tests validate against
MODEL_FORMAT = {"name": "kiln", "version": "1"}
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri's contents
PORT = 8080
# gRPC (`kiln serve --grpc-port`) beside HTTP, as KServe's own Triton runtime runs it: HTTP on the container's one
# port (probes and /metrics there too), gRPC on GRPC_PORT; an InferenceService picks gRPC with `protocolVersion:
# grpc-v2` and `ports: [{name: h2c, containerPort: 8081}]` (README: KServe).
GRPC_PORT = 8081
COMMAND = ["kiln"]  # the image's ENTRYPOINT (Dockerfile); given explicitly so any image with kiln on PATH works
CONTAINER_NAME = "kserve-container"
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
API_KEY_ENV = "KILN_API_KEY"
SERVINGRUNTIME_FILE = "servingruntime.yaml"
INFERENCESERVICE_FILE = "inferenceservice.yaml"

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
# A container image reference (Docker's distribution/reference grammar): [host[:port]/]path[:tag][@sha256:digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
_IMAGE = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                    r"(?:@sha256:[a-f0-9]{64})?")
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https", "http", "hdfs", "webhdfs", "oci", "hf")


def check_image(image: str) -> str:
    if not image or not _IMAGE.fullmatch(image):
        raise UsageError(f"--image {image!r} is not a container image reference; e.g. --image "
                         "registry.example.com/kiln:0.1.0 (lowercase path, no spaces)")
    return image


def check_storage_uri(uri: str) -> str:
    match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://(\S+)", uri or "")
    if not match or match.group(1) not in STORAGE_SCHEMES:
        raise UsageError(f"--storage-uri {uri!r} is not a URI KServe's storage initializer fetches; use one of "
                         f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} pointing at the uploaded artifact folder")
    return uri


def dns_label(flag: str, name: str) -> str:
    if not _DNS_LABEL.fullmatch(name or ""):
        raise UsageError(f"{flag} {name!r} is not a Kubernetes name: lowercase letters, digits and '-', starting "
                         "with a letter, at most 63 characters; e.g. --name digits")
    return name


def default_name(model: str) -> str:
    """The manifest's model name as a Kubernetes name (lowercase, '-' for anything else)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:63].rstrip("-")
    return name or "kiln-model"


@dataclass(frozen=True)
class KServeOptions(ScalingOptions):
    out: Path
    image: str
    storage_uri: str
    name: str | None = None
    variant: str | None = None
    api_key_secret: str | None = None
    api_key_secret_key: str = "api-key"
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image(self.image)
        check_storage_uri(self.storage_uri)
        if self.name is not None:
            dns_label("--name", self.name)
        if self.api_key_secret is not None and not _SECRET_NAME.fullmatch(self.api_key_secret):
            raise UsageError(f"--api-key-secret {self.api_key_secret!r} is not a Kubernetes Secret name (lowercase "
                             "letters, digits, '-' and '.')")
        if not _SECRET_KEY.fullmatch(self.api_key_secret_key):
            raise UsageError(f"--api-key-secret-key {self.api_key_secret_key!r} is not a Secret key (letters, "
                             "digits, '-', '_' and '.')")


@dataclass(frozen=True)
class KServePlan:
    name: str
    runtime_name: str
    entry: VariantEntry
    serving_runtime: dict[str, Any]
    inference_service: dict[str, Any]
    memory_mib: int
    threads: int
    scale_target: int
    notes: list[str]

    @property
    def container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.serving_runtime["spec"]["containers"][0]
        return container


def serve_args(variant: str, threads: int, api_key: bool) -> list[str]:
    """`kiln serve`'s arguments in the container (after COMMAND)."""
    args = ["serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT), "--variant", variant,
            "--threads", str(threads), "--grpc-port", str(GRPC_PORT)]
    if api_key:
        # The Prometheus annotations below are scraped without credentials: /metrics stays open (it names the
        # model and variant, which the resources here name too); the inference routes need the key.
        args += ["--metrics-open", "--api-key-env", API_KEY_ENV]
    return args


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period_s, "timeoutSeconds": 2,
            "failureThreshold": failures}


def plan(manifest: Manifest, options: KServeOptions) -> KServePlan:
    """Both documents and the figures in them, with a note per figure saying where it came from; writes nothing."""
    entry = resolve_variant(manifest, options.variant)
    name = options.name or dns_label("the model name (give --name)", default_name(manifest.model))
    runtime_name = f"kiln-{name}"[:63].rstrip("-")
    notes: list[str] = []
    if needs_torch(entry):
        onnx = [v.name for v in manifest.variants if v.runtime == "onnxruntime"]
        notes.append(f"WARNING: {entry.name!r} loads through torch, which kiln's serving image does not install: use "
                     f"an image built with pip install 'kiln[export]'"
                     + (f", or deploy an ONNX variant ({', '.join(onnx)}) with --variant" if onnx else ""))

    sizing = options.size(manifest, entry)
    notes += sizing.notes
    threads, memory, target = sizing.threads, sizing.memory_mib, sizing.target_concurrency

    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "kiln"}
    serving_runtime = _serving_runtime(runtime_name, labels, _container(options, entry, threads, memory))
    inference_service = _inference_service(name, runtime_name, labels, options, target)
    return KServePlan(name, runtime_name, entry, serving_runtime, inference_service, memory, threads, target, notes)


def _container(options: KServeOptions, entry: VariantEntry, threads: int, memory: int) -> dict[str, Any]:
    """`kiln serve` in the kiln image: the request is the inference worker's cores, the limit one more for the HTTP
    and batching processes; the API key, when there is one, from a Secret."""
    api_key = options.api_key_secret is not None
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": options.image,
        "command": list(COMMAND),
        "args": serve_args(entry.name, threads, api_key),
    }
    if api_key:
        container["env"] = [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": options.api_key_secret, "key": options.api_key_secret_key}}}]
    container.update({
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": _probe(READY_PATH, 5, 3),
        "livenessProbe": {**_probe(LIVE_PATH, 10, 3), "initialDelaySeconds": 10},
        "resources": {
            "requests": {"cpu": str(threads), "memory": f"{memory}Mi"},
            "limits": {"cpu": str(threads + 1), "memory": f"{memory}Mi"},
        },
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    })
    return container


def _serving_runtime(runtime_name: str, labels: dict[str, str], container: dict[str, Any]) -> dict[str, Any]:
    prometheus = {"prometheus.kserve.io/port": str(PORT), "prometheus.kserve.io/path": METRICS_PATH}
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": runtime_name, "labels": labels},
        "spec": {
            "annotations": prometheus,  # put on the predictor pods, where KServe's scraping reads them
            "supportedModelFormats": [{**MODEL_FORMAT, "autoSelect": True}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [container],
        },
    }


def _inference_service(name: str, runtime_name: str, labels: dict[str, str], options: KServeOptions,
                       target: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"}},
        "spec": {"predictor": {
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "scaleMetric": "concurrency",
            "scaleTarget": target,
            "model": {
                "modelFormat": dict(MODEL_FORMAT),
                "runtime": runtime_name,
                "protocolVersion": "v2",
                "storageUri": options.storage_uri,
            },
        }},
    }


def to_yaml(document: dict[str, Any], comment: str) -> str:
    import yaml

    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def write_kserve(folder: str | Path, options: KServeOptions, progress: Progress = to_stderr) -> KServePlan:
    manifest = read_manifest(folder)
    result = plan(manifest, options)
    manifest.verify_file(result.entry.name)  # the folder to upload must be the one that was verified
    source = f"model {manifest.model!r}, variant {result.entry.name!r} (sha256 {result.entry.sha256})"
    runtime_comment = (
        f"Written by `kiln deploy kserve` from {source}.\n"
        f"KServe ServingRuntime (checked against KServe {KSERVE_RELEASE}'s CRDs): runs `kiln serve` on the artifact folder\n"
        f"that the storage initializer puts at {MODEL_DIR}. Apply it before {INFERENCESERVICE_FILE}.")
    service_comment = (
        f"Written by `kiln deploy kserve` from {source}.\n"
        f"Upload the artifact folder (manifest.json and its files) to {options.storage_uri} first.\n"
        f"scaleMetric concurrency needs KServe's Serverless (Knative) mode.")
    with staged_folder(Path(options.out), options.force) as staging:
        (staging / SERVINGRUNTIME_FILE).write_text(to_yaml(result.serving_runtime, runtime_comment))
        (staging / INFERENCESERVICE_FILE).write_text(to_yaml(result.inference_service, service_comment))
    for note in result.notes:
        progress(f"[kiln] deploy kserve: {note}")
    return result
