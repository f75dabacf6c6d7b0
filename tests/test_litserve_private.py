"""The LitServe internals kiln relies on (serve.litserve_private) are still where and what kiln expects: an upgrade
of LitServe that moves one fails here, not as a server that serves LitServe's pages or whose workers never stop."""

from __future__ import annotations

import asyncio
import contextlib

import litserve as ls
import pytest
from starlette.middleware.gzip import GZipMiddleware

from kiln.serve import litserve_private as private


class PlainAPI(ls.LitAPI):
    def setup(self, device) -> None:
        pass

    def predict(self, x):
        return x


def _paths(server) -> set:
    return {getattr(route, "path", None) for route in server.app.router.routes}


def test_the_stop_signal_is_litserves_own():
    from litserve.loops import base, simple_loops

    assert private.SENTINEL_VALUE is base._SENTINEL_VALUE
    assert simple_loops._SENTINEL_VALUE is private.SENTINEL_VALUE  # what LitServe's own loops stop on
    assert simple_loops._StopLoopError is private.StopLoopError and issubclass(private.StopLoopError, Exception)


def test_gzip_and_litserves_routes_are_there_and_kiln_takes_them_out():
    server = ls.LitServer(PlainAPI(), accelerator="cpu")
    assert any(m.cls is GZipMiddleware for m in server.app.user_middleware)  # LitServe still adds it
    assert {"/predict", "/info", "/health", "/"} <= _paths(server)  # and registers these
    private.drop_gzip(server)
    private.hide_routes(server, ["/predict"])
    assert not any(m.cls is GZipMiddleware for m in server.app.user_middleware)
    assert not _paths(server) & ({"/predict"} | set(private.LITSERVE_PAGES))
    assert "/openapi.json" in _paths(server)


def test_kilns_lifespan_runs_around_litserves():
    server = ls.LitServer(PlainAPI(), accelerator="cpu")
    events = []

    @contextlib.asynccontextmanager
    async def around(app):
        events.append("start")
        try:
            yield
        finally:
            events.append("stop")

    private.wrap_lifespan(server, around)

    async def enter():
        async with server.app.router.lifespan_context(server.app):
            events.append("serving")

    # LitServe's own lifespan runs inside kiln's: unlaunched, it refuses with its own error, and kiln's part
    # has started and stopped around it.
    with pytest.raises(RuntimeError, match="launch_inference_workers"):
        asyncio.run(enter())
    assert events == ["start", "stop"]
