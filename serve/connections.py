"""The HTTP connection layer, below the ASGI app: deadlines, size limits and a cap on connections.

uvicorn reads requests with httptools whenever it is installed (uvicorn[standard], which LitServe
requires, installs it), else with h11. Left as it is, uvicorn keeps a connection that never finishes its
request head open forever, buffers a head of any size (32 MiB of headers were taken in and answered 200),
accepts connections without limit, and answers malformed HTTP itself in plain text. `make_protocol` builds
uvicorn's httptools protocol with kiln's rules added:

- Head deadline: the request line and headers must have fully arrived `header_timeout_s` after the
  connection opened or its last response was sent. Then a connection that sent nothing is closed
  silently (an idle keep-alive); one that sent part of a head gets 408 and is closed.
- Head size: at most `max_header_bytes` bytes of request line and headers, counted as they are read (the
  parser is never fed more), and at most `max_headers` header fields: 431, then the connection closes.
- Connections: at most `max_connections` requests are handled at once; a request beyond that is answered
  503 at once, except the health, readiness and metrics probes (guards.is_open), which are always served.
  When a connection arrives with `max_connections` already open, the connection idle the longest (no
  request in progress: a keep-alive between requests, or a head still arriving), if idle for at least
  `evict_after_s` (0.5 s), is closed to make room, so a crowd of idle or half-sent connections cannot lock
  out a new client or an orchestrator's probe. Where none can go, a few more are let in (`headroom`: for
  probes and 503 answers); beyond that a new connection is answered 503 at once and closed. Open sockets
  thus never exceed max_connections + headroom (+ headroom more, lingering after a refusal), and each holds
  at most one head (max_header_bytes) and one body in flight.
- Every answer given here is JSON {"error": ...}: 400 for malformed HTTP (uvicorn's own is text/plain
  "Invalid HTTP request received."), 408, 431, 503.

After a refusal the connection stops reading, sends its answer, half-closes, and discards what the client
still sends for LINGER_S before closing: closing at once, with unread data, would reset the connection and
could destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
from dataclasses import dataclass
from typing import Any

from kiln.serve.guards import is_open, send_json

LINGER_S = 2.0
logger = logging.getLogger("kiln.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 256

    @property
    def headroom(self) -> int:
        """Connections let in beyond max_connections while every one has a request in progress: room for probes
        and for the 503 answers that tell clients to back off."""
        return max(16, self.max_connections // 8)

    @property
    def max_open(self) -> int:
        return self.max_connections + self.headroom

    @property
    def evict_after_s(self) -> float:
        """How long a connection must have been idle before a new one may take its place: a connection just
        accepted has not had its first bytes read yet, and must not lose its place to the next one of a burst."""
        return min(0.5, self.header_timeout_s / 2)


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 answer with a JSON {"error": ...} body, after which the connection closes."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the reason is on the protocol."""


@dataclass
class _Registry:
    """Per HTTP process: the connections waiting for a request head (-> since when, longest-waiting first), and
    those kiln is closing (not gone yet, lingering at most LINGER_S: they no longer count against the cap)."""

    idle: collections.OrderedDict
    closing: set


