"""`kiln deploy ray`: a Ray Serve config (DIR/serve.yaml) that runs kiln's Ray application
(kiln.serve.ray_app) on any Ray cluster: `serve deploy DIR/serve.yaml`.

One application, an ingress deployment (kiln's own HTTP routes, auth and validation; no CPU asked) and one
deployment per model, each sized as the KServe writer sizes a replica (kiln.deploy.common.size_replica):
- ray_actor_options.num_cpus: --threads (else bench.json's, else 1), the cores the replica's runtime uses; Ray places
  replicas by it, so a node with N CPUs takes N of them; `memory` from bench.json's peak RSS as for KServe;
- autoscaling_config: --min-replicas/--max-replicas, target_ongoing_requests from --target-concurrency, else the
  highest concurrency of the last `kiln loadtest` that held its p99 budget, else the default; Ray's upscale and
  downscale delays from --upscale-delay-s/--downscale-delay-s (Ray's own defaults otherwise);
- max_ongoing_requests: --max-ongoing-requests, else kiln serve's --max-batch-size (a replica batches what it holds);
- max_replicas_per_node: --max-replicas-per-node, where replicas must spread over nodes (fault tolerance);
- args.batching: --batching, kiln serve's batching rule in each replica (default) or Ray's @serve.batch.
The artifact folders are named by absolute path: each node must see them there (a shared or synced filesystem).
The API key is read on the cluster from the environment variable --api-key-env names (set it where `ray start`
runs), never written into the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.console import Progress, to_stderr
from kiln.core.errors import UsageError
from kiln.core.manifest import Manifest, VariantEntry, read_manifest
from kiln.core.runtime import needs_torch
from kiln.deploy.common import ScalingOptions, resolve_variant, staged_folder
from kiln.serve.server import ServeConfig

RAY_RELEASE = "2.60.0"  # the Ray release the tests run this config on (and validate it against)
CONFIG_FILE = "serve.yaml"
IMPORT_PATH = "kiln.serve.ray_app:build"
INGRESS_NAME = "kiln-ingress"  # kiln.serve.ray_app.INGRESS_NAME (not imported: that module is the Ray extra's)
APP_NAME = "kiln"
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"  # Ray's own default; pass --host 0.0.0.0 for clients on other machines
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")
BATCHERS = ("kiln", "ray")  # kiln.serve.ray_app.BATCHERS: kiln serve's batching rule, or Ray's @serve.batch
INGRESS_MAX_ONGOING = 1024  # the ingress only parses and forwards; the models' own limits hold the load
_SERVE_DEFAULTS = ServeConfig(artifact_dirs=(".",))


@dataclass(frozen=True)
class RayOptions(ScalingOptions):
    out: Path
    variant: str | list[str] | None = None  # one for every model, or name=variant forms (as kiln serve --variant)
    api_key_env: str | None = None
    max_ongoing_requests: int | None = None
    max_batch_size: int = _SERVE_DEFAULTS.max_batch_size
    max_batch_delay_ms: float = _SERVE_DEFAULTS.max_batch_delay_ms
    max_batch_tokens: int | None = None  # text models: None = measured on each replica's node (kiln serve's default)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    proxy_location: str = "EveryNode"
    max_replicas_per_node: int | None = None
    batching: str = "kiln"
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.host not in ("127.0.0.1", "0.0.0.0", "::", "localhost"):
            raise UsageError(f"--host {self.host!r} is not supported; use 127.0.0.1 (default) or 0.0.0.0")
        if not 1024 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} must be in 1024..65535")
        if self.batching not in BATCHERS:
            raise UsageError(f"--batching {self.batching!r} is not one of {', '.join(BATCHERS)}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise UsageError(f"--proxy-location {self.proxy_location!r} is not one of {', '.join(PROXY_LOCATIONS)}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "a").isalnum():
            raise UsageError(f"--api-key-env {self.api_key_env!r} is not an environment variable name; e.g. "
                             "--api-key-env KILN_API_KEY")
        for flag, value in (("--max-ongoing-requests", self.max_ongoing_requests),
                            ("--max-replicas-per-node", self.max_replicas_per_node)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be a positive integer")


@dataclass(frozen=True)
class ModelDeployment:
    name: str
    folder: Path
    entry: VariantEntry
    threads: int
    memory_mib: int
    target_ongoing_requests: int
    max_ongoing_requests: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RayPlan:
    models: list[ModelDeployment]
    config: dict[str, Any]
    notes: list[str]


def _model(manifest: Manifest, variant: str | None, options: RayOptions) -> ModelDeployment:
    entry = resolve_variant(manifest, variant)
    notes = []
    if needs_torch(entry):
        onnx = [v.name for v in manifest.variants if v.runtime == "onnxruntime"]
        notes.append(f"{manifest.model}: {entry.name!r} loads through torch: the cluster's Python needs pip install "
                     f"'kiln[export,ray]'" + (f", or deploy an ONNX variant ({', '.join(onnx)})" if onnx else ""))
    sizing = options.size(manifest, entry, target_name="target_ongoing_requests")
    notes += [f"{manifest.model}: {note}" for note in sizing.notes]
    most = options.max_ongoing_requests or max(options.max_batch_size, sizing.target_concurrency)
    if most < sizing.target_concurrency:
        raise UsageError(f"--max-ongoing-requests {most} is below target_ongoing_requests "
                         f"{sizing.target_concurrency}: a replica could never reach its target; raise it")
    return ModelDeployment(manifest.model, manifest.folder.resolve(), entry, sizing.threads, sizing.memory_mib,
                           sizing.target_concurrency, most, notes)


def plan(manifests: list[Manifest], options: RayOptions) -> RayPlan:
    """The config and a note per figure saying where it came from; writes nothing."""
    from kiln.serve.repository import per_model

    names = [m.model for m in manifests]
    if len(set(names)) != len(names) or INGRESS_NAME in names:
        raise UsageError(f"the folders serve models named {', '.join(names)}: each needs its own name (not "
                         f"{INGRESS_NAME!r}); export one with --name")
    common, own = per_model(options.variant, names, "--variant")
    models = [_model(m, own.get(m.model, common), options) for m in manifests]
    # A replica's requests are bounded by max_ongoing_requests (below), its batches by kiln serve's batch items.
    serve_args: dict[str, Any] = {"max_batch_delay_ms": options.max_batch_delay_ms}
    if options.max_batch_tokens is not None:
        serve_args["max_batch_tokens"] = options.max_batch_tokens
    if options.api_key_env:
        serve_args["api_key_env"] = options.api_key_env
    deployments: list[dict[str, Any]] = [{"name": INGRESS_NAME, "num_replicas": 1,
                                          "max_ongoing_requests": INGRESS_MAX_ONGOING,
                                          "ray_actor_options": {"num_cpus": 0}}]
    for model in models:
        scaling: dict[str, Any] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                   "target_ongoing_requests": model.target_ongoing_requests}
        if options.upscale_delay_s is not None:
            scaling["upscale_delay_s"] = options.upscale_delay_s
        if options.downscale_delay_s is not None:
            scaling["downscale_delay_s"] = options.downscale_delay_s
        deployment = {"name": model.name, "max_ongoing_requests": model.max_ongoing_requests,
                      "autoscaling_config": scaling,
                      "ray_actor_options": {"num_cpus": model.threads, "memory": model.memory_mib * 1024 * 1024}}
        if options.max_replicas_per_node is not None:  # spread: a node lost takes at most this many replicas along
            deployment["max_replicas_per_node"] = options.max_replicas_per_node
        deployments.append(deployment)
    config = {
        "proxy_location": options.proxy_location,
        "http_options": {"host": options.host, "port": options.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"models": [{"name": m.name, "folder": str(m.folder), "variant": m.entry.name,
                                 "threads": m.threads} for m in models],
                     "serve": serve_args, "batching": options.batching},
            "deployments": deployments,
        }],
    }
    notes = [note for m in models for note in m.notes]
    return RayPlan(models, config, notes)


def write_ray(folders: list[str | Path], options: RayOptions, progress: Progress = to_stderr) -> RayPlan:
    """Check every folder (manifest, the variant's sha256), then write DIR/serve.yaml atomically."""
    from kiln.deploy.kserve import to_yaml
    from kiln.serve.repository import model_folders

    manifests = [read_manifest(folder) for folder in model_folders([str(f) for f in folders])]
    result = plan(manifests, options)
    for manifest, model in zip(manifests, result.models):
        manifest.verify_file(model.entry.name)  # what the replicas open is what was verified
    sources = "; ".join(f"{m.name} {m.entry.name} (sha256 {m.entry.sha256[:12]}...) at {m.folder}"
                        for m in result.models)
    key = (f"The API key: ${options.api_key_env} in the environment of `ray start` on every node.\n"
           if options.api_key_env else "")
    comment = (f"Written by `kiln deploy ray` from {sources}.\n"
               f"A Ray Serve config (Ray {RAY_RELEASE}): `serve deploy {CONFIG_FILE}` on a cluster whose Python has "
               f"pip install 'kiln[ray]'.\nEvery node must see the artifact folders at these paths.\n{key}"
               f"HTTP on {options.host}:{options.port} (proxy_location {options.proxy_location}).")
    with staged_folder(Path(options.out), options.force) as staging:
        (staging / CONFIG_FILE).write_text(to_yaml(result.config, comment))
    for note in result.notes:
        progress(f"[kiln] deploy ray: {note}")
    return result
