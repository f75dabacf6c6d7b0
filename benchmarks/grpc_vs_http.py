"""gRPC beside HTTP binary on one `kiln serve`: requests/s and p50, at each concurrency, in interleaved rounds.

    python benchmarks/grpc_vs_http.py ARTIFACT_DIR [--model minilm] [--variant onnx-fp32] [--threads 1]
        [--concurrency 1,32] [--requests 400 (at least 50 per client)] [--rounds 3] [--out results.json]

One server (HTTP and --grpc-port), stock clients at their defaults: tritonclient.grpc (raw contents) and
tritonclient.http with binary tensors, one short sentence (or one digits image) per request, each concurrency level
run by that many client threads, each with its own client. Rounds alternate HTTP and gRPC so drift on a shared
machine hits both; the figures are the median over rounds and the spread (min-max). Run under
`flock -x /tmp/kiln-cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import ServerProcess, free_port

SENTENCES = ["The cat sat on the mat.", "Interest rates rose again this quarter.",
             "A quick brown fox jumps over the lazy dog.", "Servers should say when to come back."]


def make_input(front: str, model_meta: dict, i: int):
    name = model_meta["inputs"][0]["name"]
    datatype = model_meta["inputs"][0]["datatype"]
    if datatype == "BYTES":
        array = np.array([SENTENCES[i % len(SENTENCES)].encode()], dtype=object)
    else:
        shape = [1] + [int(d) for d in model_meta["inputs"][0]["shape"][1:]]
        array = np.random.default_rng(i).random(shape).astype(np.float32)
    if front == "grpc":
        import tritonclient.grpc as tg

        tensor = tg.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
    else:
        import tritonclient.http as th

        tensor = th.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def run_round(front: str, address: str, model: str, meta: dict, concurrency: int, requests: int) -> dict:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    outputs_http = [th.InferRequestedOutput(o["name"], binary_data=True) for o in meta["outputs"]]
    per_thread = max(1, requests // concurrency)
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    errors = []

    def client_loop(k: int) -> None:
        client = tg.InferenceServerClient(address) if front == "grpc" else th.InferenceServerClient(address)
        tensors = [make_input(front, meta, k * 7 + j) for j in range(4)]
        mine = []
        client.infer(model, [tensors[0]], **({} if front == "grpc" else {"outputs": outputs_http}))  # warm
        barrier.wait()
        for j in range(per_thread):
            started = time.perf_counter()
            try:
                if front == "grpc":
                    client.infer(model, [tensors[j % 4]])
                else:
                    client.infer(model, [tensors[j % 4]], outputs=outputs_http)
            except Exception as exc:  # counted, not hidden
                errors.append(repr(exc))
                continue
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client_loop, k) for k in range(concurrency)]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
    return {"front": front, "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "rps": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact_dir")
    parser.add_argument("--model", default=None)
    parser.add_argument("--variant", default="onnx-fp32")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    grpc_port = free_port()
    server = ServerProcess(Path(args.artifact_dir), "--grpc-port", str(grpc_port), "--variant", args.variant,
                           "--threads", args.threads, log=Path(f"/tmp/kiln-grpc-bench-{grpc_port}.log"))
    rows = []
    try:
        server.wait_ready(180)
        import httpx

        model = args.model or httpx.get(f"{server.url}/v2").json()["models"][0]
        meta = httpx.get(f"{server.url}/v2/models/{model}").json()
        addresses = {"http": server.url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_port}"}
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for r in range(args.rounds):
                order = ("http", "grpc") if r % 2 == 0 else ("grpc", "http")
                for front in order:
                    requests = max(args.requests, 50 * concurrency)  # at least 50 per client thread
                    row = run_round(front, addresses[front], model, meta, concurrency, requests)
                    row["round"] = r
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.stop()
    print("\nfront  conc  req/s median (min-max)      p50 ms median (min-max)   errors")
    summary = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        for front in ("http", "grpc"):
            mine = [r for r in rows if r["front"] == front and r["concurrency"] == concurrency]
            rps = [r["rps"] for r in mine]
            p50 = [r["p50_ms"] for r in mine]
            summary.append({"front": front, "concurrency": concurrency, "rps": statistics.median(rps),
                            "rps_range": [min(rps), max(rps)], "p50_ms": statistics.median(p50),
                            "p50_range": [min(p50), max(p50)], "errors": sum(r["errors"] for r in mine)})
            print(f"{front:5} {concurrency:5}  {statistics.median(rps):7.1f} ({min(rps):.1f}-{max(rps):.1f})"
                  f"        {statistics.median(p50):6.2f} ({min(p50):.2f}-{max(p50):.2f})"
                  f"        {sum(r['errors'] for r in mine)}")
        http = next(s for s in summary if s["front"] == "http" and s["concurrency"] == concurrency)
        grpc_row = next(s for s in summary if s["front"] == "grpc" and s["concurrency"] == concurrency)
        print(f"      grpc/http at {concurrency}: req/s {grpc_row['rps'] / http['rps']:.3f}, "
              f"p50 {grpc_row['p50_ms'] / http['p50_ms']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"rounds": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
