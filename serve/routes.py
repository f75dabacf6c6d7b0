"""HTTP routes: `/predict`, the Open Inference Protocol (KServe V2), health and `/metrics`.

They run in the HTTP process. A request is parsed and validated here (serve.protocol) and only a
valid one is queued for the inference worker, through LitServe's own request queue and response
buffer. The wait for the answer is bounded (504 after --timeout) and notices a dead worker (503),
so no client hangs on a request that cannot be answered.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
import orjson
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from litserve.utils import LitAPIStatus

from kiln.serve.api import WorkItem
from kiln.serve.protocol import RequestError, ServedModel, parse_predict, parse_v2, predict_response, v2_response

JSON_TYPES = ("application/json", "")
LIVENESS_POLL_S = 0.25


class WorkerGateway:
    """Queues work for the inference workers and waits for the answer, with a deadline.

    Requests go out on the batching loop's request queue; answers come back on its response queue,
    read by one thread in this process that wakes the waiting request on the event loop.
    """

    def __init__(self, requests, responses, state_dir: str, workers: int, timeout_s: float) -> None:
        self.requests = requests
        self.responses = responses
        self.state_dir = Path(state_dir)
        self.workers = workers
        self.timeout_s = timeout_s
        self._ready = False
        self._checked_at = -1.0
        self._pending: dict[str, asyncio.Future] = {}
        self._reader_pid = None
        self._loop = None

    def worker_pids(self) -> list[int]:
        pids = []
        for path in self.state_dir.glob("worker-*.pid"):
            try:
                pids.append(int(path.read_text()))
            except (OSError, ValueError):
                continue
        return pids

    def ready(self, max_age_s: float = 0.1) -> bool:
        """Every worker has finished setup and is alive (cached briefly: it is asked on every request)."""
        now = time.monotonic()
        if now - self._checked_at > max_age_s:
            pids = self.worker_pids()
            self._ready = len(pids) >= self.workers and all(_alive(pid) for pid in pids)
            self._checked_at = now
        return self._ready

    def _start_reader(self) -> None:
        """Threads do not survive the fork into the HTTP process: start the reader there, on first use."""
        if self._reader_pid == os.getpid():
            return
        self._reader_pid = os.getpid()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="kiln-responses", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                uid, response, status = self.responses.get()
            except (EOFError, OSError):
                return
            future = self._pending.pop(uid, None)
            if future is not None:
                self._loop.call_soon_threadsafe(_resolve, future, (response, status))

    async def submit(self, item: WorkItem):
        if not self.ready():
            raise RequestError("the inference worker is not ready (starting or restarting); retry shortly", 503)
        self._start_reader()
        uid = uuid.uuid4().hex
        future = self._loop.create_future()
        self._pending[uid] = future
        self.requests.put((0, uid, time.monotonic(), item))
        deadline = time.monotonic() + self.timeout_s + 1.0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestError(f"no answer within {self.timeout_s:g}s; the server is overloaded or the "
                                       "request too large, retry later or with fewer items", 504)
                try:
                    response, status = await asyncio.wait_for(asyncio.shield(future), min(LIVENESS_POLL_S, remaining))
                    break
                except asyncio.TimeoutError:
                    if not self.ready(max_age_s=0):
                        raise RequestError("the inference worker stopped while running this request; it is being "
                                           "restarted, retry shortly", 503) from None
        finally:
            self._pending.pop(uid, None)
        if status != LitAPIStatus.OK:
            detail = _error_detail(response)
            if detail is not None and detail[0] == 504:
                raise RequestError(f"waited over {self.timeout_s:g}s in the queue; the server is overloaded, "
                                   "retry later", 504)
            raise RequestError("the inference worker failed on this request", 500)
        if "__error__" in response["outputs"]:
            raise RequestError(response["outputs"]["__error__"], 500)
        return response


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _error_detail(response):
    import pickle

    try:
        error = pickle.loads(response) if isinstance(response, bytes) else response
        return getattr(error, "status_code", None), getattr(error, "detail", None)
    except Exception:  # noqa: BLE001 - an unreadable error is a plain failure
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class FastJSONResponse(Response):
    """orjson writes numpy arrays directly: 30x faster than json.dumps on a 384-float embedding here."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def read_json(request: Request, expected) -> object:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise RequestError(f"Content-Type {media!r} is not supported; send application/json", 415, expected)
    raw = await request.body()
    if not raw.strip():
        raise RequestError("the body is empty; send a JSON object", 400, expected)
    try:
        # orjson also refuses NaN/Infinity literals, numbers that overflow to infinity, and nesting past 1024.
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON ({exc})", 400, expected) from None


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def add_routes(app: FastAPI, model: ServedModel, gateway: WorkerGateway, metrics, version: str) -> None:
    def known(name: str) -> None:
        if name != model.name:
            raise RequestError(f"no model named {name!r}; this server serves {model.name!r}", 404)

    def metadata() -> dict:
        return {"name": model.name, "versions": [model.version], "platform": model.platform,
                "inputs": model.v2_inputs, "outputs": model.v2_outputs}

    async def infer(request: Request, kind: str, name: str | None = None):
        try:
            if name is not None:
                known(name)
            expected = model.expected_v2() if kind == "v2" else model.expected_predict()
            body = await read_json(request, expected)
            parsed = parse_v2(body, model) if kind == "v2" else parse_predict(body, model)
            result = await gateway.submit(WorkItem(parsed.arrays, parsed.texts, parsed.count, time.time()))
        except RequestError as error:
            return error_response(error)
        metrics.record_inference(result["queue_s"], result["infer_s"], result["batch_requests"], result["batch_items"],
                                 result["batch_id"])
        outputs = result["outputs"]
        if kind == "v2":
            return FastJSONResponse(v2_response(model, outputs, parsed))
        return FastJSONResponse(predict_response(model, outputs, parsed))

    @app.post("/predict")
    async def predict(request: Request):
        return await infer(request, "predict")

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        return await infer(request, "v2", name)

    @app.post("/v2/models/{name}/versions/{model_version}/infer")
    async def v2_infer_version(name: str, model_version: str, request: Request):
        if model_version != model.version:
            return error_response(RequestError(f"model {name!r} has no version {model_version!r}", 404))
        return await infer(request, "v2", name)

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
        try:
            known(name)
        except RequestError as error:
            return error_response(error)
        return metadata()

    @app.get("/v2/models/{name}/versions/{model_version}")
    async def model_version_metadata(name: str, model_version: str):
        if name != model.name or model_version != model.version:
            return error_response(RequestError(f"no model {name!r} version {model_version!r}", 404))
        return metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        try:
            known(name)
        except RequestError as error:
            return error_response(error)
        ok = gateway.ready()
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")
