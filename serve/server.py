"""Builds the LitServer for one or more artifact folders and runs it.

Every manifest is read and every variant's hash checked before any process starts (serve.repository), so a bad
folder fails fast with one line. Each model is its own LitAPI with its own inference workers, worker channel and
batching, so one model's crash or overload fails only that model's requests; they share the HTTP process, its
routes, auth and metrics. The server binds 127.0.0.1 unless told otherwise; SIGTERM is a graceful
stop (stop accepting, finish what is in flight, exit with the whole process group).

uvicorn runs with kiln's own HTTP protocol class (serve.connections: head deadline, head size limits, connection
cap, JSON errors below the app), passed through LitServer.run, which hands its keyword arguments to uvicorn.Config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass

from kiln.core.errors import UsageError
from kiln.core.secrets import MIN_KEY_LENGTH, api_key_from_env

INTERNAL_PATH = "/_kiln/worker"  # + /<index>: each model's LitServe route, internal (kiln's routes are the public ones)


@dataclass(frozen=True)
class ServeConfig:
    """`variant`, `workers` and `threads` take one value for every model or `name=value` forms (serve.repository)."""

    artifact_dirs: tuple[str, ...]
    variant: str | list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    workers: int | list[str] = 1
    threads: int | list[str] | None = None
    api_key_env: str | None = None
    timeout_s: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_items: int = 64
    body_timeout_s: float = 10.0
    log_level: str = "warning"
    max_batch_items: int | None = None  # None: TEXT_BATCH_ITEMS for text models, TENSOR_BATCH_ITEMS for others
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 256
    metrics_open: bool = False  # /metrics answers without the API key (it needs it by default when one is set)
    poll_s: float | None = None  # --poll: seconds between looks at the repositories (None: no polling)
    otlp_endpoint: str | None = None  # --otlp-endpoint (else $OTEL_EXPORTER_OTLP_ENDPOINT): where traces go
    grpc_port: int | None = None  # the gRPC server's port (serve.grpc_server); None: no gRPC
    max_queued_requests: int | list[str] | None = None  # per model (N or name=N): past it 429 at once; None: no cap
    max_batch_tokens: int | None = None  # text models: N positions a batch, cut by length; 0: rows only; None: measured

    def __post_init__(self) -> None:
        if isinstance(self.artifact_dirs, str):
            object.__setattr__(self, "artifact_dirs", (self.artifact_dirs,))
        if not self.artifact_dirs:
            raise UsageError("name at least one artifact folder (or a repository of them) to serve")
        if self.host not in ("127.0.0.1", "0.0.0.0", "::", "localhost"):
            raise UsageError(f"--host {self.host!r} is not supported; use 127.0.0.1 (default) or 0.0.0.0")
        if not 1024 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} must be in 1024..65535")
        if self.max_batch_size < 1 or self.max_items < 1 or (isinstance(self.workers, int) and self.workers < 1):
            raise UsageError("--max-batch-size, --workers and --max-items must be positive integers")
        if isinstance(self.max_queued_requests, int) and self.max_queued_requests < 1:
            raise UsageError("--max-queued-requests must be a positive integer")
        if isinstance(self.threads, int) and self.threads < 1:
            raise UsageError("--threads must be a positive integer")
        if not 0 <= self.max_batch_delay_ms <= 1000:
            raise UsageError("--max-batch-delay-ms must lie in 0..1000")
        if self.timeout_s <= 0:
            raise UsageError("--timeout must be positive (seconds)")
        if self.body_timeout_s <= 0:
            raise UsageError("--body-timeout must be positive (seconds)")
        if self.max_body_bytes < 1024:
            raise UsageError("--max-body-bytes must be at least 1024")
        if self.max_batch_items is not None and self.max_batch_items < 1:
            raise UsageError("--max-batch-items must be a positive integer")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 0:
            raise UsageError("--max-batch-tokens must be a positive integer (0: batches bounded by requests only)")
        if self.header_timeout_s <= 0:
            raise UsageError("--header-timeout must be positive (seconds)")
        if self.max_header_bytes < 1024:
            raise UsageError("--max-header-bytes must be at least 1024")
        if self.max_headers < 8:
            raise UsageError("--max-headers must be at least 8")
        if self.max_connections < 1:
            raise UsageError("--max-connections must be a positive integer")
        if self.poll_s is not None and not 0.1 <= self.poll_s <= 86400:
            raise UsageError("--poll must lie in 0.1..86400 (seconds)")
        if self.grpc_port is not None and (not 1024 <= self.grpc_port <= 65535 or self.grpc_port == self.port):
            raise UsageError(f"--grpc-port {self.grpc_port} must be in 1024..65535 and differ from --port")

    def batch_items(self, text: bool) -> int:
        """--max-batch-items, or its default for the model: sequences cost far more per item than tensors."""
        if self.max_batch_items is not None:
            return self.max_batch_items
        return TEXT_BATCH_ITEMS if text else TENSOR_BATCH_ITEMS

    def batch_tokens(self, plan) -> tuple[int, str]:
        """A text model's token budget (0: none) and where it came from (serve.admission.token_budget)."""
        from kiln.serve.admission import token_budget

        return token_budget(self.max_batch_tokens, plan.folder, plan.variant, plan.threads)

    def connection_limits(self):
        from kiln.serve.connections import ConnectionLimits

        return ConnectionLimits(self.header_timeout_s, self.max_header_bytes, self.max_headers, self.max_connections)