def http_implementation() -> str:
    """What uvicorn's "auto" picks here."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def make_protocol(limits: ConnectionLimits, metrics: Any) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with kiln's limits (pass it as uvicorn's `http`). Needs httptools."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    registry = _Registry(collections.OrderedDict(), set())

    class KilnHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.inner_app = self.app
            self.app = self.admit  # uvicorn runs self.app for each request: the per-request checks come first
            self.in_head = True  # reading a request head (or waiting for one)
            self.head_bytes = 0
            self.head_timer: asyncio.TimerHandle | None = None
            self.refusal: tuple[int, str, str] | None = None  # status, message, reason: set by a parser callback
            self.lingering = False

        # --- connection lifetime ---------------------------------------------------------------------------------

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            metrics.connections_open += 1
            registry.idle[self] = self.loop.time()
            over = self._open() - limits.max_connections
            if over > 0:
                self._evict(over)
            if self._open() > limits.max_open:
                self._refuse(503, f"the server is at its limit of {limits.max_connections} connections; retry "
                                  "shortly", "over_connection_limit", (("retry-after", "1"),))
                return
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            metrics.connections_open -= 1
            self._cancel_head_timer()
            registry.idle.pop(self, None)
            registry.closing.discard(self)
            super().connection_lost(exc)

        def _open(self) -> int:
            return len(self.connections) - len(registry.closing)

        def _evict(self, count: int) -> None:
            """Closes up to `count` connections idle for evict_after_s or longer, longest idle first."""
            cutoff = self.loop.time() - limits.evict_after_s
            for victim, since in list(registry.idle.items()):
                if count <= 0 or since > cutoff:
                    break  # the rest have been idle for less time still
                if victim is self:
                    continue
                registry.idle.pop(victim, None)
                victim._close("evicted")
                count -= 1

        def _close(self, reason: str) -> None:
            metrics.record_closed(reason)
            self._cancel_head_timer()
            registry.idle.pop(self, None)
            registry.closing.add(self)
            self.transport.close()

        # --- the head deadline -----------------------------------------------------------------------------------

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self.head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timeout(self) -> None:
            self.head_timer = None
            if not self.in_head or self.lingering or self.transport.is_closing():
                return
            if self.head_bytes == 0:
                self._close("idle")
            else:
                self._refuse(408, f"the request line and headers did not arrive within {limits.header_timeout_s:g}s;"
                                  " send them whole, at once", "header_timeout")

        # --- reading ---------------------------------------------------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self.lingering:
                return  # refused: what the client still sends is read and dropped until the connection closes
            self._unset_keepalive_if_required()
            if not self.in_head:
                self._feed(data)
                return
            view = memoryview(data)
            while view and not self.lingering and not self.transport.is_closing():
                if self.in_head:
                    room = limits.max_header_bytes - self.head_bytes
                    if room <= 0:
                        self._refuse(431, f"the request line and headers are over the {limits.max_header_bytes}-byte "
                                          "limit", "header_too_large")
                        return
                    piece, view = view[:room], view[room:]
                    self.head_bytes += len(piece)
                else:
                    piece, view = view, view[len(view):]
                if not self._feed(piece):
                    return

        def _feed(self, data) -> bool:
            """Parses `data`; False when the connection was refused for it."""
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                # No upgrade (WebSocket, h2c) is served: the request was answered as plain HTTP, and what follows
                # its head is not HTTP this parser can read, so the connection closes after the answer.
                if self.cycle is not None:
                    self.cycle.keep_alive = False
                self.flow.pause_reading()
                self.lingering = True
                return False
            except httptools.HttpParserError as exc:
                if self.refusal is not None:
                    status, message, reason = self.refusal
                    self._refuse(status, message, reason)
                else:
                    logger.debug("invalid HTTP request: %s", exc)
                    self._refuse(400, f"invalid HTTP request ({exc})", "bad_request")
                return False
            return True

        def send_400_response(self, msg: str) -> None:  # uvicorn's own text/plain answer, should it be reached
            self._refuse(400, msg, "bad_request")

        def _refuse(self, status: int, message: str, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
            """Answers `status` with a JSON error and closes the connection: gracefully (lingering) while few
            connections linger, at once beyond `headroom` of them, so refusals cannot pile up open sockets."""
            linger = len(registry.closing) < limits.headroom
            metrics.record_closed(reason)
            self._cancel_head_timer()
            registry.idle.pop(self, None)
            registry.closing.add(self)
            self.lingering = True
            if self.cycle is not None and not self.cycle.response_complete:
                # A response is still being written for an earlier (pipelined) request: let it finish, then close.
                self.cycle.keep_alive = False
                self.flow.pause_reading()
                return
            self.transport.write(error_response(status, message, headers))
            if linger and self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

        # --- parser callbacks ------------------------------------------------------------------------------------

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if len(self.headers) > limits.max_headers:
                self.refusal = (431, f"the request has more than {limits.max_headers} header fields",
                                "too_many_headers")
                raise _Refused()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self.head_bytes = 0
            self._cancel_head_timer()
            registry.idle.pop(self, None)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.in_head = True  # what follows is the next request's head

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() or self.lingering:
                return
            if self.in_head and (self.cycle is None or self.cycle.response_complete):
                registry.idle.pop(self, None)
                registry.idle[self] = self.loop.time()  # waits for its next request: last in the eviction order
                self._arm_head_timer()

        # --- admission -------------------------------------------------------------------------------------------

        async def admit(self, scope, receive, send) -> None:
            if (scope["type"] == "http" and len(self.tasks) > limits.max_connections
                    and not is_open(scope["path"])):
                metrics.record_closed("busy")
                await send_json(send, 503, {"error": f"the server is handling its limit of {limits.max_connections} "
                                                     "requests at once; retry shortly"},
                                [(b"retry-after", b"1"), (b"connection", b"close")])
                return
            started = False

            async def tracking_send(message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.inner_app(scope, receive, tracking_send)
            except Exception:
                if started or scope["type"] != "http":
                    raise
                logger.exception("the app failed before answering")
                started = False
            if not started and scope["type"] == "http":  # uvicorn would answer text/plain "Internal Server Error"
                await send_json(send, 500, {"error": "internal server error"}, [(b"connection", b"close")])

    return KilnHttpToolsProtocol
