"""The HTTP connection layer, below the ASGI app: deadlines, size limits and a cap on connections.

uvicorn reads requests with httptools whenever it is installed (uvicorn[standard], which LitServe
requires, installs it), else with h11. Left as it is, uvicorn keeps a connection that never finishes its
request head open forever, buffers a head of any size (32 MiB of headers were taken in and answered 200),
accepts connections without limit, and answers malformed HTTP itself in plain text.
serve.http_protocol.make_protocol builds uvicorn's httptools protocol with kiln's rules added (the limits, the
registry of connections and the answers are here, the protocol class there, since it imports httptools):

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

import collections
import http
import json
import logging
from dataclasses import dataclass

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
