"""kiln as a Ray Serve application: `serve deploy` a config written by `kiln deploy ray` (import path
`kiln.serve.ray_app:build`), and every node of a Ray cluster can run kiln's replicas.

One application, two kinds of deployment:
- the ingress (INGRESS_NAME): kiln's own ASGI app, the one `kiln serve` answers with (serve.routes' routes and
  fast path, serve.server.middlewares: auth, body limits, metrics), so the V2 JSON and binary routes, health and
  readiness, /predict and /v1/embeddings parse, validate and answer exactly as on `kiln serve`. Only its gateways
  differ: a RayGateway sends each validated request to the model's deployment through a Ray DeploymentHandle
  instead of a LitServe worker socket. It holds no model and asks for no CPU (ray_actor_options.num_cpus 0).
- one deployment per model (named as the model): ModelReplica, a core.runner.ModelRunner opened once per replica
  (the runtime registry, the manifest's sha256 checks, the thread setting), batched as below.
  Ray scales these (autoscaling_config) and places them by their num_cpus, across nodes.

Batching: each replica batches as kiln serve does by default (KilnBatcher: kiln serve's admission policy, for text
models the token budget cut by length (serve.admission.TokenBudgetAdmission, the budget measured per model as
`kiln serve` does, on the replica's own node), and serve.batching.BatchCostModel, on the replica's event loop; a
lone request never waits for a batch window), or with
Ray's `@serve.batch` (args.batching "ray"; `batch_size_fn` counts items, as kiln's --max-batch-items does), which
waits out its timeout whenever a batch is not full. Measured on 2 cores (benchmarks/ray_vs_serve.py), kiln's rule
answered digits at concurrency 1 in 8.1 ms p50 against 12.0 ms, and MiniLM at concurrency 32 at 200 req/s against
163: it is the default.

Ray is imported inside the functions that need it: the rest of kiln.serve imports without the `ray` extra.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from kiln.core.errors import UsageError
from kiln.core.runner import ModelRunner, WorkItem
from kiln.serve.admission import batch_admission, cut_batch, token_budget
from kiln.serve.batching import BatchCostModel
from kiln.serve.channel import Result, batch_results
from kiln.serve.protocol import RequestError

BATCHERS = ("kiln", "ray")  # args.batching: kiln serve's rule (KilnBatcher) or Ray's @serve.batch
INGRESS_NAME = "kiln-ingress"  # the ingress deployment's name in the config (models take their own names)
# ServeConfig fields a Ray config's `args.serve` may set: the request limits and batching of `kiln serve`. The rest
# (host, port, workers, connection limits) belong to Ray's proxy and autoscaler there.
SERVE_FIELDS = ("max_batch_size", "max_batch_delay_ms", "max_batch_items", "max_batch_tokens", "timeout_s",
                "max_body_bytes", "max_items", "body_timeout_s", "api_key_env", "metrics_open")


@dataclass(frozen=True)
class ModelArgs:
    """One model of the application, as the config's `args.models` lists it."""

    name: str
    folder: str
    variant: str | None = None
    threads: int | None = None


def parse_args(args: dict[str, Any]):
    """The config's `args` as ([ModelArgs], serve.server.ServeConfig): what a refusal should name is the config."""
    from kiln.serve.server import ServeConfig

    if not isinstance(args, dict) or not isinstance(args.get("models"), list) or not args["models"]:
        raise UsageError("the Ray config's args need `models`: a list of {name, folder, variant, threads}; write it "
                         "with `kiln deploy ray`")
    unknown_keys = set(args) - {"models", "serve", "batching"}
    if unknown_keys:
        raise UsageError(f"the Ray config's args take models, serve and batching; not {', '.join(sorted(unknown_keys))}")
    known = {f.name for f in fields(ModelArgs)}
    models = []
    for entry in args["models"]:
        if not isinstance(entry, dict) or set(entry) - known or not {"name", "folder"} <= set(entry):
            raise UsageError(f"args.models entry {entry!r}: give name and folder, and optionally variant and threads")
        models.append(ModelArgs(**entry))
    serve = args.get("serve") or {}
    unknown = set(serve) - set(SERVE_FIELDS)
    if not isinstance(serve, dict) or unknown:
        raise UsageError(f"args.serve may set {', '.join(SERVE_FIELDS)}; not {', '.join(sorted(unknown))}")
    config = ServeConfig(
        artifact_dirs=tuple(m.folder for m in models),
        variant=[f"{m.name}={m.variant}" for m in models if m.variant],
        threads=[f"{m.name}={m.threads}" for m in models if m.threads],
        **serve)
    return models, config


