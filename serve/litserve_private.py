"""Every use kiln makes of LitServe's private internals, in one place, each with why no public seam serves.

kiln keeps LitServe as the server (its process launch, worker restarts, LitAPI/LitLoop hooks) and uses its public
seams where they exist: the worker's loop is a `LitLoop` (serve.batching), middlewares go in through
LitServer(middlewares=...), and the request path is kiln's own channel (serve.channel) rather than a
`MessageTransport`, for the reasons given there. What remains below has no public seam in LitServe 0.2.19:

- the stop signal of a worker: LitServe stops a worker by putting `_SENTINEL_VALUE` on its request queue and a
  loop ends by raising `_StopLoopError`; a LitLoop of one's own must read the one and raise the other;
- the GZip middleware LitServer adds for every non-streaming API (no flag turns it off): kiln's answers
  (embeddings, logits) barely compress and the wrapper costs every request a layer;
- the routes LitServer registers that kiln does not serve (each API's own route, /info, /, /health, FastAPI's
  /docs and /redoc): there is a flag to move /health and /info, none to leave them out;
- the app's lifespan, wrapped so that the worker gateways start and stop with the HTTP process.

tests/test_litserve_private.py fails when any of these internals changes shape, so an upgrade of LitServe that
moves them is caught by the suite, not by a server that silently serves LitServe's routes or never stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from litserve.loops.base import _SENTINEL_VALUE as SENTINEL_VALUE
from litserve.loops.base import _StopLoopError as StopLoopError

__all__ = ["SENTINEL_VALUE", "StopLoopError", "drop_gzip", "hide_routes", "wrap_lifespan"]

# FastAPI's own pages that load scripts from a CDN, and LitServe's plain-text "/" and "/health" and its /info
# (its configuration): not part of kiln's surface; /openapi.json stays, for clients and fuzzers.
LITSERVE_PAGES = ("/info", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/health")


def drop_gzip(server) -> None:
    """Takes out the GZipMiddleware LitServer added (kiln answers uncompressed)."""
    from starlette.middleware.gzip import GZipMiddleware

    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]


def hide_routes(server, paths: Iterable[str]) -> None:
    """Removes the routes at `paths` and LitServe's own pages (LITSERVE_PAGES) from the server's app."""
    hidden = set(paths) | set(LITSERVE_PAGES)
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) not in hidden]


def wrap_lifespan(server, around: Callable) -> None:
    """Runs LitServer's own lifespan inside `around(app)` (an async context manager factory): what `around` starts
    before its `yield` is up before the app serves, and stops after LitServe's own shutdown."""
    litserve_lifespan = server.app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with around(app), litserve_lifespan(app):
            yield

    server.app.router.lifespan_context = lifespan
