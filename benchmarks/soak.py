"""Soak: a real `kiln serve` under steady load at concurrency 32, watched for errors and memory growth.

Sends N requests (default 20,000; /predict and V2 alternating, one image each) with the keep-alive client of
`kiln loadtest`, in four equal quarters, while a thread samples the resident memory of every process in the
server's process group (HTTP process, inference worker, LitServe's helpers) from /proc. It passes when no
request failed and the group's RSS grew less than 10% from the first quarter's mean to the last quarter's.
A warm-up (not counted) runs first, so first-use allocations are not mistaken for a leak.

    python benchmarks/soak.py                      # exports digits to /tmp/kiln-soak-digits on first use
    python benchmarks/soak.py ARTIFACT_DIR --requests 20000 --concurrency 32 -- --threads 1   # after --: serve options

Writes benchmarks/results/soak.json; exits 1 when there were errors or the growth reached 10%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, group_pids  # noqa: E402

from kiln.bench.loadtest import request_body, run_async, run_level, sample_items  # noqa: E402

DEFAULT_ARTIFACTS = Path("/tmp/kiln-soak-digits")
MAX_GROWTH = 0.10


def group_rss(pgid: int) -> dict[int, int]:
    """VmRSS in bytes of each live process whose process group is `pgid`."""
    rss = {}
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss[pid] = int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return rss


class RssSampler(threading.Thread):
    """Samples the group's summed RSS every `interval` seconds, tagged with the quarter running at the time."""

    def __init__(self, pgid: int, interval: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pgid, self.interval = pgid, interval
        self.quarter = 0  # 0: warm-up, 1..4: the quarters
        self.samples: list[tuple[float, int, int]] = []  # (seconds, quarter, bytes)
        self._halt = threading.Event()
        self._start = time.monotonic()

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self._start, self.quarter, sum(group_rss(self.pgid).values())))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def mean(self, quarter: int) -> float:
        values = [rss for _, q, rss in self.samples if q == quarter]
        return sum(values) / len(values)


def ensure_artifacts(folder: Path) -> Path:
    if not (folder / "manifest.json").exists():
        print(f"soak: exporting digits to {folder} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "kiln", "export", "digits", "--out", str(folder), "--force"],
                       check=True, stdout=subprocess.DEVNULL)
    return folder


def soak(artifacts: Path, requests: int = 20_000, concurrency: int = 32, warmup: int = 1_000,
         interval: float = 0.5, timeout: float = 30.0, server_args: tuple[str, ...] = ()) -> dict:
    """Start a server on `artifacts`, soak it, stop it; the figures as a dict."""
    server = ServerProcess(artifacts, *server_args).wait_ready()
    sampler = RssSampler(server.proc.pid, interval)
    try:
        model = httpx.get(f"{server.url}/v2/models/{httpx.get(f'{server.url}/v2').json()['models'][0]}").json()
        items = sample_items(model)
        bodies = [request_body("predict" if i % 2 else "v2", model, item) for i, item in enumerate(items)]
        sampler.start()
        if warmup:
            run_async(run_level(server.url, concurrency, bodies, warmup, None, 600, timeout, {}))
        quarters = []
        per_quarter = [requests // 4 + (1 if q < requests % 4 else 0) for q in range(4)]
        start = time.perf_counter()
        for q, count in enumerate(per_quarter, 1):
            sampler.quarter = q
            sampler.sample()
            result = run_async(run_level(server.url, concurrency, bodies, count, None, 3600, timeout, {}))
            sampler.sample()
            quarters.append(result)
            print(f"soak: quarter {q}: {result['requests']} requests, {result['error_count']} errors, "
                  f"{result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                  f"p99 {result['p99_ms']:.1f} ms, RSS {sampler.mean(q) / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        sampler.quarter = 5
        sampler.sample()
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
        processes = group_rss(server.proc.pid)
    finally:
        if sampler.is_alive():
            sampler.stop()
        server.stop()
    errors: dict[str, int] = {}
    for result in quarters:
        for kind, n in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    first, last = sampler.mean(1), sampler.mean(4)
    growth = (last - first) / first
    sent = sum(r["requests"] for r in quarters)
    ok = sum(r["ok"] for r in quarters)
    return {
        "artifacts": str(artifacts), "server_args": list(server_args), "concurrency": concurrency,
        "warmup_requests": warmup, "requests": sent, "ok": ok, "errors": errors, "error_count": sum(errors.values()),
        "seconds": round(seconds, 2), "requests_per_s": round(ok / seconds, 1),
        "quarters": [{k: r[k] for k in ("requests", "ok", "error_count", "seconds", "requests_per_s", "p50_ms",
                                         "p90_ms", "p99_ms")} | {"rss_mean_mib": round(sampler.mean(q) / 2**20, 2)}
                     for q, r in enumerate(quarters, 1)],
        "rss_first_quarter_mib": round(first / 2**20, 2), "rss_last_quarter_mib": round(last / 2**20, 2),
        "rss_growth_pct": round(growth * 100, 3), "rss_samples": len(sampler.samples),
        "rss_per_process_at_end_mib": {str(pid): round(rss / 2**20, 2) for pid, rss in processes.items()},
        "ready_after": ready,
        "passed": sum(errors.values()) == 0 and growth < MAX_GROWTH and ready and ok == sent,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="?", type=Path, help=f"artifact folder (default: digits, exported to "
                                                                f"{DEFAULT_ARTIFACTS} on first use)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1_000, help="requests before the measured run (not counted)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    argv = sys.argv[1:]
    extra = tuple(argv[argv.index("--") + 1:]) if "--" in argv else ()  # after --: extra `kiln serve` options
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.requests < 4 or args.concurrency < 1:
        parser.error("--requests must be at least 4 and --concurrency positive")
    artifacts = args.artifacts or ensure_artifacts(DEFAULT_ARTIFACTS)
    report = soak(artifacts, args.requests, args.concurrency, args.warmup, args.interval, server_args=extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"soak: {report['requests']} requests at concurrency {report['concurrency']} in {report['seconds']}s "
          f"({report['requests_per_s']} req/s), errors {report['error_count']} {report['errors'] or ''}")
    print(f"soak: server RSS first quarter {report['rss_first_quarter_mib']} MiB, last quarter "
          f"{report['rss_last_quarter_mib']} MiB, growth {report['rss_growth_pct']:+.2f}% (limit {MAX_GROWTH:.0%})")
    print(f"soak: {'PASS' if report['passed'] else 'FAIL'}; wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