# A batch's size in items, at most (the items of all its requests together), unless --max-batch-items says.
TEXT_BATCH_ITEMS = 64  # sequences: a batch of 64 x 128 tokens already takes seconds on one CPU thread
TENSOR_BATCH_ITEMS = 1024


def served_model(manifest, variant, max_items: int, max_batch_items: int, served: dict[str, str],
                 name: str | None = None, version: str = "1"):
    from kiln.core.runtime import runtime_spec
    from kiln.serve.protocol import ServedModel

    return ServedModel(
        name=name or manifest.model,
        version=version,
        task=manifest.task,
        signature=manifest.signature,
        text=manifest.is_text,
        max_items=max_items,
        platform=runtime_spec(variant.runtime, variant.name).v2_platform,
        max_batch_items=max_batch_items,
        labels=tuple(manifest.preprocessing.get("labels") or ()) if manifest.is_text else (),
        served_variant=served,
    )


def api_key(config: ServeConfig) -> str | None:
    return api_key_from_env(config.api_key_env, min_length=MIN_KEY_LENGTH)


def middlewares(config: ServeConfig, inference, key: str | None, metrics) -> list:
    """kiln's ASGI stack around the app, innermost first (each added with Starlette's add_middleware, so the last is
    outermost): the inference fast path, body limits, auth, metrics, path spelling. `kiln serve` and the Ray Serve
    ingress (serve.ray_app) both wrap their app in it."""
    from kiln.serve.guards import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware, PathNormalizer
    from kiln.serve.routes import InferenceFastPath

    stack: list = [(InferenceFastPath, {"inference": inference}),  # innermost: after auth, limits and metrics
                   (BodyLimitMiddleware, {"max_bytes": config.max_body_bytes, "read_timeout_s": config.body_timeout_s})]
    if key:
        stack.append((ApiKeyMiddleware, {"api_key": key, "metrics_open": config.metrics_open}))
    stack.append((MetricsMiddleware, {"metrics": metrics}))  # counts 401s and 413s too
    stack.append(PathNormalizer)  # outermost: auth and routing see one spelling of each path
    return stack


def model_parts(config: ServeConfig, plan, channel_path: str, metrics, queue_cap: int | None = None):
    """What one model version needs in the HTTP process and in its workers: (ServedModel, KilnAPI, WorkerGateway).
    The same at start (LitServe starts the workers) and for a version loaded later (serve.control starts them)."""
    from kiln.serve.admission import batch_admission
    from kiln.serve.api import KilnAPI
    from kiln.serve.batching import AdaptiveBatchedLoop
    from kiln.serve.channel import WorkerGateway

    batch_items = config.batch_items(plan.manifest.is_text)
    model = served_model(plan.manifest, plan.variant, config.max_items, batch_items, plan.served.parameters,
                         plan.name, plan.version)
    tokens = config.batch_tokens(plan)[0] if plan.manifest.is_text else 0
    loop = AdaptiveBatchedLoop(config.max_batch_delay_ms / 1000.0, channel_path, batch_items,
                               batch_admission(config.max_batch_size, batch_items, tokens))
    api = KilnAPI(plan.folder, plan.variant.name, plan.threads, config.max_batch_size, loop,
                  f"{INTERNAL_PATH}/{plan.index}")  # each model's own LitServe route and request queue
    gateway = WorkerGateway(channel_path, plan.workers, config.timeout_s, metrics.model(plan.name), plan.name,
                            queue_cap)
    return model, api, gateway


