"""Large request bodies are inflated, parsed and validated in a helper process, off the HTTP event loop.

Inflating a compressed body and parsing its JSON is CPU work that every other connection of the HTTP process waits
behind: four senders of an 8.3 KB gzip that inflates to 8 MiB of JSON took a light client's p50 from 3.6 ms to
147 ms. A thread would not do: zlib lets go of the GIL, but orjson and numpy's conversion of nested lists hold it
for the whole parse. So bodies over OFFLOAD_BYTES, and every compressed body (a few KB may inflate to megabytes),
go to one helper process, started with the first of them; the validated request comes back pickled (arrays and
strings: a copy, not a parse). At most MAX_IN_FLIGHT bodies are in the helper's hands at once, so at most that many
times --max-body-bytes are being inflated; the rest wait their turn. Small bodies stay inline, where the round trip
to the helper would cost more than their parse: uncompressed ones up to OFFLOAD_BYTES, and compressed ones that
inflate to at most OFFLOAD_BYTES (tried here, at most that much inflated: zlib lets go of the GIL while it works),
so a client that compresses every small request is not queued behind the helper.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from typing import Any

from kiln.serve.protocol import RequestError

OFFLOAD_BYTES = 256 * 1024
MAX_IN_FLIGHT = 2

_inference: Any = None  # in the helper: an Inference over the served models (no gateways: it only parses)


def _start(models: dict, max_body_bytes: int, versions: dict | None = None) -> None:
    global _inference
    from kiln.serve.routes import Endpoint, Inference

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops it, not this
    _inference = Inference({name: Endpoint(model, None) for name, model in models.items()},  # type: ignore[arg-type]
                           max_body_bytes)
    if versions:
        _inference.versions = {name: {number: Endpoint(model, None)  # type: ignore[arg-type]
                                      for number, model in by.items()} for name, by in versions.items()}


def _prepare(kind: str, name: str | None, version: str | None, headers: dict[str, str], raw: bytes) -> tuple:
    from kiln.serve.routes import WIRES

    endpoint, parsed = _inference.prepare(WIRES[kind], name, version, headers, raw)
    return endpoint.model.name, parsed


class Offload:
    """The helper process of one server (started on first use) and the bound on what it holds at once."""

    def __init__(self, models: dict, max_body_bytes: int, threshold: int = OFFLOAD_BYTES,
                 in_flight: int = MAX_IN_FLIGHT) -> None:
        # Fresh copies: a served model's cached properties are rebuilt in the helper, not pickled.
        self.models = {name: dataclasses.replace(model) for name, model in models.items()}
        self.versions: dict[str, dict] = {name: {model.version: model} for name, model in self.models.items()}
        self.max_body_bytes = max_body_bytes
        self.threshold = threshold
        self.in_flight = in_flight
        self._pool: Any = None
        self._slots: asyncio.Semaphore | None = None

    def update(self, endpoints: dict, versions: dict) -> None:
        """The served models changed (serve.control): the next large body starts a helper that knows the new
        set; bodies the old helper holds are finished by it."""
        self.models = {name: dataclasses.replace(endpoint.model) for name, endpoint in endpoints.items()}
        self.versions = {name: {number: dataclasses.replace(endpoint.model) for number, endpoint in by.items()}
                         for name, by in versions.items()}
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def wants(self, headers: dict[str, str], raw: bytes) -> bool:
        return len(raw) > self.threshold or headers.get("content-encoding", "").strip().lower() not in ("", "identity")

    def small_inflate(self, headers: dict[str, str], raw: bytes) -> bytes | None:
        """A compressed body inflated, where it inflates to at most the threshold; None where it is larger (the
        helper's). A small body that is not valid compressed data comes back as sent, still encoded, so the inline
        path refuses it (400, as without the helper) and no helper process is started for it."""
        from kiln.serve.routes import decompress

        if len(raw) > self.threshold:
            return None
        try:
            return decompress(raw, headers.get("content-encoding", ""), self.threshold, None)
        except RequestError as error:
            return None if error.status == 413 else raw

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                                             initargs=(self.models, self.max_body_bytes, self.versions))
        return self._pool

    async def prepare(self, kind: str, name: str | None, version: str | None, headers: dict[str, str],
                      raw: bytes) -> tuple[str, Any]:
        """(the model's name, the validated request), or the RequestError the helper raised."""
        from concurrent.futures.process import BrokenProcessPool

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.in_flight)
        async with self._slots:
            pool = self._executor()
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, _prepare, kind, name, version,
                                                                        headers, raw)
            except BrokenProcessPool:
                if self._pool is pool:  # the next large body starts a fresh helper
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                raise RequestError("the request decoder stopped while reading this body; send it again", 503) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
