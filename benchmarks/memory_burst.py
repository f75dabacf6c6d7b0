"""Memory after bursts: a real `kiln serve` of a text model under bursts of max-size requests, its inference
worker's resident memory measured before the first burst and after the last, once the load has stopped.

Each burst is `concurrency` clients at once, each sending one request of `items` texts of 20,000 characters (the
largest request the server takes by default), with a short --timeout so that most are shed at their deadline,
as a real overload would be. The worker's RSS is read from /proc (the process of the group that has the runtime
mapped); after the bursts it is sampled until it stops falling (at most `settle_s`).

    python benchmarks/memory_burst.py ARTIFACT_DIR [--bursts 3] [--concurrency 64] -- --variant onnx-fp32

Prints one JSON object; exits 1 when the worker's RSS after the bursts is more than 25% above its size before.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, group_pids  # noqa: E402

MAX_GROWTH = 0.25
TEXT = ("The quick brown fox jumps over the lazy dog near the riverbank at dawn. " * 280)[:20_000]
RUNTIME_LIBS = ("onnxruntime", "libtorch", "openvino")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024


def worker_pid(pgid: int) -> int:
    """The inference worker: the process of the server's group with a runtime's library mapped."""
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/maps") as handle:
                maps = handle.read()
        except OSError:
            continue
        if any(lib in maps for lib in RUNTIME_LIBS):
            return pid
    raise RuntimeError("no process of the server has a runtime loaded")


def settled(pid: int, settle_s: float) -> float:
    """RSS once it stops falling (two samples 0.5 s apart within 1%), or after settle_s."""
    deadline = time.monotonic() + settle_s
    last = rss_mib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mib(pid)
        if abs(now - last) <= 0.01 * last:
            return now
        last = now
    return last


def bursts(url: str, pid: int, count: int, concurrency: int, items: int, timeout: float = 60.0) -> dict:
    body = json.dumps({"texts": [TEXT] * items}).encode()
    headers = {"content-type": "application/json"}
    clients = [httpx.Client(timeout=timeout) for _ in range(concurrency)]
    statuses: dict[str, int] = {}
    peaks = []
    try:
        for _ in range(count):
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                futures = [pool.submit(c.post, f"{url}/predict", content=body, headers=headers) for c in clients]
                peak = 0.0
                while not all(f.done() for f in futures):
                    peak = max(peak, rss_mib(pid))
                    time.sleep(0.1)
                for future in futures:
                    try:
                        key = str(future.result().status_code)
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                    statuses[key] = statuses.get(key, 0) + 1
            peaks.append(round(peak, 1))
    finally:
        for client in clients:
            client.close()
    return {"statuses": statuses, "peaks_mib": peaks}


def measure(artifacts: Path, count: int = 3, concurrency: int = 64, items: int = 64, settle_s: float = 10.0,
            server_args: tuple[str, ...] = ("--timeout", "5")) -> dict:
    server = ServerProcess(artifacts, *server_args).wait_ready(240)
    try:
        pid = worker_pid(server.proc.pid)
        for text in ("warm", "a sentence of the usual length"):  # ordinary traffic first
            httpx.post(f"{server.url}/predict", json={"text": text}, timeout=30).raise_for_status()
        before = settled(pid, settle_s)
        load = bursts(server.url, pid, count, concurrency, items)
        after = settled(pid, settle_s)
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        server.stop()
    growth = (after - before) / before
    return {"server_args": list(server_args), "bursts": count, "concurrency": concurrency, "items": items,
            "worker_rss_before_mib": round(before, 1), "worker_rss_after_mib": round(after, 1),
            "growth_pct": round(100 * growth, 1), "ready_after": ready, **load,
            "passed": growth <= MAX_GROWTH and ready}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("serve_args", nargs="*", help="after --: kiln serve options (default --timeout 5)")
    args = parser.parse_args()
    report = measure(args.artifacts, args.bursts, args.concurrency, args.items,
                     server_args=tuple(args.serve_args) or ("--timeout", "5"))
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
