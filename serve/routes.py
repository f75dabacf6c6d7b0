"""HTTP routes: `/predict`, the Open Inference Protocol (KServe V2), health and `/metrics`.

They run in the HTTP process. A request is parsed and validated here (serve.protocol) and only a
valid one is sent to an inference worker (serve.channel.WorkerGateway). The wait for the answer is
bounded (504 after --timeout) and ends at once if the worker dies (503), so no client hangs on a
request that cannot be answered.

The inference routes are one table, INFERENCE_ROUTES: both the ASGI fast path (InferenceFastPath) and
the FastAPI registration (add_routes) are built from it, so a new inference route is one row there (and,
for a new protocol, one Wire with its parse and respond functions).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serve import openai_embeddings
from kiln.serve.api import WorkItem
from kiln.serve.channel import WorkerGateway
from kiln.serve.guards import AUTHORIZED
from kiln.serve.protocol import Request as ParsedRequest
from kiln.serve.protocol import RequestError, ServedModel, parse_predict, parse_v2, predict_response, v2_response

JSON_TYPES = ("application/json", "")


class FastJSONResponse(Response):
    """orjson writes numpy arrays directly: 30x faster than json.dumps on a 384-float embedding here."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_json(content_type: str, raw: bytes, expected) -> object:
    media = content_type.split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise RequestError(f"Content-Type {media!r} is not supported; send application/json", 415, expected)
    if not raw.strip():
        raise RequestError("the body is empty; send a JSON object", 400, expected)
    try:
        # orjson also refuses NaN/Infinity literals, numbers that overflow to infinity, and nesting past 1024.
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON ({exc})", 400, expected) from None


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def unknown_model(model: ServedModel, name: str, version: str | None = None, reveal: bool = True) -> RequestError | None:
    """404 for a name or version this server does not serve. `reveal` names the served model, which helps a client
    that holds the API key; an unauthenticated caller of an open route (/v2/models/{name}/ready) is not told."""
    if name != model.name:
        served = f"; this server serves {model.name!r}" if reveal else ""
        return RequestError(f"no model named {name!r}{served}", 404)
    if version is not None and version != model.version:
        return RequestError(f"model {name!r} has no version {version!r}", 404)
    return None


@dataclass(frozen=True)
class Wire:
    """One inference protocol: what a request must look like, how it is parsed, how the answer is written."""

    kind: str
    expected: Callable[[ServedModel], Any]  # the body shown to a client whose request is refused
    parse: Callable[[Any, ServedModel], ParsedRequest]
    respond: Callable[[ServedModel, dict, ParsedRequest], dict]
    error_body: Callable[[RequestError], dict] = RequestError.body  # how a refusal is written on this protocol


PREDICT = Wire("predict", lambda model: model.expected_predict, parse_predict, predict_response)
V2 = Wire("v2", lambda model: model.expected_v2, parse_v2, v2_response)
OPENAI_EMBEDDINGS = Wire("openai", openai_embeddings.expected, openai_embeddings.parse, openai_embeddings.respond,
                         openai_embeddings.error_body)

NAME_PARAM = "name"  # a route's template parameter that names the model
VERSION_PARAM = "model_version"  # and the one that names its version


@dataclass(frozen=True)
class InferenceRoute:
    """One POST route that runs the model.

    `path` is FastAPI's template: MetricsMiddleware labels requests with it (the fast path sets the route as
    scope["route"]), and its {name} and {model_version} parameters, where present, pick the model and version.
    """

    path: str
    endpoint: str  # FastAPI's name for the route (the OpenAPI operationId starts with it)
    wire: Wire

    @functools.cached_property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    @functools.cached_property
    def params(self) -> tuple[str, ...]:
        return tuple(seg[1:-1] for seg in self.segments if seg.startswith("{") and seg.endswith("}"))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """The template parameters of a path split on "/", or None where the path is not this route's.
        A parameter matches one non-empty segment, as in FastAPI's router."""
        if len(parts) != len(self.segments):
            return None
        params = {}
        for part, segment in zip(parts, self.segments):
            if segment.startswith("{"):
                if not part:
                    return None
                params[segment[1:-1]] = part
            elif part != segment:
                return None
        return params


INFERENCE_ROUTES = (
    InferenceRoute("/predict", "predict", PREDICT),
    InferenceRoute("/v2/models/{name}/infer", "v2_infer", V2),
    InferenceRoute("/v2/models/{name}/versions/{model_version}/infer", "v2_infer_version", V2),
    InferenceRoute("/v1/embeddings", "openai_embeddings", OPENAI_EMBEDDINGS),
)


