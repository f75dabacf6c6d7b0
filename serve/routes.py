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
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serve import openai_embeddings, v2_binary
from kiln.serve.guards import AUTHORIZED, MODEL
from kiln.serve.inference import Endpoint, InferenceService
from kiln.serve.protocol import (
    InferenceRequest,
    RequestError,
    ServedModel,
    parse_predict,
    parse_v2,
    predict_response,
    retry_after_value,
    v2_response,
)

JSON_TYPES = ("application/json", "")
BINARY_TYPES = ("application/octet-stream", "application/vnd.sagemaker-triton.binary+json")
# The request headers the inference path reads (the ASGI fast path copies only these out of the scope).
READ_HEADERS = (b"content-type", b"content-encoding", v2_binary.HEADER_LENGTH.encode())
TRACE_HEADERS = (b"traceparent", b"tracestate")  # W3C trace context, read only where tracing is on


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


# Content-Encoding of request bodies -> zlib's wbits (tritonclient's request_compression_algorithm sends these).
COMPRESSIONS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


MAX_MEMBERS = 64  # gzip members in one body: real clients send one; thousands of empty ones only cost CPU


def decompress(raw: bytes, encoding: str, limit: int, expected: Any) -> bytes:
    """The body as sent before compression: at most `limit` bytes are ever inflated (the same limit as for an
    uncompressed body), so a small body that inflates to gigabytes is refused, not expanded.

    A gzip body may be several members one after another (RFC 1952; `cat a.gz b.gz`): every member is inflated,
    the limit bounding them all together, since answering from the first alone would silently drop the rest.
    A deflate (zlib) stream is one stream: bytes after its end are refused."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    wbits = COMPRESSIONS.get(encoding)
    if wbits is None:
        raise RequestError(f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or an "
                           "uncompressed body", 415, expected)
    parts = []
    total = 0
    data = raw
    for _ in range(MAX_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise RequestError(f"the body is not valid {encoding} data ({exc})", 400, expected) from None
        total += len(part)
        if total > limit or inflater.unconsumed_tail:
            raise RequestError(f"the body inflates past the {limit}-byte limit; send fewer items per request", 413,
                               expected)
        if not inflater.eof:
            raise RequestError(f"the {encoding} body is cut short", 400, expected)
        parts.append(part)
        data = inflater.unused_data
        if not data:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if wbits == zlib.MAX_WBITS:
            raise RequestError(f"the deflate body has {len(data)} bytes after the end of its stream", 400, expected)
    raise RequestError(f"the gzip body has more than {MAX_MEMBERS} members; send one", 400, expected)


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@dataclass(frozen=True)
class Reply:
    """What an inference route answers: status, the encoded body, and its headers; `model`, the served model it
    went to (None where it reached none), labels the request in /metrics."""

    status: int
    payload: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
    model: str | None = None


def decode_body(headers: dict[str, str], raw: bytes, expected: Any) -> tuple[Any, Any]:
    """A JSON body (every wire but V2): the decoded JSON, and no binary section."""
    return decode_json(headers.get("content-type", ""), raw, expected), None


def decode_v2_body(headers: dict[str, str], raw: bytes, expected: Any) -> tuple[Any, Any]:
    """A V2 body: JSON, or (with Inference-Header-Content-Length) a JSON header and the binary tensor section."""
    length = headers.get(v2_binary.HEADER_LENGTH)
    if length is None:
        return decode_json(headers.get("content-type", ""), raw, expected), None
    header, rest = v2_binary.split_body(raw, length, expected)
    content_type = headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() in BINARY_TYPES:
        content_type = ""  # the binary extension's own content types: the header part is JSON all the same
    return decode_json(content_type, header, expected), v2_binary.BinarySection(rest, expected)


def encode_json(body: dict, parsed: InferenceRequest | None) -> Reply:
    return Reply(200, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


def encode_v2(body: dict, parsed: InferenceRequest | None) -> Reply:
    """JSON, or the binary tensor extension where the request asked for binary outputs."""
    if parsed is None or not parsed.binary_outputs:
        return encode_json(body, parsed)
    payload, header_length = v2_binary.encode_response(body, parsed.binary_outputs)
    return Reply(200, payload, ((b"content-type", b"application/octet-stream"),
                                (v2_binary.HEADER_LENGTH.encode(), str(header_length).encode())))


@dataclass(frozen=True)
class Wire:
    """One inference protocol: what a request must look like, how it is decoded and parsed, how the answer is
    written. `decode` turns the headers and raw body into (body, binary section or None); `parse` validates them
    against the model; `respond` shapes the outputs; `encode` writes the answer's bytes."""

    kind: str
    expected: Callable[[ServedModel], Any]  # the body shown to a client whose request is refused
    parse: Callable[..., InferenceRequest]  # (body, model) or, for a wire with binary sections, (body, model, section)
    respond: Callable[[ServedModel, dict, InferenceRequest], dict]
    error_body: Callable[[RequestError], dict] = RequestError.body  # how a refusal is written on this protocol
    decode: Callable[[dict[str, str], bytes, Any], tuple[Any, Any]] = decode_body
    encode: Callable[[dict, InferenceRequest | None], Reply] = encode_json
    # Where the body, not the path, names the model (OpenAI's `model`): the name, or None where it does not say.
    model_in_body: Callable[[Any], str | None] | None = None