def info_labels(plan) -> dict[str, str]:
    """A served version's kiln_info labels."""
    return {"model": plan.name, "version": plan.version, "variant": plan.variant.name, "how": plan.served.how}


def build_server(config: ServeConfig, state_dir: str):
    import litserve as ls

    from kiln.serve.control import ModelControl, Version
    from kiln.serve.litserve_private import drop_gzip, hide_routes, wrap_lifespan
    from kiln.serve.metrics import Metrics
    from kiln.serve.offload import Offload
    from kiln.serve.repository import _positive as positive_int
    from kiln.serve.repository import per_model, plan_models
    from kiln.serve.routes import Endpoint, Inference, add_routes
    from kiln.serve.tracing import endpoint_from, require

    otlp = endpoint_from(config.otlp_endpoint)
    if otlp is not None:
        require()  # the SDK missing: refused now, in one line, not in the HTTP process
    plans = plan_models(config)
    queue_cap, queue_caps = per_model(config.max_queued_requests, [plan.name for plan in plans],
                                      "--max-queued-requests", positive_int)
    key = api_key(config)
    metrics = Metrics({plan.name: info_labels(plan) for plan in plans})
    endpoints = {}
    apis = []
    started = []
    for plan in plans:
        channel_path = os.path.join(state_dir, f"worker-{plan.index}.sock")
        model, api, gateway = model_parts(config, plan, channel_path, metrics, queue_caps.get(plan.name, queue_cap))
        endpoints[plan.name] = Endpoint(model, gateway)
        apis.append(api)
        started.append(Version(plan.name, plan.version, plan.folder, "READY", endpoint=endpoints[plan.name],
                               plan=plan))
    offload = Offload({name: endpoint.model for name, endpoint in endpoints.items()}, config.max_body_bytes)
    inference = Inference(endpoints, config.max_body_bytes, offload)
    inference.control = ModelControl(inference, config, state_dir, metrics, started, len(plans),
                                     lambda plan, path, metrics: model_parts(config, plan, path, metrics,
                                                                             queue_caps.get(plan.name, queue_cap)),
                                     info_labels)
    server = ls.LitServer(
        apis,
        accelerator="cpu",
        workers_per_device={api.api_path: plan.workers for api, plan in zip(apis, plans)},
        timeout=config.timeout_s,
        middlewares=middlewares(config, inference, key, metrics),
        restart_workers=True,
    )
    # LitServe's private parts (serve.litserve_private says why each): no gzip, only kiln's routes, and the
    # gateways started and stopped with the HTTP process.
    drop_gzip(server)
    hide_routes(server, (api.api_path for api in apis))  # the workers' own LitServe routes are internal

    from importlib.metadata import version

    @contextlib.asynccontextmanager
    async def gateways(app):  # the gateways (and the gRPC server) live in the HTTP process, started with it
        for endpoint in endpoints.values():
            await endpoint.gateway.start()
        inference.control.start()  # --poll's watch, and the watch over the workers it starts itself
        if otlp is not None:
            from kiln.serve.tracing import Tracing

            inference.tracing = Tracing(otlp)  # its export thread lives in the HTTP process
        grpc_server = None
        try:
            if config.grpc_port is not None:
                try:
                    grpc_server = await start_grpc(config, inference, key, metrics, version("kiln"))
                except OSError as exc:  # taken since serve() checked it: stop the whole server, not only HTTP
                    print(f"kiln: error: {exc}", flush=True)
                    os.kill(os.getppid(), signal.SIGTERM)
                    raise
            yield
        finally:
            if grpc_server is not None:  # in-flight RPCs get the request timeout to finish, as HTTP's do
                await grpc_server.stop(config.timeout_s)
            await inference.control.close()  # every gateway (also those of versions loaded since) and worker
            await asyncio.to_thread(offload.close)
            if inference.tracing is not None:
                await asyncio.to_thread(inference.tracing.shutdown)  # what is still buffered goes out

    wrap_lifespan(server, gateways)
    add_routes(server.app, inference, metrics, version("kiln"))
    return server, plans, metrics, inference


