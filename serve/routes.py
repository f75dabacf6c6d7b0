"""HTTP routes: `/predict`, the Open Inference Protocol (KServe V2), health and `/metrics`.

They run in the HTTP process. A request is parsed and validated here (serve.protocol) and only a
valid one is sent to an inference worker (WorkerGateway). The wait for the answer is bounded (504
after --timeout) and ends at once if the worker dies (503), so no client hangs on a request that
cannot be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from litserve.utils import LitAPIStatus

from kiln.serve.api import WorkItem
from kiln.serve.channel import encode, read_frame
from kiln.serve.protocol import RequestError, ServedModel, parse_predict, parse_v2, predict_response, v2_response

JSON_TYPES = ("application/json", "")


@dataclass
class _Worker:
    name: str
    writer: asyncio.StreamWriter
    in_flight: dict[int, asyncio.Future] = field(default_factory=dict)  # uid -> the waiting request
    pending: list[bytes] = field(default_factory=list)  # frames written together at the end of this loop turn

    def flush(self) -> None:
        if self.pending and not self.writer.is_closing():
            self.writer.write(b"".join(self.pending))
        self.pending.clear()


class WorkerLost(Exception):
    """The worker running a request died; the request is answered 503 at once."""


class WorkerGateway:
    """Sends work to the inference workers over serve.channel and waits for the answer, with a deadline.

    Runs in the HTTP process, on its event loop: no threads and no locks. Each worker connects on
    start (and again after LitServe restarts it); a request goes to the worker with the fewest in
    flight. When a worker's connection closes, its requests fail with 503 immediately, and the
    server reports not-ready until the restarted worker connects.
    """

    def __init__(self, channel_path: str, workers: int, timeout_s: float, metrics) -> None:
        self.channel_path = channel_path
        self.expected = workers
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.uids = itertools.count()  # unique within this HTTP process, which is all a worker answers to
        self.workers: dict[str, _Worker] = {}
        self._server = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.channel_path)
        self._server = await asyncio.start_unix_server(self._serve_worker, path=self.channel_path)
        os.chmod(self.channel_path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for worker in list(self.workers.values()):
            worker.writer.close()

    def ready(self) -> bool:
        return len(self.workers) >= self.expected

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            writer.close()
            return
        worker = _Worker(str(hello["worker"]), writer)
        previous = self.workers.get(worker.name)
        if previous is not None:
            self._lost(previous)
        self.workers[worker.name] = worker
        try:
            while True:
                uid, response, status = await read_frame(reader)
                if status == LitAPIStatus.OK:  # every answer of a batch that ran, whether or not its client waited
                    self.metrics.record_inference(response["queue_s"], response["infer_s"], response["batch_requests"],
                                                  response["batch_items"], response["batch_id"])
                future = worker.in_flight.pop(uid, None)
                if future is not None and not future.done():
                    future.set_result((response, status))
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        finally:
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
            self._lost(worker)
            writer.close()

    def _lost(self, worker: _Worker) -> None:
        for future in worker.in_flight.values():
            if not future.done():
                future.set_exception(WorkerLost())
        worker.in_flight.clear()

    async def submit(self, item: WorkItem):
        if not self.workers:
            raise RequestError("the inference worker is not ready (starting or restarting); retry shortly", 503)
        worker = min(self.workers.values(), key=lambda w: len(w.in_flight))
        uid = next(self.uids)
        future = asyncio.get_running_loop().create_future()
        worker.in_flight[uid] = future
        try:
            if not worker.pending:  # requests parsed in the same turn of the event loop go in one write
                asyncio.get_running_loop().call_soon(worker.flush)
            worker.pending.append(encode((0, uid, time.monotonic(), item)))
            if worker.writer.transport.get_write_buffer_size() > 8 << 20:
                await worker.writer.drain()
            response, status = await asyncio.wait_for(future, self.timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise RequestError(f"no answer within {self.timeout_s:g}s; the server is overloaded or the request too "
                               "large, retry later or with fewer items", 504) from None
        except (WorkerLost, ConnectionError):
            raise RequestError("the inference worker stopped while running this request; it is being restarted, "
                               "retry shortly", 503) from None
        finally:
            worker.in_flight.pop(uid, None)
        if status != LitAPIStatus.OK:
            if response.get("status_code") == 504:
                raise RequestError(f"waited over {self.timeout_s:g}s in the queue; the server is overloaded, "
                                   "retry later", 504)
            raise RequestError("the inference worker failed on this request", 500)
        if "__error__" in response["outputs"]:
            raise RequestError(response["outputs"]["__error__"], 500)
        return response


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


def unknown_model(model: ServedModel, name: str, version: str | None = None) -> RequestError | None:
    if name != model.name:
        return RequestError(f"no model named {name!r}; this server serves {model.name!r}", 404)
    if version is not None and version != model.version:
        return RequestError(f"model {name!r} has no version {version!r}", 404)
    return None


class Inference:
    """The inference path itself, shared by the FastAPI routes and the ASGI fast path below."""

    def __init__(self, model: ServedModel, gateway: WorkerGateway, metrics) -> None:
        self.model = model
        self.gateway = gateway
        self.metrics = metrics

    async def answer(self, kind: str, name: str | None, version: str | None, content_type: str,
                     raw: bytes) -> tuple[int, dict]:
        model = self.model
        try:
            error = None if name is None else unknown_model(model, name, version)
            if error is not None:
                raise error
            expected = model.expected_v2 if kind == "v2" else model.expected_predict
            body = decode_json(content_type, raw, expected)
            parsed = parse_v2(body, model) if kind == "v2" else parse_predict(body, model)
            result = await self.gateway.submit(WorkItem(parsed.arrays, parsed.texts, parsed.count, time.time()))
        except RequestError as error:
            return error.status, error.body()
        if kind == "v2":
            return 200, v2_response(model, result["outputs"], parsed)
        return 200, predict_response(model, result["outputs"], parsed)


class _Route:
    def __init__(self, path: str) -> None:
        self.path = path  # what MetricsMiddleware labels the request with


class InferenceFastPath:
    """POSTs to the inference routes are answered here, in plain ASGI, before FastAPI's router.

    FastAPI's routing, dependency solving and exception layers cost the HTTP process more CPU per request than
    parsing and validating the request itself; under load that CPU is taken from the model. Every other method
    and route (and so 404/405 answers, metadata, health, metrics) still goes through FastAPI.
    """

    PREDICT = _Route("/predict")
    V2 = _Route("/v2/models/{name}/infer")
    V2_VERSION = _Route("/v2/models/{name}/versions/{model_version}/infer")

    def __init__(self, app, inference: Inference) -> None:
        self.app = app
        self.inference = inference

    def _match(self, path: str):
        if path == "/predict":
            return self.PREDICT, "predict", None, None
        parts = path.split("/")
        if len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "infer" and parts[3]:
            return self.V2, "v2", parts[3], None
        if (len(parts) == 7 and parts[1:3] == ["v2", "models"] and parts[4] == "versions" and parts[6] == "infer"
                and parts[3] and parts[5]):
            return self.V2_VERSION, "v2", parts[3], parts[5]
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = self._match(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        route, kind, name, version = match
        scope["route"] = route
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
        status, body = await self.inference.answer(kind, name, version, content_type, b"".join(chunks))
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return None


def add_routes(app: FastAPI, model: ServedModel, gateway: WorkerGateway, inference: Inference, version: str) -> None:
    """The FastAPI routes: the inference ones mostly serve the OpenAPI schema (InferenceFastPath answers first)."""

    def metadata() -> dict:
        return {"name": model.name, "versions": [model.version], "platform": model.platform,
                "inputs": model.v2_inputs, "outputs": model.v2_outputs}

    async def infer(request: Request, kind: str, name: str | None = None, version: str | None = None):
        status, body = await inference.answer(kind, name, version, request.headers.get("content-type", ""),
                                              await request.body())
        return FastJSONResponse(body, status_code=status)

    @app.post("/predict")
    async def predict(request: Request):
        return await infer(request, "predict")

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        return await infer(request, "v2", name)

    @app.post("/v2/models/{name}/versions/{model_version}/infer")
    async def v2_infer_version(name: str, model_version: str, request: Request):
        return await infer(request, "v2", name, model_version)

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

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        error = unknown_model(model, name)
        return error_response(error) if error else metadata()

    @app.get("/v2/models/{name}/versions/{model_version}")
    async def model_version_metadata(name: str, model_version: str):
        error = unknown_model(model, name, model_version)
        return error_response(error) if error else metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        error = unknown_model(model, name)
        if error:
            return error_response(error)
        ok = gateway.ready()
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(inference.metrics.render(), media_type="text/plain; version=0.0.4")