def build(args: dict[str, Any]):
    """Ray Serve's application builder (the config's `import_path`): the ingress bound to one deployment per model.

    Every manifest is read and every variant's sha256 checked here, where `serve deploy` builds the application,
    so a bad folder fails the deploy with kiln's message before any replica starts."""
    from ray import serve

    from kiln.serve.repository import plan_models

    models, config = parse_args(args)
    batching = args.get("batching", "kiln")
    if batching not in BATCHERS:
        raise UsageError(f"args.batching {batching!r} is not one of {', '.join(BATCHERS)}")
    plans = plan_models(config)
    names = {m.name for m in models}
    for plan in plans:
        if plan.name not in names:
            raise UsageError(f"the folder {plan.folder} holds model {plan.name!r}, which args.models names otherwise; "
                             "re-run `kiln deploy ray`")
    handles = {}
    for plan in plans:
        deployment = serve.deployment(ModelReplica, name=plan.name)
        handles[plan.name] = deployment.bind(plan.folder, plan.variant.name, plan.threads, config.max_batch_delay_ms,
                                             config.batch_items(plan.manifest.is_text), config.max_batch_size,
                                             batching, config.max_batch_tokens)
    ingress = serve.deployment(serve.ingress()(KilnIngress), name=INGRESS_NAME)
    return ingress.bind(handles, args)


class ModelReplica:
    """One replica of one model: a ModelRunner, and a batcher in front of it (`batching`: BATCHERS)."""

    def __init__(self, folder: str, variant: str, threads: int | None, max_batch_delay_ms: float,
                 batch_items: int, max_requests: int, batching: str = "kiln",
                 max_batch_tokens: int | None = None) -> None:
        self.runner = ModelRunner(folder, variant, threads)
        # Warm-up: the first run allocates and picks kernels; pay that before Ray reports the replica running.
        self.runner.run(self.runner.prepare([self.runner.example(1)]))
        self.batches_run = 0
        self.cost_model = BatchCostModel()
        delay_s = max_batch_delay_ms / 1000.0
        if batching == "ray":
            from ray import serve

            # At most `batch_items` items (kiln serve's --max-batch-items), whatever the request count; a batch
            # waits up to `delay_s` to fill, every time it is not full.
            self.infer = serve.batch(max_batch_size=batch_items, batch_wait_timeout_s=delay_s,
                                     batch_size_fn=lambda items: sum(item.count for item in items))(self.run_batch)
        else:
            # kiln serve's policy: for a text model a token budget, --max-batch-tokens or measured here, on this
            # replica's node, from the folder's bench.json.
            runner = self.runner
            tokens = (token_budget(max_batch_tokens, runner.folder, runner.variant, runner.threads)[0]
                      if runner.preprocess is not None else 0)
            self.infer = KilnBatcher(self.run_batch, batch_admission(max_requests, batch_items, tokens),
                                     self.cost_model, delay_s, runner.measure).submit

    async def __call__(self, item: WorkItem) -> Result:
        return await self.infer(item)

    async def run_batch(self, items: list[WorkItem]) -> list[Result]:
        batch = self.runner.prepare(items)
        # The runtime releases the GIL: the replica's loop keeps taking requests (the next batch) meanwhile.
        ran = await asyncio.to_thread(self.runner.run, batch)
        if ran.whole_s is not None:
            self.cost_model.learn(sum(batch.counts), ran.whole_s, ran.padded_tokens)
        self.batches_run += 1
        return batch_results(batch, ran, f"{os.getpid()}-{self.batches_run}")

    def where(self) -> dict[str, Any]:
        """The node and process this replica runs in (tests check placement and kill one)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class KilnBatcher:
    """kiln serve's batching rule (serve.batching.AdaptiveBatchedLoop) on a replica's event loop: no request waits
    for a batch window. A batch is what queued while the last one ran, cut by the admission policy; a backlog batch
    (two or more) waits up to `delay_s` for more only where the cost model measured fuller batches cheaper per item.
    Ray's `@serve.batch` instead waits out its timeout whenever a batch is not full, a lone request included."""

    def __init__(self, run, admission, cost_model: BatchCostModel, delay_s: float, measure=None) -> None:
        self.run = run  # async (items) -> one Result per item
        self.admission = admission
        self.cost_model = cost_model
        self.delay_s = delay_s
        # A length-aware policy (TokenBudgetAdmission) cuts from everything waiting, by length, oldest first;
        # `measure` (ModelRunner.measure) tokenizes requests as they arrive, so their lengths are known.
        self.by_length = getattr(admission, "cuts_by_length", False)
        self.measure = measure
        self.pending: deque[_Waiting] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def submit(self, item: WorkItem) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.by_length and self.measure is not None:
            self.measure([item])  # a tokenizer error fails this request alone, here
        # Every request of a replica has the ingress's one timeout, so the oldest has the earliest deadline.
        self.pending.append(_Waiting(item, future, loop.time()))
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop())
        return await future

    def _take(self, taken: list) -> None:
        if self.by_length:  # a new cut from what was taken and what waits (cut_batch starts the batch afresh)
            waiting = [*taken, *(entry for entry in self.pending if not entry.future.done())]
            batch, rest = cut_batch(waiting, self.admission)
            taken[:] = batch
            self.pending = deque(rest)
            return
        while self.pending and self.admission.has_capacity() and self.admission.fits(self.pending[0].item):
            entry = self.pending.popleft()
            if not entry.future.done():  # its caller gave up (Ray cancelled it): not run
                self.admission.admit(entry.item)
                taken.append(entry)

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
            self.admission.new_batch()
            taken: list = []
            self._take(taken)
            if len(taken) >= 2 and self.admission.has_capacity() and self.cost_model.worth_waiting(
                    self.admission.items):
                await asyncio.sleep(self.delay_s)
                self._take(taken)
            if not taken:
                continue
            try:
                results = await self.run([entry.item for entry in taken])
            except Exception as exc:  # outside the runtime (ModelRunner.run never raises for it): fail this batch
                for entry in taken:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                continue
            for entry, result in zip(taken, results):
                if not entry.future.done():
                    entry.future.set_result(result)