async def start_grpc(config: ServeConfig, inference, key: str | None, metrics, server_version: str):
    """The gRPC server (serve.grpc_server) on the HTTP process's event loop, over the same endpoints, versions, model
    control and tracing as HTTP's `inference` (the same dicts: a load or unload changes both at once)."""
    from kiln.serve import grpc_server
    from kiln.serve.guards import KeyCheck
    from kiln.serve.inference import InferenceService

    service = InferenceService(inference.endpoints, KeyCheck(key) if key else None, metrics)
    service.versions = inference.versions
    service.control = inference.control
    service.tracing = inference.tracing
    assert config.grpc_port is not None
    server = await grpc_server.start(service, config.host, config.grpc_port, config.max_body_bytes,
                                     config.max_connections, server_version)
    print(f"kiln: gRPC (inference.GRPCInferenceService) on {config.host}:{config.grpc_port}", flush=True)
    return server


def uvicorn_options(config: ServeConfig, metrics, retry_after=None) -> dict:
    """What kiln passes to uvicorn (through LitServer.run) for its connection layer (serve.connections);
    `retry_after` (() -> seconds) is the Retry-After its 503s give."""
    from kiln.serve.connections import http_implementation

    limits = config.connection_limits()
    options: dict = {"ws": "none", "timeout_keep_alive": 5}
    if http_implementation() == "httptools":
        from kiln.serve.http_protocol import make_protocol

        options["http"] = make_protocol(limits, metrics, retry_after)
    else:  # uvicorn's h11 path: its own limits only (text/plain answers, no head deadline, no probe exemption)
        print("kiln: warning: httptools is not installed; uvicorn's h11 parser serves without kiln's head deadline, "
              "JSON errors and probe exemption (pip install httptools)", flush=True)
        options.update(http="h11", h11_max_incomplete_event_size=limits.max_header_bytes,
                       limit_concurrency=limits.max_connections)
    return options


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fails the start before any process is spawned when a port is taken (a server that came up without it would
    look healthy to half its clients)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"{flag} {port} cannot be bound on {host} ({exc.strerror}); is another server on "
                             f"it? choose another {flag}") from None


def raise_open_file_limit(config: ServeConfig) -> None:
    """The HTTP process holds up to max_connections + headroom client sockets, plus its own files: raise the soft
    RLIMIT_NOFILE toward that (children inherit it), and say so if the hard limit does not allow it."""
    import resource

    needed = config.connection_limits().max_open + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < needed:
            print(f"kiln: warning: --max-connections {config.max_connections} needs about {needed} open files; the "
                  f"limit is {soft} (ulimit -n): lower --max-connections or raise the limit", flush=True)


def serve(config: ServeConfig) -> None:
    if config.grpc_port is not None:
        check_port_free(config.host, config.grpc_port, "--grpc-port")
    state_dir = tempfile.mkdtemp(prefix="kiln-serve-")
    try:
        server, plans, metrics, inference = build_server(config, state_dir)

        main_pid = os.getpid()

        def stop(signum, frame):
            """SIGTERM: the same graceful path as Ctrl-C in the main process. The HTTP process inherits this
            handler but has its own (uvicorn's), which re-raises the signal once it has drained: exit quietly."""
            if os.getpid() == main_pid:
                raise KeyboardInterrupt
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        for plan in plans:
            budget = f"; token budget {config.batch_tokens(plan)[1]}" if plan.manifest.is_text else ""
            print(f"kiln: serving {plan.name} ({plan.variant.name}, {plan.served.how}: {plan.served.reason}; "
                  f"{plan.workers} worker(s), {plan.threads or 'all'} thread(s) each{budget}) at "
                  f"http://{config.host}:{config.port}/v2/models/{plan.name}/infer", flush=True)
        single = "/predict, " if len(plans) == 1 else ""
        print(f"kiln: {len(plans)} model(s) on http://{config.host}:{config.port} [{single}/v2/models/{{name}}/infer, "
              "/v2/models/{name}/predict, /v2/repository/index, /metrics]", flush=True)
        raise_open_file_limit(config)
        try:
            server.run(host=config.host, port=config.port, generate_client_file=False, num_api_servers=1,
                       log_level=config.log_level, **uvicorn_options(config, metrics, inference.retry_after_s))  # metrics: the connection layer counts into it too
        except KeyboardInterrupt:
            pass
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