PREDICT = Wire("predict", lambda model: model.expected_predict, parse_predict, predict_response)
V2 = Wire("v2", lambda model: model.expected_v2, parse_v2, v2_response, decode=decode_v2_body, encode=encode_v2)
OPENAI_EMBEDDINGS = Wire("openai", openai_embeddings.expected, openai_embeddings.parse, openai_embeddings.respond,
                         openai_embeddings.error_body, model_in_body=openai_embeddings.model_named)
WIRES = {wire.kind: wire for wire in (PREDICT, V2, OPENAI_EMBEDDINGS)}  # by kind: how serve.offload names one

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
    InferenceRoute("/predict", "predict", PREDICT),  # the one model, where the server serves one
    InferenceRoute("/v2/models/{name}/predict", "model_predict", PREDICT),
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


class Inference(InferenceService):
    """The inference path over HTTP, shared by the FastAPI routes and the ASGI fast path below: decodes and
    validates a request's bytes against the model it names, runs it through the transport-neutral call
    (serve.inference.InferenceService.run) and writes the Reply. Auth and request metrics are the middleware's."""

    def __init__(self, endpoints: dict[str, Endpoint], max_body_bytes: int = 8 * 1024 * 1024,
                 offload: Any = None) -> None:
        super().__init__(endpoints)
        self.max_body_bytes = max_body_bytes  # a compressed body may inflate to this much at most
        self.offload = offload  # serve.offload.Offload: where large bodies are decoded (None: always here)

    def prepare(self, wire: Wire, name: str | None, version: str | None, headers: dict[str, str],
                raw: bytes) -> tuple[Endpoint, InferenceRequest]:
        """Inflate, decode and validate a request against the model it names: the CPU work of the HTTP side, which
        serve.offload runs in its own process for large bodies. Raises RequestError (with `model` set once known)."""
        model_name = None
        try:
            body: Any = None
            section = None
            raw = decompress(raw, headers.get("content-encoding", ""), self.max_body_bytes, None)
            if name is None and wire.model_in_body is not None:
                # The body names the model (OpenAI): decode it first; a refusal here shows no expected body.
                body, section = wire.decode(headers, raw, None)
                name = wire.model_in_body(body)
                if name is None:
                    raise RequestError("'model' is required and must be a string", 400, param="model")
            endpoint = self.lookup(name, version)
            model = endpoint.model
            model_name = model.name
            expected = wire.expected(model)
            if body is None:
                body, section = wire.decode(headers, raw, expected)
            parsed = wire.parse(body, model, section) if section is not None else wire.parse(body, model)
        except RequestError as error:
            error.model = model_name
            raise
        return endpoint, parsed

    async def answer(self, wire: Wire, name: str | None, version: str | None, headers: dict[str, str],
                     raw: bytes, trace=None) -> Reply:
        """`headers`: the request's headers named in READ_HEADERS, lower-case names. `trace`: the request's
        serve.tracing.RequestTrace where tracing is on (its timestamps are filled in here)."""
        try:
            if self.offload is not None and self.offload.wants(headers, raw):
                inflated = self.offload.small_inflate(headers, raw)
                if inflated is not None:  # a small compressed body: inflated here (or refused here), parsed inline
                    if inflated is not raw:
                        headers = {k: v for k, v in headers.items() if k != "content-encoding"}
                    endpoint, parsed = self.prepare(wire, name, version, headers, inflated)
                else:
                    model_name, parsed = await self.offload.prepare(wire.kind, name, version, headers, raw)
                    endpoint = self.lookup(model_name, version)
            else:
                endpoint, parsed = self.prepare(wire, name, version, headers, raw)
            model = endpoint.model
            if trace is not None:
                trace.parsed = time.time_ns()
            result = await self.run(endpoint, parsed, trace)
        except RequestError as error:
            headers = Reply.headers
            if error.retry_after_header is not None:  # 429, 503 (and a shed 504): when to come back
                headers = (*headers, (b"retry-after", error.retry_after_header.encode()))
            return Reply(error.status, orjson.dumps(wire.error_body(error), option=orjson.OPT_SERIALIZE_NUMPY),
                         headers, model=error.model)
        return replace(wire.encode(wire.respond(model, result.outputs, parsed), parsed), model=model.name)


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
        tracing = self.inference.tracing
        trace = None
        if tracing is not None:  # on arrival, before the body: the trace's receive span starts here
            trace = tracing.begin(match.route.path, {key.decode(): value.decode("latin-1")
                                                     for key, value in scope["headers"] if key in TRACE_HEADERS})
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        headers = {key.decode(): value.decode("latin-1") for key, value in scope["headers"] if key in READ_HEADERS}
        reply = await self.inference.answer(match.route.wire, match.name, match.version, headers, b"".join(chunks),
                                            trace)
        if reply.model is not None:
            scope[MODEL] = reply.model  # MetricsMiddleware labels the request with the model
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [*reply.headers, (b"content-length", str(len(reply.payload)).encode())]})
        await send({"type": "http.response.body", "body": reply.payload})
        if trace is not None:
            tracing.finish(trace, reply.status)
        return None