@dataclass
class _Waiting:
    """A request queued on a replica, in the shape serve.admission.cut_batch reads (item, deadline)."""

    item: WorkItem
    future: asyncio.Future
    deadline: float


class RayGateway:
    """The ingress's way to a model: the interface of serve.channel.WorkerGateway (submit, ready, retry_after_s, connected,
    expected, start, stop) over a Ray DeploymentHandle, so serve.inference and serve.routes run unchanged.

    Ray routes each request to a running replica of the model; a replica that dies fails the requests it held
    (503 here, as a lost LitServe worker does) and the controller starts another."""

    expected = 1
    connected = 1

    def __init__(self, handle, timeout_s: float, name: str) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.name = name

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def ready(self) -> bool:
        """Ray answers through the ingress only once the application is running, each model with a replica."""
        return True

    def retry_after_s(self) -> float:
        """Retry-After for this model's 503s: Ray replaces a replica or frees a slot within seconds; kiln has no
        queue of its own here to estimate from (WorkerGateway.retry_after_s does), so 1 s."""
        return 1.0

    async def submit(self, item: WorkItem) -> Result:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        response = self.handle.remote(item)
        try:
            async with asyncio.timeout(self.timeout_s):
                result: Result = await response
        except TimeoutError:
            response.cancel()
            raise RequestError(f"no answer within {self.timeout_s:g}s; the deployment is overloaded or the request "
                               "too large, retry later or with fewer items", 504,
                               retry_after=self.retry_after_s()) from None
        except (ray_errors.RayActorError, ray_errors.ActorUnavailableError):
            raise RequestError("the replica running this request stopped; Ray is replacing it, retry shortly",
                               503, retry_after=self.retry_after_s()) from None
        except serve_errors.BackPressureError:
            raise RequestError(f"every replica of {self.name!r} is at its max_ongoing_requests; retry shortly",
                               503, retry_after=self.retry_after_s()) from None
        if result.error is not None:
            raise RequestError(result.error, 500)
        return result


class KilnIngress:
    """The ingress deployment: kiln's ASGI app over RayGateways (built at replica start by Ray's
    `__serve_build_asgi_app__` hook, so the app is made where it runs, never pickled)."""

    def __init__(self, handles: dict, args: dict[str, Any]) -> None:
        from kiln.serve.inference import Endpoint
        from kiln.serve.metrics import Metrics
        from kiln.serve.repository import plan_models
        from kiln.serve.routes import Inference
        from kiln.serve.server import api_key, info_labels, served_model

        _models, config = parse_args(args)
        plans = plan_models(config)
        self.config = config
        self.key = api_key(config)  # from this node's environment: `ray start` ran with the variable set
        self.metrics = Metrics({plan.name: info_labels(plan) for plan in plans})
        endpoints = {}
        for plan in plans:
            model = served_model(plan.manifest, plan.variant, config.max_items,
                                 config.batch_items(plan.manifest.is_text), plan.served.parameters, plan.name,
                                 plan.version)
            endpoints[plan.name] = Endpoint(model, RayGateway(handles[plan.name], config.timeout_s, plan.name))
        self.inference = Inference(endpoints, config.max_body_bytes)  # no offload process: replicas scale instead

    def __serve_build_asgi_app__(self):
        from importlib.metadata import version

        from fastapi import FastAPI

        from kiln.serve.routes import add_routes
        from kiln.serve.server import middlewares

        app = FastAPI(docs_url=None, redoc_url=None)
        add_routes(app, self.inference, self.metrics, version("kiln"))
        for middleware in middlewares(self.config, self.inference, self.key, self.metrics):
            if isinstance(middleware, tuple):
                app.add_middleware(middleware[0], **middleware[1])
            else:
                app.add_middleware(middleware)
        return app
