"""Can one client stall the others? A light client's latency alone, then while heavy requests arrive.

Two probes, each against its own `kiln serve`:
- `gzip` (a tensor model, digits): 4 senders loop on an 8 KB gzip body that inflates to 8 MiB of JSON (a valid
  one-image V2 request plus a 4-million-number field the server must parse and ignore), while the light client
  sends one image at a time.
- `embeddings` (a text model, MiniLM): one /v1/embeddings request of 64 texts of 20,000 characters, while the
  light client sends one short sentence at a time; the figures are for the light requests sent within `--seconds`
  of its start (one such request is sent first, unmeasured, so first-use costs are not counted).

    python benchmarks/stall_probe.py --digits ARTIFACT_DIR --minilm ARTIFACT_DIR [--seconds 6]

Prints one JSON object: per probe, the light client's p50 (ms) alone and under the probe, and their ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

IMAGE = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
LONG = ("The quick brown fox jumps over the lazy dog near the riverbank at dawn. " * 280)[:20_000]


def gzip_bomb() -> bytes:
    pad = b"[" + b"0," * (4 * 1024 * 1024 - 40_000) + b"0]"  # just under 8 MiB of JSON numbers
    return gzip.compress(json.dumps(IMAGE).encode()[:-1] + b', "pad": ' + pad + b"}", 9)


def light(url: str, path: str, body: dict, seconds: float, stop: threading.Event | None = None) -> list:
    """(sent at, latency s, status) of sequential requests for `seconds` (or until `stop`)."""
    out = []
    with httpx.Client(timeout=60) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop and stop.is_set()):
            t0 = time.monotonic()
            status = client.post(url + path, json=body).status_code
            out.append((t0, time.monotonic() - t0, status))
    return out


def p50_ms(rows: list) -> float:
    return round(1000 * statistics.median(r[1] for r in rows), 2) if rows else float("nan")


def probe_gzip(artifacts: Path, seconds: float, serve_args: tuple) -> dict:
    server = ServerProcess(artifacts, *serve_args).wait_ready(240)
    path = "/v2/models/digits/infer"
    bomb = gzip_bomb()
    try:
        light(server.url, path, IMAGE, 1.0)  # warm-up
        alone = light(server.url, path, IMAGE, seconds)
        stop = threading.Event()
        statuses: dict[int, int] = {}

        def sender() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    status = client.post(server.url + path, content=bomb, headers={
                        "content-type": "application/json", "content-encoding": "gzip"}).status_code
                    statuses[status] = statuses.get(status, 0) + 1

        senders = [threading.Thread(target=sender) for _ in range(4)]
        for thread in senders:
            thread.start()
        time.sleep(0.5)
        loaded = light(server.url, path, IMAGE, seconds)
        stop.set()
        for thread in senders:
            thread.join()
    finally:
        server.stop()
    return {"body_bytes": len(bomb), "heavy_statuses": statuses, "light_p50_alone_ms": p50_ms(alone),
            "light_p50_probe_ms": p50_ms(loaded), "ratio": round(p50_ms(loaded) / p50_ms(alone), 2),
            "light_max_probe_ms": round(1000 * max(r[1] for r in loaded), 1),
            "light_errors": sum(1 for r in alone + loaded if r[2] != 200)}


def probe_embeddings(artifacts: Path, seconds: float, serve_args: tuple) -> dict:
    server = ServerProcess(artifacts, *serve_args).wait_ready(240)
    body = {"text": "a sentence of the usual length"}
    heavy = {"model": "minilm", "input": [LONG] * 64}
    try:
        httpx.post(server.url + "/v1/embeddings", json=heavy, timeout=60)  # first-use costs (decoder, arena) paid
        light(server.url, "/predict", body, 1.0)
        alone = light(server.url, "/predict", body, seconds)
        stop = threading.Event()
        rows: list = []
        watcher = threading.Thread(target=lambda: rows.extend(light(server.url, "/predict", body, 60, stop)))
        watcher.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        status = httpx.post(server.url + "/v1/embeddings", json=heavy, timeout=60).status_code
        t1 = time.monotonic()
        time.sleep(max(0.2, t0 + seconds - time.monotonic()))
        stop.set()
        watcher.join()
    finally:
        server.stop()
    during = [r for r in rows if t0 <= r[0] <= t0 + seconds]  # a fixed window from the heavy request's start
    return {"heavy_status": status, "heavy_s": round(t1 - t0, 2), "light_p50_alone_ms": p50_ms(alone),
            "light_p50_probe_ms": p50_ms(during), "ratio": round(p50_ms(during) / p50_ms(alone), 2),
            "light_max_probe_ms": round(1000 * max(r[1] for r in during), 1), "light_during": len(during)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--digits", type=Path)
    parser.add_argument("--minilm", type=Path)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()
    report = {}
    if args.digits:
        report["gzip"] = probe_gzip(args.digits, args.seconds, ("--threads", args.threads))
    if args.minilm:
        report["embeddings"] = probe_embeddings(args.minilm, args.seconds,
                                                ("--threads", args.threads, "--variant", "onnx-fp32"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
