"""digits: kiln serve vs TorchServe 0.12 on the same model, the same client and the same requests, in one run.

TorchServe runs from its own virtual environment (benchmarks/.venv-torchserve, made on first use: torchserve and
torch-model-archiver from PyPI, torch==2.13.0 from this machine's wheel) so it never becomes a dependency of kiln.
Each TorchServe configuration is tried and the best is kept, and so for kiln (its batching at the defaults). Both serve the
traced TorchScript digits model (the same file); kiln also serves the same weights as its ONNX Runtime variant, which
is what `kiln export` makes of the model. TorchServe's workers run one torch thread each (OMP_NUM_THREADS).

    python benchmarks/torchserve_vs_kiln.py --requests 3000 --concurrency 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, free_port  # noqa: E402

from kiln.bench.loadtest import run_async, run_level  # noqa: E402

TS_VENV = ROOT / "benchmarks" / ".venv-torchserve"
KILN_CONFIGS = [  # (variant, threads per worker, workers); kiln's batching settings stay at their defaults
    ("torchscript-fp32", 1, 1), ("onnx-fp32", 1, 1), ("onnx-fp32", 2, 1), ("onnx-fp32", 1, 2),
]
TS_CONFIGS = [  # (batch_size, max_batch_delay_ms, workers)
    (1, 0, 1), (1, 0, 2), (16, 5, 1), (32, 2, 1), (16, 5, 2),
]


def ensure_torchserve() -> Path:
    bin_dir = TS_VENV / "bin"
    if not (bin_dir / "torchserve").exists():
        subprocess.run([sys.executable, "-m", "venv", str(TS_VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "torch==2.13.0", "torchserve==0.12.0",
                        "torch-model-archiver==0.12.0", "numpy", "pyyaml"], check=True)
    return bin_dir


def archive(bin_dir: Path, artifact: Path, store: Path) -> None:
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", "digits", "--version", "1.0",
                    "--serialized-file", str(artifact), "--handler", str(ROOT / "benchmarks" / "torchserve_digits_handler.py"),
                    "--export-path", str(store), "--force"], check=True)


def run_torchserve(bin_dir: Path, store: Path, batch: int, delay_ms: int, workers: int, bodies, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ts-"))
    port, mport = free_port(), free_port()
    (work / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{mport}\n"
        f"metrics_address=http://127.0.0.1:{free_port()}\ndisable_token_authorization=true\nenable_model_api=true\n"
        f"load_models=digits.mar\n"
        f"default_workers_per_model={workers}\nmodel_store={store}\ndisable_system_metrics=true\n"
        f"models={{\"digits\": {{\"1.0\": {{\"marName\": \"digits.mar\", \"minWorkers\": {workers}, "
        f"\"maxWorkers\": {workers}, \"batchSize\": {batch}, \"maxBatchDelay\": {delay_ms}}}}}}}\n")
    env = {**os.environ, "TS_CONFIG_FILE": str(work / "config.properties"), "LOG_LOCATION": str(work / "logs"),
           "METRICS_LOCATION": str(work / "logs"), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
                             "--ts-config", str(work / "config.properties")], cwd=work, env=env,
                            stdout=open(work / "out.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(f"{url}/predictions/digits", json=bodies[0][1], timeout=5).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise RuntimeError((work / "out.log").read_text()[-3000:])
        ts_bodies = [("/predictions/digits", body) for _, body in bodies]
        run_async(run_level(url, args.concurrency, ts_bodies, 200, None, 30, 30, {}))  # warm-up
        return run_async(run_level(url, args.concurrency, ts_bodies, args.requests, None, 120, 30, {}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def run_kiln(artifacts: Path, variant: str, threads: int, workers: int, bodies, args) -> dict:
    server = ServerProcess(artifacts, "--variant", variant, "--threads", str(threads),
                           "--workers", str(workers)).wait_ready()
    try:
        run_async(run_level(server.url, args.concurrency, bodies, 200, None, 30, 30, {}))  # warm-up
        return run_async(run_level(server.url, args.concurrency, bodies, args.requests, None, 120, 30, {}))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per TorchServe worker")
    parser.add_argument("--artifacts", type=Path, default=Path("/tmp/kiln-bench/digits"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "torchserve_vs_kiln.json")
    args = parser.parse_args()
    if not (args.artifacts / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "kiln", "export", "digits", "--out", str(args.artifacts),
                        "--force"], check=True)
    from kiln.models.digits import splits

    _, test = splits()
    images = test.inputs["image"]
    bodies = [("/predict", {"inputs": {"image": images[i:i + 1].tolist()}}) for i in range(64)]
    results = {"concurrency": args.concurrency, "requests": args.requests, "threads": args.threads,
               "kiln": {}, "torchserve": {}}
    for variant, threads, workers in KILN_CONFIGS:
        r = run_kiln(args.artifacts, variant, threads, workers, bodies, args)
        results["kiln"][f"{variant}-threads{threads}-workers{workers}"] = r
        print(f"kiln {variant} threads {threads} workers {workers}: {r['requests_per_s']:.0f} req/s, "
              f"p50 {r['p50_ms']:.1f} ms, errors {r['error_count']}")
    bin_dir = ensure_torchserve()
    store = Path(tempfile.mkdtemp(prefix="ts-store-"))
    archive(bin_dir, args.artifacts / "torchscript-fp32.pt", store)
    for batch, delay, workers in TS_CONFIGS:
        r = run_torchserve(bin_dir, store, batch, delay, workers, bodies, args)
        results["torchserve"][f"batch{batch}-delay{delay}ms-workers{workers}"] = r
        print(f"torchserve batch {batch} delay {delay} ms workers {workers}: {r['requests_per_s']:.0f} req/s, "
              f"p50 {r['p50_ms']:.1f} ms, errors {r['error_count']}")
    best_ts = max(results["torchserve"].items(), key=lambda kv: kv[1]["requests_per_s"])
    best_kiln = max(results["kiln"].items(), key=lambda kv: kv[1]["requests_per_s"])
    ratio = best_kiln[1]["requests_per_s"] / best_ts[1]["requests_per_s"]
    results["best"] = {"kiln": best_kiln[0], "torchserve": best_ts[0], "ratio": ratio}
    print(f"best kiln ({best_kiln[0]}) / best TorchServe ({best_ts[0]}) = {ratio:.2f}x at concurrency {args.concurrency}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