@dataclass(frozen=True)
class RouteMatch:
    route: InferenceRoute
    name: str | None  # the model the path names, if it names one
    version: str | None


def match_inference(path: str, routes: tuple[InferenceRoute, ...] = INFERENCE_ROUTES) -> RouteMatch | None:
    parts = path.split("/")
    for route in routes:
        params = route.match(parts)
        if params is not None:
            return RouteMatch(route, params.get(NAME_PARAM), params.get(VERSION_PARAM))
    return None


class Inference:
    """The inference path itself, shared by the FastAPI routes and the ASGI fast path below."""

    def __init__(self, model: ServedModel, gateway: WorkerGateway, metrics) -> None:
        self.model = model
        self.gateway = gateway
        self.metrics = metrics

    async def answer(self, wire: Wire, name: str | None, version: str | None, content_type: str,
                     raw: bytes) -> tuple[int, dict]:
        model = self.model
        try:
            error = None if name is None else unknown_model(model, name, version)
            if error is not None:
                raise error
            body = decode_json(content_type, raw, wire.expected(model))
            parsed = wire.parse(body, model)
            result = await self.gateway.submit(WorkItem(parsed.arrays, parsed.texts, parsed.count, time.time()))
        except RequestError as error:
            return error.status, wire.error_body(error)
        parsed.tokens = result.tokens
        return 200, wire.respond(model, result.outputs, parsed)


class InferenceFastPath:
    """POSTs to the inference routes are answered here, in plain ASGI, before FastAPI's router.

    FastAPI's routing, dependency solving and exception layers cost the HTTP process more CPU per request than
    parsing and validating the request itself; under load that CPU is taken from the model. Every other method
    and route (and so 404/405 answers, metadata, health, metrics) still goes through FastAPI.
    """

    def __init__(self, app, inference: Inference) -> None:
        self.app = app
        self.inference = inference

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = match_inference(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        scope["route"] = match.route  # MetricsMiddleware labels the request with match.route.path
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        content_type = ""
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value.decode("latin-1")
                break
        status, body = await self.inference.answer(match.route.wire, match.name, match.version, content_type,
                                                   b"".join(chunks))
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return None


def _endpoint(route: InferenceRoute, inference: Inference):
    """A FastAPI endpoint for one row of INFERENCE_ROUTES, declaring the route's path parameters (as str) so
    that FastAPI validates them and the OpenAPI schema lists them."""

    async def endpoint(request: Request, **params: str):
        status, body = await inference.answer(route.wire, params.get(NAME_PARAM), params.get(VERSION_PARAM),
                                              request.headers.get("content-type", ""), await request.body())
        return FastJSONResponse(body, status_code=status)

    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, annotation=str) for p in route.params]
        + [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)])
    return endpoint


ROUTER_ERRORS = {404: "no route matches this path (the routes are listed in /openapi.json)",
                 405: "this route does not take the {method} method"}


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers is JSON {"error": ...}: FastAPI's and Starlette's own (404 for an unknown path,
    405 for a wrong method, 422 for bad path parameters, 500 for a bug) included, which would otherwise be
    {"detail": ...} or plain text."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        template = ROUTER_ERRORS.get(exc.status_code)
        message = template.format(method=request.method) if template else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request ({problems})"}, status_code=422)

    async def crashed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "internal server error"}, status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, crashed)


def add_routes(app: FastAPI, model: ServedModel, gateway: WorkerGateway, inference: Inference, version: str) -> None:
    """The FastAPI routes: the inference ones mostly serve the OpenAPI schema (InferenceFastPath answers first)."""
    add_error_handlers(app)

    def metadata() -> dict:
        return {"name": model.name, "versions": [model.version], "platform": model.platform,
                "parameters": dict(model.served_variant),
                "inputs": model.v2_inputs, "outputs": model.v2_outputs}

    for route in INFERENCE_ROUTES:
        app.add_api_route(route.path, _endpoint(route, inference), methods=["POST"], name=route.endpoint)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "kiln", "version": version, "extensions": [], "models": [model.name]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        ok = gateway.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/health")  # LitServe's probe path (its own answered plain text "ok"): the same as /v2/health/ready
    async def health():
        ok = gateway.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        error = unknown_model(model, name)
        return error_response(error) if error else metadata()

    @app.get("/v2/models/{name}/versions/{model_version}")
    async def model_version_metadata(name: str, model_version: str):
        error = unknown_model(model, name, model_version)
        return error_response(error) if error else metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str, request: Request):
        error = unknown_model(model, name, reveal=request.scope.get(AUTHORIZED, True))
        if error:
            return error_response(error)
        ok = gateway.ready()
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(inference.metrics.render(), media_type="text/plain; version=0.0.4")
