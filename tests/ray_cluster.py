"""One real Ray cluster, every check on it: run by tests/test_ray.py inside a network and PID namespace of its own
(`unshare -n -p -f -m --mount-proc`), so Ray sees only 127.0.0.1 and every process it starts ends with the
namespace. Prints one JSON object (the last line of stdout) that the test asserts on.

    python tests/ray_cluster.py SERVE_YAML_DIR WORK_DIR ARTIFACT_DIR...

SERVE_YAML_DIR holds what `kiln deploy ray` wrote (deployed unchanged); the same folders are served by `kiln serve`
beside it for the comparison. The steps, in order, on one cluster start (a head node and a second node, one CPU each
... or as many as --num-cpus says):
  listeners: every listening socket in the namespace is on loopback;
  compare:   the same requests to Ray and to `kiln serve` (every route kind, auth, refusals) answer the same;
  upscale:   load on digits takes it from one replica to two, placed on different nodes;
  kill:      one digits replica's process is killed under load: the client's errors are counted, Ray replaces it;
  downscale: after the load, digits goes back to one replica (measured; bounded by --downscale-wait).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

HEAD_PORT = 6390
DASHBOARD_PORT = 8265
KEY = "ray-test-key-0123456789abcdef"
KEY_ENV = "KILN_API_KEY"
log_lines: list[str] = []


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    log_lines.append(line)
    print(line, file=sys.stderr, flush=True)


BIN = Path(sys.executable).parent  # ray, serve: the venv's own


def run(*cmd: str, env: dict | None = None, timeout: float = 120) -> str:
    if (BIN / cmd[0]).exists():
        cmd = (str(BIN / cmd[0]), *cmd[1:])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-3000:]}{result.stdout[-2000:]}")
    return result.stdout


def listeners() -> list[str]:
    """Every listening TCP socket in the namespace: "ADDRESS:PORT PROCESS"."""
    out = run("ss", "-ltnpH")
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            process = parts[5].split('"')[1] if len(parts) > 5 and '"' in parts[5] else "?"
            found.add(f"{parts[3]} {process}")
    return sorted(found)


def wait_for(what: str, check, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g}s")


# --- the requests both servers answer ---------------------------------------------------------------------------


def digits_rows(count: int, seed: int) -> list:
    """`count` digits images (1x8x8, values 0..16 as the training data's)."""
    rng = np.random.default_rng(seed)
    return (rng.random((count, 1, 8, 8), dtype=np.float32) * 16).round(2).tolist()


def probe_requests(models: list[str]) -> list[tuple[str, str, dict, bytes | None, bool]]:
    """(method, path, headers, body, with key): every route kind, auth and refusals."""
    auth = {"Authorization": f"Bearer {KEY}"}
    js = {**auth, "Content-Type": "application/json"}
    rows = digits_rows(3, 1)
    v2 = {"inputs": [{"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32",
                      "data": np.asarray(rows).ravel().tolist()}]}
    binary_header = json.dumps({"inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                            "parameters": {"binary_data_size": 2 * 64 * 4}}],
                                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    binary = binary_header + np.asarray(digits_rows(2, 2), dtype="<f4").tobytes()
    requests = [
        ("GET", "/v2/health/live", {}, None, False),
        ("GET", "/v2/health/ready", {}, None, False),
        ("GET", "/v2/models/digits/ready", {}, None, False),
        ("GET", "/v2/models/digits", auth, None, True),
        ("POST", "/v2/models/digits/infer", js, json.dumps(v2).encode(), True),
        ("POST", "/v2/models/digits/infer", {**auth, "Content-Type": "application/octet-stream",
                                             "Inference-Header-Content-Length": str(len(binary_header))}, binary, True),
        ("POST", "/v2/models/digits/predict", js, json.dumps({"inputs": {"image": rows}}).encode(), True),
        ("POST", "/predict", js, json.dumps({"image": rows[0]}).encode(), True),
        ("POST", "/v2/models/digits/infer", {"Content-Type": "application/json"}, json.dumps(v2).encode(), False),
        ("POST", "/v2/models/digits/infer", {**js, "Authorization": "Bearer wrong"}, json.dumps(v2).encode(), False),
        ("POST", "/v2/models/digits/infer", js, b'{"inputs": [{"name": "input", "shape": [1, 3]}]}', True),
        ("POST", "/v2/models/nope/infer", js, json.dumps(v2).encode(), True),
        ("POST", "/v2/models/digits/infer", js, b"not json", True),
    ]
    if "minilm" in models:
        texts = ["a cat sat on the mat", "kiln serves models on Ray"]
        requests += [
            ("POST", "/v1/embeddings", js, json.dumps({"model": "minilm", "input": texts}).encode(), True),
            ("POST", "/v2/models/minilm/predict", js, json.dumps({"texts": texts}).encode(), True),
            ("POST", "/v1/embeddings", js, json.dumps({"model": "minilm", "input": []}).encode(), True),
        ]
    return requests


def answer_of(response: httpx.Response) -> dict:
    kind = response.headers.get("content-type", "")
    body: object
    if kind.startswith("application/json"):
        body = response.json()
    else:
        body = base64.b64encode(response.content).decode()
    return {"status": response.status_code, "content_type": kind, "body": body}


def compare(ray_url: str, kiln_url: str, models: list[str]) -> dict:
    mismatches = []
    statuses = []
    with httpx.Client(timeout=30) as client:
        for method, path, headers, body, _ in probe_requests(models):
            ray_answer = answer_of(client.request(method, ray_url + path, headers=headers, content=body))
            kiln_answer = answer_of(client.request(method, kiln_url + path, headers=headers, content=body))
            statuses.append([method, path, ray_answer["status"]])
            if ray_answer != kiln_answer:
                mismatches.append({"path": path, "ray": ray_answer, "kiln": kiln_answer})
    return {"requests": len(statuses), "statuses": statuses, "mismatches": mismatches}


# --- load, replicas ----------------------------------------------------------------------------------------------


class Load:
    """Closed-loop clients on digits' V2 route, each request's status and when it was answered."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url + "/v2/models/digits/infer"
        self.concurrency = concurrency
        self.stop = asyncio.Event()
        self.answers: list[tuple[float, int, str]] = []  # (time.monotonic(), status, error text)
        rows = 64  # kiln serve's --max-items: each request is mostly the replica's work, so a replica holds several
        body = {"inputs": [{"name": "image", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                            "data": np.asarray(digits_rows(rows, 3)).ravel().tolist()}]}
        self.body = json.dumps(body).encode()

    async def client(self, http: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        while not self.stop.is_set():
            try:
                response = await http.post(self.url, content=self.body, headers=headers)
                error = "" if response.status_code == 200 else response.text[:300]
                self.answers.append((time.monotonic(), response.status_code, error))
            except httpx.HTTPError as exc:
                self.answers.append((time.monotonic(), -1, f"{type(exc).__name__}: {exc}"))

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency + 4)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(self.client(http) for _ in range(self.concurrency)))


def replicas(model: str) -> list[dict]:
    """The model's live replica actors: node and pid (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:kiln:{model}"), ("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)
    return [{"node_id": a.node_id, "pid": a.pid, "actor_id": a.actor_id, "name": a.name} for a in actors]


def running_replicas(model: str) -> int:
    from ray import serve

    status = serve.status().applications["kiln"].deployments[model]
    return int(status.replica_states.get("RUNNING", 0))


async def scale_and_kill(url: str, concurrency: int, upscale_wait: float, settle_s: float) -> dict:
    """Under load: wait for two running replicas on two nodes, kill one replica's process, keep the load on until
    Ray has two running again (and `settle_s` more), then stop. The client's errors are counted by phase."""
    load = Load(url, concurrency)
    task = asyncio.create_task(load.run())
    out: dict = {}
    try:
        started = time.monotonic()
        await asyncio.to_thread(wait_for, "digits scaled to 2 replicas",
                                lambda: running_replicas("digits") >= 2 and len(replicas("digits")) >= 2,
                                upscale_wait, 0.5)
        out["upscale_s"] = round(time.monotonic() - started, 1)
        placed = replicas("digits")
        out["replicas"] = placed
        out["nodes"] = sorted({r["node_id"] for r in placed})
        await asyncio.sleep(1.0)
        victim = placed[0]
        import ray

        # What the replica holds (Ray's own count of its ongoing requests), read just before the kill.
        actor = ray.get_actor(victim["name"], namespace="serve")
        out["held_at_kill"] = await asyncio.wrap_future(actor.get_num_ongoing_requests.remote().future())
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        out["killed_pid"] = victim["pid"]
        log(f"killed replica pid {victim['pid']}")

        def replaced() -> bool:
            now = replicas("digits")
            return len(now) >= 2 and victim["pid"] not in {r["pid"] for r in now} and running_replicas("digits") >= 2

        await asyncio.to_thread(wait_for, "the killed replica replaced", replaced, 90, 0.5)
        out["replaced_s"] = round(time.monotonic() - killed_at, 1)
        out["replicas_after"] = replicas("digits")
        await asyncio.sleep(settle_s)
    finally:
        load.stop.set()
        await asyncio.wait_for(task, 60)
    before = [a for a in load.answers if a[0] < killed_at]
    after = [a for a in load.answers if a[0] >= killed_at]
    errors = [a for a in after if a[1] != 200]
    out.update({
        "requests_before_kill": len(before), "errors_before_kill": sum(1 for a in before if a[1] != 200),
        "requests_after_kill": len(after), "errors_after_kill": len(errors),
        "error_statuses": sorted({a[1] for a in errors}), "error_samples": sorted({a[2] for a in errors})[:3],
        "last_error_after_kill_s": round(max(a[0] for a in errors) - killed_at, 2) if errors else None,
        "concurrency": concurrency,
    })
    return out


# --- the cluster -------------------------------------------------------------------------------------------------


def start_cluster(temp_dir: str, cpus: int, env: dict) -> None:
    common = ["--num-cpus", str(cpus), "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats",
              "--node-ip-address", "127.0.0.1"]
    run("ray", "start", "--head", "--port", str(HEAD_PORT), "--dashboard-host", "127.0.0.1", "--dashboard-port",
        str(DASHBOARD_PORT), "--temp-dir", temp_dir, *common, env=env)
    run("ray", "start", "--address", f"127.0.0.1:{HEAD_PORT}", *common, env=env)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_dir")
    parser.add_argument("work_dir")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per node")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--upscale-wait", type=float, default=120)
    parser.add_argument("--downscale-wait", type=float, default=90)
    args = parser.parse_args()
    t0 = time.monotonic()
    result: dict = {"ok": False}
    work = Path(args.work_dir)
    env = {**os.environ, KEY_ENV: KEY, "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update({KEY_ENV: KEY})
    config_path = Path(args.config_dir) / "serve.yaml"
    config = yaml.safe_load(config_path.read_text())
    ray_port = config["http_options"]["port"]
    ray_url = f"http://127.0.0.1:{ray_port}"
    models = [m["name"] for m in config["applications"][0]["args"]["models"]]
    kiln_port = ray_port + 1
    kiln_url = f"http://127.0.0.1:{kiln_port}"
    kiln_log = open(work / "kiln-serve.log", "w")
    entries = config["applications"][0]["args"]["models"]
    per_model = [arg for m in entries for arg in ("--variant", f"{m['name']}={m['variant']}", "--threads",
                                                  f"{m['name']}={m['threads']}")]
    kiln = None
    try:
        run("ip", "link", "set", "lo", "up")
        # kiln serve on the same folders, variants and threads, beside the cluster (started first: it loads meanwhile)
        kiln = subprocess.Popen([sys.executable, "-m", "kiln", "serve", *args.folders, "--port", str(kiln_port),
                                 "--api-key-env", KEY_ENV, *per_model],
                                stdout=kiln_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start_cluster(str(work / "ray"), args.cpus, env)
        result["cluster_up_s"] = round(time.monotonic() - t0, 1)
        log(f"cluster up in {result['cluster_up_s']} s")
        run("serve", "deploy", str(config_path), "-a", f"http://127.0.0.1:{DASHBOARD_PORT}", env=env)
        wait_for("the Ray app ready", lambda: httpx.get(f"{ray_url}/v2/health/ready", timeout=2).status_code == 200,
                 180)
        result["app_ready_s"] = round(time.monotonic() - t0, 1)
        log(f"app ready at {result['app_ready_s']} s")
        wait_for("kiln serve ready", lambda: httpx.get(f"{kiln_url}/v2/health/ready", timeout=2).status_code == 200,
                 120)
        import ray

        ray.init(address=f"127.0.0.1:{HEAD_PORT}", logging_level="ERROR", log_to_driver=False)
        result["nodes_alive"] = sum(1 for n in ray.nodes() if n["Alive"])
        result["interfaces"] = run("ip", "-br", "addr").split("\n")
        result["listeners"] = listeners()
        result["compare"] = compare(ray_url, kiln_url, models)
        log(f"compared {result['compare']['requests']} requests: {len(result['compare']['mismatches'])} differ")
        result["initial_replicas"] = running_replicas("digits")
        result["scale"] = asyncio.run(scale_and_kill(ray_url, args.concurrency, args.upscale_wait, 2.0))
        log(f"scale/kill: {json.dumps({k: v for k, v in result['scale'].items() if 'replicas' not in k})}")
        stopped = time.monotonic()
        try:
            wait_for("digits back to one replica", lambda: running_replicas("digits") == 1, args.downscale_wait, 1.0)
            result["downscale_s"] = round(time.monotonic() - stopped, 1)
        except TimeoutError:
            result["downscale_s"] = None
        log(f"downscale: {result['downscale_s']}")
        result["listeners_end"] = listeners()
        result["ok"] = True
    except Exception as exc:  # the test reads the reason from the JSON
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            stop_started = time.monotonic()
            run("ray", "stop", "--force", "--grace-period", "1", env=env, timeout=60)  # this PID namespace's Ray only
            log(f"ray stop took {time.monotonic() - stop_started:.1f} s")
        if kiln is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(kiln.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                kiln.wait(20)
        result["total_s"] = round(time.monotonic() - t0, 1)
        result["log"] = log_lines
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
