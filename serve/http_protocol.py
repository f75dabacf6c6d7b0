"""kiln's uvicorn protocol class, and make_protocol that builds it per server (serve.connections: its rules).

A module of its own because it subclasses uvicorn's httptools protocol, which imports httptools: it is imported
only where httptools is installed (serve.connections.http_implementation says so), and only when the server
starts.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.serve.connections import LINGER_S, ConnectionLimits, _Refused, _Registry, error_response, logger
from kiln.serve.guards import is_open, send_json
from kiln.serve.protocol import retry_after_value


class KilnHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with kiln's rules (serve.connections says which). `limits`, `metrics` and
    `registry` are set on the subclass make_protocol builds: uvicorn makes one protocol object per connection
    from the class it is given, so per-server settings live on the class."""

    limits: ConnectionLimits
    metrics: Any
    registry: _Registry
    retry_after: Callable[[], float] | None = None  # seconds until the queues drain (InferenceService.retry_after_s)

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
        self.metrics.connections_open += 1
        self.registry.idle[self] = self.loop.time()
        over = self._open() - self.limits.max_connections
        if over > 0:
            self._evict(over)
        if self._open() > self.limits.max_open:
            self._refuse(503, f"the server is at its limit of {self.limits.max_connections} connections; retry "
                              "shortly", "over_connection_limit", (("retry-after", self._retry_after()),))
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.metrics.connections_open -= 1
        self._cancel_head_timer()
        self.registry.idle.pop(self, None)
        self.registry.closing.discard(self)
        super().connection_lost(exc)

    def _retry_after(self) -> str:
        """Retry-After for a refusal here: the served models' queue estimate (whole seconds, at least 1)."""
        try:
            seconds = self.retry_after() if self.retry_after is not None else 1.0
        except Exception:  # an estimate must never turn a refusal into a crash
            seconds = 1.0
        return retry_after_value(seconds)

    def _open(self) -> int:
        return len(self.connections) - len(self.registry.closing)

    def _evict(self, count: int) -> None:
        """Closes up to `count` connections idle for evict_after_s or longer, longest idle first."""
        cutoff = self.loop.time() - self.limits.evict_after_s
        for victim, since in list(self.registry.idle.items()):
            if count <= 0 or since > cutoff:
                break  # the rest have been idle for less time still
            if victim is self:
                continue
            self.registry.idle.pop(victim, None)
            victim._close("evicted")
            count -= 1

    def _close(self, reason: str) -> None:
        self.metrics.record_closed(reason)
        self._cancel_head_timer()
        self.registry.idle.pop(self, None)
        self.registry.closing.add(self)
        self.transport.close()

    # --- the head deadline -----------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

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
            self._refuse(408, f"the request line and headers did not arrive within {self.limits.header_timeout_s:g}s;"
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
                room = self.limits.max_header_bytes - self.head_bytes
                if room <= 0:
                    self._refuse(431, f"the request line and headers are over the {self.limits.max_header_bytes}-byte "
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
        linger = len(self.registry.closing) < self.limits.headroom
        self.metrics.record_closed(reason)
        self._cancel_head_timer()
        self.registry.idle.pop(self, None)
        self.registry.closing.add(self)
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
        if len(self.headers) > self.limits.max_headers:
            self.refusal = (431, f"the request has more than {self.limits.max_headers} header fields",
                            "too_many_headers")
            raise _Refused()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self._cancel_head_timer()
        self.registry.idle.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.lingering:
            return
        if self.in_head and (self.cycle is None or self.cycle.response_complete):
            self.registry.idle.pop(self, None)
            self.registry.idle[self] = self.loop.time()  # waits for its next request: last in the eviction order
            self._arm_head_timer()

    # --- admission -------------------------------------------------------------------------------------------

    async def admit(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and len(self.tasks) > self.limits.max_connections
                and not is_open(scope["path"])):
            self.metrics.record_closed("busy")
            await send_json(send, 503, {"error": f"the server is handling its limit of {self.limits.max_connections} "
                                                 "requests at once; retry shortly"},
                            [(b"retry-after", self._retry_after().encode()), (b"connection", b"close")])
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


def make_protocol(limits: ConnectionLimits, metrics: Any,
                  retry_after: Callable[[], float] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with kiln's limits (pass it as uvicorn's `http`)."""
    registry = _Registry(collections.OrderedDict(), set())  # per server: the connections of this HTTP process
    return type("KilnHttpToolsProtocol", (KilnHttpToolsProtocol,),
                {"limits": limits, "metrics": metrics, "registry": registry,
                 "retry_after": staticmethod(retry_after) if retry_after is not None else None})