def _endpoint(route: InferenceRoute, inference: Inference):
    """A FastAPI endpoint for one row of INFERENCE_ROUTES, declaring the route's path parameters (as str) so
    that FastAPI validates them and the OpenAPI schema lists them."""

    async def endpoint(request: Request, **params: str):
        headers = {name.decode(): request.headers[name.decode()] for name in READ_HEADERS
                   if name.decode() in request.headers}
        reply = await inference.answer(route.wire, params.get(NAME_PARAM), params.get(VERSION_PARAM), headers,
                                       await request.body())
        return Response(reply.payload, status_code=reply.status,
                        headers={k.decode(): v.decode() for k, v in reply.headers if k != b"content-type"},
                        media_type=dict(reply.headers).get(b"content-type", b"application/json").decode())

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


def add_routes(app: FastAPI, inference: Inference, metrics, version: str) -> None:
    """The FastAPI routes: the inference ones mostly serve the OpenAPI schema (InferenceFastPath answers first)."""
    add_error_handlers(app)
    for route in INFERENCE_ROUTES:
        app.add_api_route(route.path, _endpoint(route, inference), methods=["POST"], name=route.endpoint)
    add_health_routes(app, inference, version)
    add_model_routes(app, inference)
    add_repository_routes(app, inference)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


def add_health_routes(app: FastAPI, inference: Inference, version: str) -> None:
    """The server's metadata, liveness and readiness (V2), and LitServe's probe path."""
    endpoints = inference.endpoints

    @app.get("/v2")
    async def server_metadata():
        return {"name": "kiln", "version": version, "extensions": ["binary_tensor_data", "model_repository"],
                "models": list(endpoints)}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")  # ready when every model is: a load balancer sends any model's requests here
    async def ready():
        ok = all(endpoint.gateway.ready() for endpoint in endpoints.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=not_ready_headers(ok, inference))

    # LitServe's probe path (its own answered plain text "ok"): the same answer as /v2/health/ready.
    app.add_api_route("/health", ready, methods=["GET"], name="health")


def not_ready_headers(ok: bool, inference: Inference) -> dict[str, str] | None:
    """A not-ready answer says when to ask again (Retry-After, from the queues: serve.inference.retry_after_s)."""
    return None if ok else {"retry-after": retry_after_value(inference.retry_after_s())}


