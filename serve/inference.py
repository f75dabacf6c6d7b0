"""The transport-neutral inference call: `infer(model, request) -> Result`, over kiln's own types.

A front end turns what arrived on its wire into a serve.protocol.InferenceRequest (validated against the
model: HTTP does it with serve.protocol's parse functions), calls this, and writes the serve.channel.Result (the
request's outputs, timings and token count) back in its own form; every refusal is a serve.protocol.RequestError
whose `status` is an HTTP status (a gRPC front end maps it to its own codes: 401 UNAUTHENTICATED, 404 NOT_FOUND,
413 and 422 INVALID_ARGUMENT, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED).

Auth, limits and metrics are parts of this path, each one function any front end calls:
- auth: serve.guards.KeyCheck.authorized (HTTP: ApiKeyMiddleware runs it before the body is read);
- limits: the items a request may hold (ServedModel.request_limit), checked in `run` whoever built the request
  (HTTP's parse refuses earlier with the same error); byte limits belong to the wire, which alone sees bytes;
- metrics: Metrics.record_request with the front end's label (HTTP: MetricsMiddleware, which also counts the
  refusals made below the app).
`InferenceService.call` runs the three around `infer` for a front end that has none of kiln's ASGI stack (a gRPC
servicer's method, a Ray Serve replica's `__call__`); HTTP (serve.routes.Inference, a subclass) calls
`lookup` and `run` itself, with auth and metrics already done by its middleware.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kiln.core.runner import WorkItem
from kiln.serve.channel import Result, WorkerGateway
from kiln.serve.guards import MISSING_KEY, KeyCheck
from kiln.serve.protocol import InferenceRequest, RequestError, ServedModel


@dataclass(frozen=True)
class Endpoint:
    """One served model in the HTTP process: what it takes and answers, and the gateway to its workers."""

    model: ServedModel
    gateway: WorkerGateway


class InferenceService:
    """The served models, and the call that runs a request on one of them.

    `guard` (the API key, or None where there is none) and `metrics` (serve.metrics.Metrics) are used by `call`
    only: HTTP has them in its middleware."""

    def __init__(self, endpoints: dict[str, Endpoint], guard: KeyCheck | None = None, metrics=None) -> None:
        self.endpoints = endpoints  # name -> the version its unversioned routes reach (the newest ready one)
        # name -> version -> endpoint: every ready version (/v2/models/NAME/versions/N/...); serve.control changes
        # both while the server runs.
        self.versions: dict[str, dict[str, Endpoint]] = {
            name: {endpoint.model.version: endpoint} for name, endpoint in endpoints.items()}
        self.guard = guard
        self.metrics = metrics
        self.control = None  # serve.control.ModelControl: load, unload, index (set by serve.server)
        self.tracing = None  # serve.tracing.Tracing where traces are exported (set in the HTTP process), else None

    def retry_after_s(self) -> float:
        """When a client refused for a reason of the whole server (its connection cap, not ready) should come
        back: the longest of the models' queue estimates (serve.channel.WorkerGateway.retry_after_s)."""
        return max((e.gateway.retry_after_s() for e in self.endpoints.values()), default=1.0)

    def lookup(self, name: str | None, version: str | None = None, reveal: bool = True) -> Endpoint:
        """The model a request names; `name` None: the one model of a single-model server. A 404 names the served
        models where `reveal` (the caller holds the API key, or there is none); an unauthenticated caller of an open
        route (/v2/models/{name}/ready) is not told them."""
        if name is None:
            if len(self.endpoints) == 1:
                return next(iter(self.endpoints.values()))
            raise RequestError(f"this server serves {len(self.endpoints)} models ({', '.join(self.endpoints)}); "
                               "name one: POST /v2/models/{name}/predict or /v2/models/{name}/infer", 404)
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            served = f"; this server serves {', '.join(repr(n) for n in self.endpoints)}" if reveal else ""
            raise RequestError(f"no model named {name!r}{served}", 404, param="model", code="model_not_found")
        if version is not None and version != endpoint.model.version:
            endpoint = self.versions.get(name, {}).get(version)  # type: ignore[assignment]
            if endpoint is None:
                raise RequestError(f"model {name!r} has no version {version!r} ready", 404)
        return endpoint

    async def run(self, endpoint: Endpoint, request: InferenceRequest, trace=None) -> Result:
        """Sends a validated request to the model's workers and waits for its Result (bounded by the gateway's
        timeout). Raises RequestError: 413 past the model's item limit, 503/504/500 from the workers. `trace`
        (serve.tracing.RequestTrace, where tracing is on) gets the submission and answer times and the Result."""
        model = endpoint.model
        if request.count > model.request_limit:
            raise model.too_many("the request", request.count, "items", None)
        submitted = time.time()
        if trace is not None:
            trace.model, trace.version, trace.submitted = model.name, model.version, int(submitted * 1e9)
        result = await endpoint.gateway.submit(WorkItem(request.arrays, request.texts, request.count, submitted))
        request.tokens = result.tokens
        if trace is not None:
            trace.answered, trace.result = time.time_ns(), result
        return result

    async def infer(self, model: str | None, request: InferenceRequest, version: str | None = None) -> Result:
        """The inference call of every front end: the model by name (None: the only one), then `run`."""
        return await self.run(self.lookup(model, version), request)

    async def call(self, model: str | None, request: InferenceRequest | Callable[[ServedModel], InferenceRequest], *,
                   front: str, api_key: bytes | None = None, version: str | None = None,
                   carrier: dict[str, str] | None = None, trace=None) -> Result:
        """`infer` with auth, metrics and tracing around it, for a front end without kiln's ASGI stack: the key is
        checked (401), and the call is counted in /metrics under `front` (the route label, e.g. "grpc:ModelInfer")
        with its status and the model it reached. `request` may be a function that parses the request against the
        model it names (a wire whose parse needs the model): it runs after auth and lookup, and its refusals are
        counted like any other. Where tracing is on, the call is one trace under the client's `traceparent` in
        `carrier` (gRPC: the metadata as a dict), or `trace` if the front end began it on arrival
        (serve.tracing.Tracing.begin, then `trace.parsed` once the message is decoded)."""
        started = time.perf_counter()
        status = 500
        reached = ""
        tracing = self.tracing
        if tracing is not None and trace is None:
            trace = tracing.begin(front, carrier, method="CALL")
        if trace is not None and not trace.parsed:
            trace.parsed = time.time_ns()
        if self.metrics is not None:
            self.metrics.in_flight += 1
        try:
            if self.guard is not None and not self.guard.authorized(api_key):
                raise RequestError(MISSING_KEY, 401)
            endpoint = self.lookup(model, version)
            reached = endpoint.model.name
            if not isinstance(request, InferenceRequest):
                request = request(endpoint.model)
            result = await self.run(endpoint, request, trace)
            status = 200
            return result
        except RequestError as error:
            status = error.status
            raise
        finally:
            if self.metrics is not None:
                self.metrics.in_flight -= 1
                self.metrics.record_request(front, "CALL", status, time.perf_counter() - started, reached)
            if tracing is not None and trace is not None:
                tracing.finish(trace, status)
