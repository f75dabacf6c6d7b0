"""ASGI middleware that guards every route: API-key auth, body-size limit, request metrics.

Pure ASGI (not BaseHTTPMiddleware) so that an oversized body is refused from its Content-Length or
while streaming, without ever being read whole into memory. Auth is default-deny: only the health and
readiness paths are open, matched after normalizing case and trailing slashes, so no spelling of an
inference route slips past. `/metrics` names every model and variant, so it needs the key too, unless
`--metrics-open` says a scraper without the key must reach it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

# Probe paths: no key needed, and served past the connection cap (serve.connections). METRICS_PATH among them is
# exempt from the cap but needs the key unless --metrics-open.
METRICS_PATH = "/metrics"
OPEN_PATHS = {"/health", METRICS_PATH, "/v2/health/live", "/v2/health/ready"}
AUTHORIZED = "kiln.authorized"  # scope key ApiKeyMiddleware sets when auth is on: whether the caller sent the key
MODEL = "kiln.model"  # scope key the inference path sets: the served model a request went to (a metrics label)


def merge_slashes(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p)


def normalize(path: str) -> str:
    return merge_slashes(path).lower()


def is_open(path: str) -> bool:
    p = normalize(path)
    return p in OPEN_PATHS or (p.startswith("/v2/models/") and p.endswith("/ready") and (
        p.count("/") == 4 or (p.count("/") == 6 and p.split("/")[4] == "versions")))  # a version's readiness too


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


MISSING_KEY = "missing or wrong API key; send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


class KeyCheck:
    """The API-key check itself, apart from any transport: ApiKeyMiddleware runs it for HTTP, and a front end
    without kiln's ASGI stack (gRPC metadata, a Ray replica's caller) runs it through serve.inference."""

    def __init__(self, api_key: str) -> None:
        self.key = api_key.encode()

    def authorized(self, presented: bytes | None) -> bool:
        """Whether `presented` (the key as sent, or None) is the key; constant time."""
        return presented is not None and hmac.compare_digest(presented, self.key)

    def presented_in(self, headers: dict) -> bytes | None:
        """The key a request's headers carry: `X-API-Key`, or `Authorization: Bearer` (lower-case byte names, as in
        an ASGI scope or gRPC metadata)."""
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return given


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str, metrics_open: bool = False) -> None:
        self.app = app
        self.check = KeyCheck(api_key)
        self.metrics_open = metrics_open

    def _authorized(self, headers: dict) -> bool:
        return self.check.authorized(self.check.presented_in(headers))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorized = self._authorized(dict(scope["headers"]))
        # Open routes answer anyone, but say less to a caller without the key (serve.routes.Inference.lookup).
        scope[AUTHORIZED] = authorized
        if is_open(scope["path"]) and (self.metrics_open or normalize(scope["path"]) != METRICS_PATH):
            return await self.app(scope, receive, send)
        if not authorized:
            return await send_json(send, 401, {"error": MISSING_KEY}, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class PathNormalizer:
    """`/predict/` and `//predict` reach `/predict` directly: no redirect that echoes the client's Host."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            clean = merge_slashes(path)
            if clean != path:
                scope = {**scope, "path": clean, "raw_path": clean.encode()}
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over the limit (413) and bodies that trickle in too slowly (408), without buffering them."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        too_large = {"error": f"request body is over the {self.max_bytes}-byte limit; send fewer items per request"}
        if declared is not None:
            # Digits only, counted before int() (which raises past 4,300 digits): more than 18 is past any limit.
            digits = declared.strip()
            if not digits.isdigit():
                return await send_json(send, 400, {"error": "Content-Length is not a non-negative integer"})
            digits = digits.lstrip(b"0") or b"0"
            if len(digits) > 18 or int(digits) > self.max_bytes:
                return await send_json(send, 413, too_large)
        received = 0
        started = False
        body_done = False
        deadline = None  # one deadline for the whole body: a byte every few seconds must not hold it open

        async def limited_receive():
            nonlocal received, body_done, deadline
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.read_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTooSlow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await send_json(send, 413, too_large)
        except _BodyTooSlow:
            if not started:
                await send_json(send, 408, {"error": f"the request body did not arrive within "
                                                     f"{self.read_timeout_s:g}s; send it whole, at once"},
                                [(b"connection", b"close")])


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class MetricsMiddleware:
    """Counts every answered request by route template and status, and times it."""

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        self.metrics.in_flight += 1

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.record_request(_route_label(scope), scope.get("method", ""), status,
                                        time.perf_counter() - start, scope.get(MODEL, ""))


def _route_label(scope) -> str:
    """The route template, not the raw path: unbounded label values would grow the registry forever."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if path else "unmatched"