def add_model_routes(app: FastAPI, inference: Inference) -> None:
    """Each model's metadata and readiness (V2)."""

    def metadata(endpoint: Endpoint) -> dict:
        model = endpoint.model
        versions = sorted(inference.versions.get(model.name, {model.version: endpoint}), key=int)
        return {"name": model.name, "versions": versions, "platform": model.platform,
                "parameters": dict(model.served_variant),
                "inputs": model.v2_inputs, "outputs": model.v2_outputs}

    def found(name: str, model_version: str | None = None, reveal: bool = True) -> Endpoint | Response:
        try:
            return inference.lookup(name, model_version, reveal)
        except RequestError as error:
            return error_response(error)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        endpoint = found(name)
        return endpoint if isinstance(endpoint, Response) else metadata(endpoint)

    @app.get("/v2/models/{name}/versions/{model_version}")
    async def model_version_metadata(name: str, model_version: str):
        endpoint = found(name, model_version)
        return endpoint if isinstance(endpoint, Response) else metadata(endpoint)

    async def ready(request: Request, name: str, model_version: str | None = None):
        endpoint = found(name, model_version, reveal=request.scope.get(AUTHORIZED, True))
        if isinstance(endpoint, Response):
            return endpoint
        ok = endpoint.gateway.ready()
        return JSONResponse({"name": endpoint.model.name, "ready": ok}, status_code=200 if ok else 503,
                            headers=not_ready_headers(ok, inference))

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str, request: Request):
        return await ready(request, name)

    @app.get("/v2/models/{name}/versions/{model_version}/ready")
    async def model_version_ready(name: str, model_version: str, request: Request):
        return await ready(request, name, model_version)


async def small_json(request: Request, shape: str) -> dict:
    """A repository call's body: empty, or a JSON object (400 otherwise; `shape` says what it may hold)."""
    raw = await request.body()
    body = decode_json(request.headers.get("content-type", ""), raw, None) if raw.strip() else {}
    if not isinstance(body, dict):
        raise RequestError(f"the body must be empty or a JSON object {shape}", 400)
    return body


def parameter(body: dict, key: str, shape: str) -> str | None:
    """`parameters.KEY` of a load or unload body (Triton's shape: {"parameters": {...}}), a string or absent."""
    parameters = body.get("parameters", {})
    value = parameters.get(key) if isinstance(parameters, dict) else None
    if not isinstance(parameters, dict) or (value is not None and not isinstance(value, str)):
        raise RequestError(f"the body must be empty or {shape}", 400)
    return value


LOAD_SHAPE = '{"parameters": {"folder": "a folder inside the repository"}}'
UNLOAD_SHAPE = '{"parameters": {"version": "N"}}'


def add_repository_routes(app: FastAPI, inference: Inference) -> None:
    """Triton's model repository extension: the index, load and unload (serve.control does the work)."""

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        """Every version of every model with its state (and why, where not READY); `{"ready": true}` lists only
        the ready ones."""
        try:
            body = await small_json(request, '{"ready": true|false}')
            if not isinstance(body.get("ready", False), bool):
                raise RequestError("the body must be empty or {\"ready\": true|false}", 400)
        except RequestError as error:
            return error_response(error)
        return JSONResponse(inference.control.index(body.get("ready", False)) if inference.control is not None
                            else repository_index_entries(inference.endpoints, body.get("ready", False)))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request):
        """Loads the model's newest version (or `parameters.folder`, inside the repository) beside what serves and
        switches to it once ready: 200 with the version serving, 400 with why it failed (what served stays)."""
        try:
            folder = parameter(await small_json(request, LOAD_SHAPE), "folder", LOAD_SHAPE)
            if inference.control is None:
                raise RequestError("this server has no model control", 501)
            version = await inference.control.load(name, folder)
        except RequestError as error:
            return error_response(error)
        return JSONResponse(version.entry())

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request):
        """Unloads the model (every version, or `parameters.version`) once its requests in flight are answered."""
        try:
            version = parameter(await small_json(request, UNLOAD_SHAPE), "version", UNLOAD_SHAPE)
            if inference.control is None:
                raise RequestError("this server has no model control", 501)
            unloaded = await inference.control.unload(name, version)
        except RequestError as error:
            return error_response(error)
        return JSONResponse([item.entry() for item in unloaded])


def repository_index_entries(endpoints: dict[str, Endpoint], ready_only: bool) -> list[dict]:
    index = []
    for endpoint in endpoints.values():
        gateway = endpoint.gateway
        ok = gateway.ready()
        if ready_only and not ok:
            continue
        entry = {"name": endpoint.model.name, "version": endpoint.model.version,
                 "state": "READY" if ok else "UNAVAILABLE"}
        if not ok:
            entry["reason"] = (f"{gateway.connected} of {gateway.expected} inference workers connected "
                               "(starting, or restarting after a crash)")
        index.append(entry)
    return index
