"""Tracing off vs on (#21): a model (digits or MiniLM; onnx-fp32, one thread, V2 JSON, one item a request) at
concurrency 32 on two servers up side by side (the idle one uses no CPU), one exporting every request's trace over
OTLP/HTTP to a receiver in this process that parses each export as a collector would; interleaved rounds, the order
swapped each round; the CPU time per request of the HTTP process, the span helper and the receiver.

    flock -x /tmp/kiln-cpu.lock python benchmarks/tracing_overhead.py ARTIFACTS [ROUNDS] [SECONDS]
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from otlp_receiver import OtlpReceiver
from serve_measure import cpu_info, cpu_s, http_pid, loadtest, start, stop

folder = str(Path(sys.argv[1]).resolve())
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
seconds = sys.argv[3] if len(sys.argv) > 3 else "8"
receiver = OtlpReceiver(keep=False)
common = [folder, "--variant", "onnx-fp32", "--threads", "1"]
servers = {}
try:
    servers["off"] = (18630, start(common, 18630, "/tmp/kiln-trace-off.log"))
    servers["on"] = (18631, start([*common, "--otlp-endpoint", receiver.url], 18631, "/tmp/kiln-trace-on.log"))
    results: dict[str, list] = {"off": [], "on": []}
    http = {mode: http_pid(port) for mode, (port, _) in servers.items()}
    helper = [int(p) for p in Path(f"/proc/{http['on']}/task/{http['on']}/children").read_text().split()]
    cpu = {"off": 0.0, "on": 0.0, "helper": 0.0, "receiver": 0.0}
    for rnd in range(rounds):
        for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            before = receiver.count
            started = (cpu_s(http[mode]), sum(cpu_s(p) for p in helper), resource.getrusage(resource.RUSAGE_SELF))
            level = loadtest(servers[mode][0], "--concurrency", "32", "--duration", seconds, "--requests", "1000000",
                             "--max-seconds", str(int(seconds) + 10))["levels"][0]
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu[mode] += cpu_s(http[mode]) - started[0]
            if mode == "on":
                cpu["helper"] += sum(cpu_s(p) for p in helper) - started[1]
                cpu["receiver"] += usage.ru_utime + usage.ru_stime - started[2].ru_utime - started[2].ru_stime
            results[mode].append((level["requests_per_s"], level["p50_ms"], level["p99_ms"], level["error_count"],
                                  level["requests"], receiver.count - before))
            time.sleep(1.0)
    time.sleep(6)
    print(cpu_info())
    print(f"{Path(folder).name} onnx-fp32, --threads 1, V2 JSON, 1 item a request, concurrency 32, {rounds} interleaved rounds of "
          f"{seconds} s each")
    for mode in ("off", "on"):
        rows = results[mode]
        print(f"tracing {mode}: median {statistics.median(r[0] for r in rows):.0f} req/s "
              f"{[round(r[0]) for r in rows]}, p50 {statistics.median(r[1] for r in rows):.2f} ms, p99 "
              f"{statistics.median(r[2] for r in rows):.2f} ms, errors {sum(r[3] for r in rows)}")
    on, off = (statistics.median(r[0] for r in results[m]) for m in ("on", "off"))
    requests_on = sum(r[4] for r in results["on"])
    requests_off = sum(r[4] for r in results["off"])
    print(f"on/off: {on / off:.3f}; spans received {receiver.count} for {requests_on} traced requests "
          f"(6 a request: {receiver.count / max(1, requests_on):.2f})")
    print(f"CPU per request: HTTP process off {cpu['off'] / requests_off * 1e6:.0f} us, on "
          f"{cpu['on'] / requests_on * 1e6:.0f} us; span helper {cpu['helper'] / requests_on * 1e6:.0f} us; the "
          f"test's receiver (parsing only) {cpu['receiver'] / requests_on * 1e6:.0f} us")
finally:
    for _port, proc in servers.values():
        stop(proc)
    receiver.close()
