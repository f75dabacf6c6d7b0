"""Ray Serve (kiln.serve.ray_app, deployed from `kiln deploy ray`'s config) against `kiln serve`, same folders,
variants and threads, on one machine: req/s and p50 at concurrency 1 and 32, interleaved rounds.

Run it inside a network and PID namespace of its own (Ray must see loopback only), as root:

    kiln deploy ray artifacts/digits artifacts/minilm --out /tmp/ray --threads 1 --proxy-location HeadOnly --port 8100
    flock -x /tmp/kiln-cpu.lock unshare -n -p -f -m --mount-proc .venv/bin/python benchmarks/ray_vs_serve.py \\
        /tmp/ray /tmp/kr-bench artifacts/digits artifacts/minilm --rounds 3 --seconds 4

Rows: digits (V2 JSON, one image per request), minilm (/predict, one sentence), and `index` (POST
/v2/repository/index, answered by the HTTP layer without a model: on Ray, the proxy -> ingress hop alone). Each
batching mode of the Ray app (args.batching: kiln, ray) is deployed in turn; kiln serve is measured in the same
rounds. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from kiln.bench.loadtest import run_level

BIN = Path(sys.executable).parent
KEY = "bench-key-0123456789abcdef0123"


def sh(*cmd: str, env: dict | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=180).stdout


def wait(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(url)


def direct_url() -> str:
    """The ingress replica's own HTTP server (Ray's direct ingress ports, 30000-31000 by default)."""
    for line in sh("ss", "-ltnpH").splitlines():
        address = line.split()[3]
        port = int(address.rsplit(":", 1)[1])
        if "ServeRepli" in line and 30000 <= port < 31000:
            return f"http://127.0.0.1:{port}"
    raise RuntimeError("no direct-ingress listener")


def bodies() -> dict[str, tuple[str, bytes, dict]]:
    image = (np.random.default_rng(0).random((1, 1, 8, 8)) * 16).round(2)
    v2 = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}]}
    json_type = {"Content-Type": "application/json"}
    return {
        "digits": ("/v2/models/digits/infer", json.dumps(v2).encode(), json_type),
        "minilm": ("/v2/models/minilm/predict", json.dumps({"text": "kiln serves a sentence on Ray"}).encode(),
                   json_type),
        "index": ("/v2/repository/index", b"{}", json_type),
    }


def measure(url: str, row: tuple, concurrency: int, seconds: float) -> dict:
    result = asyncio.run(run_level(url, concurrency, [row], 10**9, seconds, seconds, 30.0,
                                   {"Authorization": f"Bearer {KEY}"}))
    return {"rps": result["requests_per_s"], "p50": result["p50_ms"], "errors": result["error_count"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_dir")
    parser.add_argument("work_dir")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batching", default="kiln,ray")
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: clients reach the ingress replica's own HTTP server "
                             "(found with ss), not Ray's proxy; measured as ray-direct")
    args = parser.parse_args()
    sh("ip", "link", "set", "lo", "up")
    env = {**os.environ, "KILN_API_KEY": KEY, "RAY_USAGE_STATS_ENABLED": "0"}
    if args.direct_ingress:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    config = yaml.safe_load((Path(args.config_dir) / "serve.yaml").read_text())
    app = config["applications"][0]
    app["args"].setdefault("serve", {})["api_key_env"] = "KILN_API_KEY"
    port = config["http_options"]["port"]
    ray_url, kiln_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    models = app["args"]["models"]
    per_model = [a for m in models for a in ("--variant", f"{m['name']}={m['variant']}",
                                             "--threads", f"{m['name']}={m['threads']}")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    kiln = subprocess.Popen([sys.executable, "-m", "kiln", "serve", *args.folders, "--port", str(port + 1),
                             "--api-key-env", "KILN_API_KEY", *per_model], env=env, start_new_session=True,
                            stdout=open(work / "kiln.log", "w"), stderr=subprocess.STDOUT)
    rows = bodies()
    names = [m["name"] for m in models if m["name"] in rows] + ["index"]
    levels = [int(x) for x in args.levels.split(",")]
    results: dict = {}
    try:
        sh(str(BIN / "ray"), "start", "--head", "--port", "6390", "--num-cpus", "4", "--dashboard-host", "127.0.0.1",
           "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--temp-dir", str(work / "ray"),
           "--object-store-memory", str(80 * 1024 * 1024), env=env)
        wait(kiln_url + "/v2/health/ready")
        for batching in args.batching.split(","):
            app["args"]["batching"] = batching
            path = work / f"serve-{batching}.yaml"
            path.write_text(yaml.safe_dump(config))
            sh(str(BIN / "serve"), "deploy", str(path), "-a", "http://127.0.0.1:8265", env=env)
            time.sleep(3)
            wait(ray_url + "/v2/health/ready")
            targets = [("kiln", kiln_url), (f"ray-{batching}", ray_url)]
            if args.direct_ingress:
                targets.append((f"ray-direct-{batching}", direct_url()))
                print(f"direct ingress at {targets[-1][1]}", file=sys.stderr, flush=True)
            for name in names[:-1]:  # each model answers before the clock starts (a redeploy restarts replicas)
                deadline = time.monotonic() + 120
                while measure(ray_url, rows[name], 1, 0.3)["errors"] and time.monotonic() < deadline:
                    time.sleep(1)
            for name in names:  # warm both
                for url in (ray_url, kiln_url):
                    measure(url, rows[name], 8, 1.0)
            for r in range(args.rounds):
                for name in names:
                    for level in levels:
                        for target, url in targets if r % 2 == 0 else targets[::-1]:
                            figures = measure(url, rows[name], level, args.seconds)
                            results.setdefault(f"{name} c{level} {target}", []).append(figures)
                            print(f"round {r} {name} c{level} {target}: {figures['rps']:.0f} req/s, p50 "
                                  f"{figures['p50']:.2f} ms, {figures['errors']} errors", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            sh(str(BIN / "ray"), "stop", "--force", "--grace-period", "1", env=env)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kiln.pid, signal.SIGTERM)
        kiln.wait(30)
    summary = {}
    print(f"{'row':34} {'req/s median (min-max)':>26} {'p50 ms median (min-max)':>26}")
    for key, runs in results.items():
        rps = [x["rps"] for x in runs]
        p50 = [x["p50"] for x in runs]
        summary[key] = {"rps": [round(x, 1) for x in rps], "p50_ms": [round(x, 2) for x in p50],
                        "errors": sum(x["errors"] for x in runs)}
        print(f"{key:34} {statistics.median(rps):10.0f} ({min(rps):.0f}-{max(rps):.0f}){'':6} "
              f"{statistics.median(p50):8.2f} ({min(p50):.2f}-{max(p50):.2f})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
