"""A version swap under steady traffic (#21): digits served from a model folder (version 1: onnx-fp32), eight
clients sending back to back (V2 JSON, 4 real images a request); after a steady phase, version 2 (the same export
with onnx-int8 as its default) is loaded with POST /v2/repository/models/digits/load, then version 3 (fp32 again),
then 4: every error counted, the worst latency of the requests in flight during each swap beside the steady p99.

    flock -x /tmp/kiln-cpu.lock python benchmarks/version_swap.py DIGITS_ARTIFACTS [STEADY_SECONDS]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_measure import cpu_info, start, stop

from kiln.models.digits import splits

source = Path(sys.argv[1]).resolve()
steady_s = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
repo = Path(tempfile.mkdtemp(prefix="swap-repo-"))
(repo / "digits").mkdir()


def version(number: int, default: str) -> None:
    staging = repo / f".staging-{number}"
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("auto-variant*"))
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["default_variant"] = default
    (staging / "manifest.json").write_text(json.dumps(manifest))
    staging.rename(repo / "digits" / str(number))


version(1, "onnx-fp32")
images = splits()[1].inputs["image"][:4]
body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}]}
port = 18640
url = f"http://127.0.0.1:{port}"
records: list[tuple[float, float, int, str]] = []
stop_event = threading.Event()


def client() -> None:
    with httpx.Client(timeout=30) as session:
        while not stop_event.is_set():
            begin = time.monotonic()
            try:
                reply = session.post(f"{url}/v2/models/digits/infer", json=body)
                status, answered = reply.status_code, reply.json().get("model_version", "")
            except httpx.HTTPError:
                status, answered = 0, ""
            records.append((begin, time.monotonic(), status, answered))


proc = start([str(repo), "--threads", "1", "--max-batch-size", "8"], port, "/tmp/kiln-swap.log")
swaps = []
try:
    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(steady_s)
    steady_end = time.monotonic()
    for number, default in ((2, "onnx-int8"), (3, "onnx-fp32"), (4, "onnx-int8")):
        version(number, default)
        begin = time.monotonic()
        reply = httpx.post(f"{url}/v2/repository/models/digits/load", timeout=120)
        end = time.monotonic()
        assert reply.status_code == 200 and reply.json()["version"] == str(number), reply.text
        swaps.append((number, begin, end))
        time.sleep(steady_s / 2)
    stop_event.set()
    for thread in threads:
        thread.join(30)
finally:
    stop(proc)
    shutil.rmtree(repo, ignore_errors=True)
errors = [r for r in records if r[2] != 200]
steady = [r[1] - r[0] for r in records if r[1] <= steady_end]
print(cpu_info())
print(f"digits, --threads 1 --max-batch-size 8, concurrency 8, V2 JSON, 4 images a request; {len(records)} requests, "
      f"{len(errors)} errors")
print(f"steady (version 1, {steady_s:g} s): {len(steady)} requests, p50 {statistics.median(steady) * 1000:.1f} ms, "
      f"p99 {np.percentile(steady, 99) * 1000:.1f} ms, max {max(steady) * 1000:.1f} ms")
for index, (number, begin, end) in enumerate(swaps):
    during = [r[1] - r[0] for r in records if r[1] > begin and r[0] < end]
    until = swaps[index + 1][1] if index + 1 < len(swaps) else float("inf")
    after = [r[3] for r in records if end < r[0] < until]
    print(f"swap to version {number}: load took {end - begin:.2f} s; {len(during)} requests in flight during it, "
          f"p99 {np.percentile(during, 99) * 1000:.1f} ms, worst {max(during) * 1000:.1f} ms; answered after it by "
          f"version(s) {sorted(set(after))}")
