"""The latency floor of serving over HTTP on this machine, without a model: what `kiln serve` can at best add at
concurrency 1 on top of the model's own in-process latency.

Two bare ASGI apps on uvicorn (httptools, uvloop: what kiln serve runs on), measured with kiln loadtest's client at
concurrency 1, answering a V2-sized JSON body (a 384-float embedding):
  - `direct`: answers in the HTTP process, the least any Python HTTP server can cost;
  - `one worker hop`: sends each request to a second process over a Unix socket and waits for the echo, the least a
    server with separate inference processes (LitServe's model, and so kiln's) can cost.

    python benchmarks/http_floor.py --requests 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import free_port  # noqa: E402

from kiln.bench.loadtest import run_async, run_level  # noqa: E402

BODY = json.dumps({"model_name": "minilm", "outputs": [{"name": "sentence_embedding", "shape": [1, 384],
                                                        "datatype": "FP32",
                                                        "data": np.random.default_rng(0).normal(size=384).tolist()}]}).encode()
HEADER = struct.Struct("!I")


def echo_worker(path: str) -> None:
    """The far end of the hop: read a frame, send it back (a model that takes no time)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    connection, _ = server.accept()
    buffer = b""
    while True:
        chunk = connection.recv(1 << 16)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if len(buffer) < HEADER.size + size:
                break
            frame, buffer = buffer[:HEADER.size + size], buffer[HEADER.size + size:]
            connection.sendall(frame)


def make_app(hop_path: str | None):
    import asyncio

    state = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if hop_path:
                        for _ in range(100):
                            if os.path.exists(hop_path):
                                break
                            await asyncio.sleep(0.05)
                        state["reader"], state["writer"] = await asyncio.open_unix_connection(hop_path)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if hop_path:
            state["writer"].write(HEADER.pack(len(body)) + body)
            (size,) = HEADER.unpack(await state["reader"].readexactly(HEADER.size))
            await state["reader"].readexactly(size)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
        await send({"type": "http.response.body", "body": BODY})

    return app


def serve(port: int, hop_path: str | None) -> None:
    import uvicorn

    uvicorn.run(make_app(hop_path), host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools")


def measure(hop: bool, requests: int) -> dict:
    import httpx

    folder = tempfile.mkdtemp(prefix="kiln-floor-")
    hop_path = os.path.join(folder, "hop.sock") if hop else None
    context = multiprocessing.get_context("spawn")
    processes = []
    if hop_path:
        processes.append(context.Process(target=echo_worker, args=(hop_path,), daemon=True))
        processes[-1].start()
    port = free_port()
    processes.append(context.Process(target=serve, args=(port, hop_path), daemon=True))
    processes[-1].start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.post(url + "/v2/models/minilm/infer", content=b"{}")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a sentence of the usual length"]}]}
    bodies = [("/v2/models/minilm/infer", body)]
    run_async(run_level(url, 1, bodies, 200, None, 60, 10, {}))
    result = run_async(run_level(url, 1, bodies, requests, None, 120, 10, {}))
    for process in processes:
        process.terminate()
        process.join(5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = {"direct": [], "one worker hop": []}
    for _ in range(args.rounds):
        rows["direct"].append(measure(False, args.requests)["p50_ms"])
        rows["one worker hop"].append(measure(True, args.requests)["p50_ms"])
    for name, values in rows.items():
        print(f"{name:15s} p50 {np.median(values):.3f} ms (rounds: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
