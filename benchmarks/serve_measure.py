"""Shared by benchmarks/binary_vs_json.py and benchmarks/two_models.py: a `kiln serve` in its own session, its HTTP
process (the one listening) and workers (their pids from the log), their CPU time and resident memory, and
`kiln loadtest` runs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KILN = [sys.executable, "-m", "kiln"]

def start(args, port, log):
    proc = subprocess.Popen([*KILN, "serve", *args, "--port", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(Path(log).read_text()[-2000:])

def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except Exception:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

def http_pid(port):
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(re.search(r"pid=(\d+)", out).group(1))

def cpu_s(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0

def worker_pids(log, model):
    return [int(p) for p in re.findall(rf"^kiln: {model} worker \d+ ready \(pid (\d+);", Path(log).read_text(), re.M)]

def loadtest(port, *args):
    out = tempfile.mkdtemp(prefix="kiln-lt-")
    r = subprocess.run([*KILN, "loadtest", f"http://127.0.0.1:{port}", "--out", out, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(Path(out, "loadtest.json").read_text())

def cpu_info():
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", text).group(1)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} vCPUs, {' '.join(keep)}"
