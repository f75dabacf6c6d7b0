"""Two models in one server vs each alone, loaded one at a time: three servers up side by side (the idle ones use no
CPU), digits and MiniLM each loaded in interleaved rounds on its own server and on the two-model one. Also the
resident memory of each model's worker and of the shared HTTP process.

    python benchmarks/two_models.py artifacts/digits artifacts/minilm [THREADS]   # THREADS: 2 (default) or
                                                                                    # "default" (no --threads)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_measure import cpu_info, http_pid, loadtest, rss_mib, start, stop, worker_pids

digits_dir, minilm_dir = (str(Path(p).resolve()) for p in sys.argv[1:3])
threads = sys.argv[3] if len(sys.argv) > 3 else "2"  # "default": no --threads (alone: all cores; together: shared)
extra = [] if threads == "default" else ["--threads", threads]
repo = tempfile.mkdtemp(prefix="repo-")
os.symlink(digits_dir, f"{repo}/digits")
os.symlink(minilm_dir, f"{repo}/minilm")
common = ["--variant", "onnx-fp32", *extra]
servers = {}
try:
    servers["digits"] = (18620, start([digits_dir, *common], 18620, "/tmp/kiln-alone-digits.log"))
    servers["minilm"] = (18621, start([minilm_dir, *common], 18621, "/tmp/kiln-alone-minilm.log"))
    servers["both"] = (18622, start([repo, *common], 18622, "/tmp/kiln-both.log"))
    loads = {"digits": ["--concurrency", "8", "--requests", "3000", "--max-seconds", "15"],
             "minilm": ["--concurrency", "8", "--requests", "400", "--max-seconds", "15"]}
    results = {(m, w): [] for m in ("digits", "minilm") for w in ("alone", "both")}
    for rnd in range(3):
        for model in ("digits", "minilm"):
            order = ("alone", "both") if rnd % 2 == 0 else ("both", "alone")
            for where in order:
                port = servers[model][0] if where == "alone" else servers["both"][0]
                level = loadtest(port, "--model", model, *loads[model])["levels"][0]
                results[(model, where)].append((level["requests_per_s"], level["error_count"]))
    print(cpu_info(), "load", os.getloadavg())
    print(f"onnx-fp32, threads: {threads}, concurrency 8, one item a request, V2 JSON, 3 interleaved rounds")
    for model in ("digits", "minilm"):
        alone = statistics.median(r[0] for r in results[(model, "alone")])
        both = statistics.median(r[0] for r in results[(model, "both")])
        print(f"{model}: alone {alone:.0f} req/s {[round(r[0]) for r in results[(model, 'alone')]]}, in the two-model "
              f"server {both:.0f} req/s {[round(r[0]) for r in results[(model, 'both')]]}: {both / alone:.2f} of alone; "
              f"errors {sum(r[1] for r in results[(model, 'alone')] + results[(model, 'both')])}")
    log = "/tmp/kiln-both.log"
    http = http_pid(servers["both"][0])
    for model in ("digits", "minilm"):
        pids = worker_pids(log, model)
        print(f"RSS {model} workers {pids}: {sum(rss_mib(p) for p in pids):.0f} MiB "
              f"(alone server's worker: {sum(rss_mib(p) for p in worker_pids(f'/tmp/kiln-alone-{model}.log', model)):.0f} MiB)")
    print(f"RSS shared HTTP process: {rss_mib(http):.0f} MiB (alone digits: {rss_mib(http_pid(18620)):.0f}, alone minilm: {rss_mib(http_pid(18621)):.0f})")
finally:
    for _port, proc in servers.values():
        stop(proc)
