"""Speed of two `kiln serve` configurations of one text model, measured interleaved: round by round, each server in
turn (the order alternating), at concurrency 1 and 32, one real sentence per request (V2 JSON).

    python benchmarks/arena_speed.py ARTIFACT_DIR --a-env '' --b-env 'KILN_X=1' [--rounds 4] -- --variant onnx-fp32

Each configuration is one server process group; `--a-env`/`--b-env` are NAME=VALUE pairs (space-separated) set
in its environment. Prints one JSON object: per configuration and level, the median over rounds of req/s and p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

from kiln.bench.loadtest import request_body, run_async, run_level, sample_items  # noqa: E402


def env_of(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--a-env", default="")
    parser.add_argument("--b-env", default="")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    args, serve_args = parser.parse_known_args()
    args.serve_args = [a for a in serve_args if a != "--"]
    configs = {"a": env_of(args.a_env), "b": env_of(args.b_env)}
    servers = {name: ServerProcess(args.artifacts, *args.serve_args, env=env) for name, env in configs.items()}
    figures: dict = {name: {1: [], 32: []} for name in servers}
    try:
        for server in servers.values():
            server.wait_ready(240)
        url = servers["a"].url
        model = httpx.get(f"{url}/v2/models/{httpx.get(f'{url}/v2').json()['models'][0]}").json()
        bodies = [request_body("v2", model, item) for item in sample_items(model)]
        for server in servers.values():  # warm-up, not counted
            run_async(run_level(server.url, 32, bodies, 10**9, 2.0, 60, 30, {}))
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                for level in (1, 32):
                    result = run_async(run_level(servers[name].url, level, bodies, 10**9, args.seconds, 60, 30, {}))
                    figures[name][level].append((result["requests_per_s"], result["p50_ms"], result["error_count"]))
    finally:
        for server in servers.values():
            server.stop()
    report = {"serve_args": args.serve_args, "envs": configs, "rounds": args.rounds}
    for name, levels in figures.items():
        for level, rows in levels.items():
            rates = [r for r, _, _ in rows]
            report[f"{name}_c{level}"] = {"req_s_median": round(statistics.median(rates), 1),
                                          "req_s_range": [round(min(rates), 1), round(max(rates), 1)],
                                          "p50_ms_median": round(statistics.median(p for _, p, _ in rows), 2),
                                          "errors": sum(e for _, _, e in rows)}
    for level in (1, 32):
        report[f"b_over_a_c{level}"] = round(report[f"b_c{level}"]["req_s_median"] / report[f"a_c{level}"]["req_s_median"], 3)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
