"""V2 JSON vs V2 binary tensors: 32 digits images a request, concurrency 8, four interleaved rounds each on one
server; items/s and the HTTP process's CPU time per request.

    python benchmarks/binary_vs_json.py artifacts/digits [VARIANT] [THREADS]     # defaults: onnx-fp32, 2
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_measure import cpu_info, cpu_s, http_pid, loadtest, start, stop

folder = sys.argv[1]
variant = sys.argv[2] if len(sys.argv) > 2 else "onnx-fp32"
threads = sys.argv[3] if len(sys.argv) > 3 else "2"
port = 18610
proc = start([folder, "--variant", variant, "--threads", threads], port, "/tmp/kiln-binary-vs-json.log")
try:
    pid = http_pid(port)
    rows = {"v2": [], "v2-binary": []}
    for rnd in range(4):
        for protocol in (("v2", "v2-binary") if rnd % 2 == 0 else ("v2-binary", "v2")):
            c0 = cpu_s(pid)
            report = loadtest(port, "--protocol", protocol, "--items", "32", "--concurrency", "8", "--requests", "1500",
                              "--max-seconds", "20")
            c1 = cpu_s(pid)
            level = report["levels"][0]
            rows[protocol].append((level["items_per_s"], (c1 - c0) / max(level["ok"], 1) * 1000, level["p50_ms"],
                                   level["error_count"]))
    print(cpu_info(), "load", os.getloadavg())
    print(f"digits {variant}, --threads {threads}, --items 32, concurrency 8, 1500 requests a round, 4 rounds each")
    for protocol, values in rows.items():
        ips = [v[0] for v in values]
        cpu = [v[1] for v in values]
        print(f"{protocol:10s} items/s median {statistics.median(ips):.0f} (min {min(ips):.0f}, max {max(ips):.0f}); "
              f"HTTP-process CPU per request median {statistics.median(cpu):.3f} ms; "
              f"p50 {statistics.median(v[2] for v in values):.1f} ms; errors {sum(v[3] for v in values)}")
    ratio = statistics.median(v[0] for v in rows["v2-binary"]) / statistics.median(v[0] for v in rows["v2"])
    print(f"binary / JSON items/s: {ratio:.2f}x")
finally:
    stop(proc)
