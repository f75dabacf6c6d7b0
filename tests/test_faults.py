"""Faults: a killed worker, requests past their deadline, graceful shutdown, killed and concurrent exports,
damaged artifact folders, and auth under every spelling of a route."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import FIXTURES, run_kiln
from server_process import ServerProcess, group_pids

from kiln.core.manifest import read_manifest

pytestmark = pytest.mark.slow
ONE = {"image": [[0.0, 0, 5, 13, 9, 1, 0, 0]] + [[0.0] * 8] * 7}


def _worker_pids(pgid: int) -> list[int]:
    pids = []
    for pid in group_pids(pgid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_killed_worker_fails_fast_reports_not_ready_and_comes_back(digits_artifacts):
    server = ServerProcess(digits_artifacts, "--threads", "1", "--timeout", "20").wait_ready()
    try:
        expected = httpx.post(f"{server.url}/predict", json=ONE).json()
        statuses, durations, stop = [], [], threading.Event()

        def load():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        statuses.append(client.post(f"{server.url}/predict",
                                                    json={"inputs": {"image": [ONE["image"]] * 64}}).status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)
                    durations.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        saw_not_ready = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not saw_not_ready:
            saw_not_ready = httpx.get(f"{server.url}/v2/health/ready").status_code == 503
            time.sleep(0.05)
        assert saw_not_ready, "ready stayed 200 with the worker dead"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if httpx.get(f"{server.url}/v2/health/ready").status_code == 200:
                break
            time.sleep(0.25)
        else:
            raise AssertionError("the worker was not restarted within 90 s")
        stop.set()
        for t in threads:
            t.join(60)
        assert set(statuses) <= {200, 503}, set(statuses)
        assert 503 in statuses, "no request was in flight when the worker died"
        assert max(durations) < 20, "a request waited past its deadline"
        assert _worker_pids(server.proc.pid) and _worker_pids(server.proc.pid) != workers
        assert httpx.post(f"{server.url}/predict", json=ONE).json() == expected
    finally:
        server.stop()


def test_requests_past_their_deadline_get_504_and_do_not_block_the_queue(digits_artifacts):
    server = ServerProcess(digits_artifacts, "--threads", "1", "--timeout", "0.3", "--max-batch-size", "2",
                           "--variant", "torchscript-fp32").wait_ready()
    try:
        heavy = {"inputs": {"image": [ONE["image"]] * 64}}

        def call(_):
            response = httpx.post(f"{server.url}/predict", json=heavy, timeout=30)
            return response.status_code, response.json()

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(48)))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 504}, set(statuses)
        assert 504 in statuses, "the flood never went past the 0.3 s deadline"
        assert all("error" in body for status, body in answers if status == 504)
        t0 = time.perf_counter()
        assert httpx.post(f"{server.url}/predict", json=ONE, timeout=30).status_code == 200
        assert time.perf_counter() - t0 < 5, "the queue behind the timed-out requests stayed blocked"
    finally:
        server.stop()


def test_sigterm_finishes_requests_in_flight_then_exits(digits_artifacts):
    server = ServerProcess(digits_artifacts, "--threads", "1", "--variant", "torchscript-fp32").wait_ready()
    heavy = {"inputs": {"image": [ONE["image"]] * 64}}
    results: list = []

    def call():
        try:
            results.append(httpx.post(f"{server.url}/predict", json=heavy, timeout=60).status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # SIGTERM once all 12 are inside the server (+1: this scrape)
        metrics = httpx.get(f"{server.url}/metrics").text
        if int(re.search(r"^kiln_requests_in_flight (\d+)$", metrics, re.M).group(1)) >= 13:
            break
        time.sleep(0.02)
    os.kill(server.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # no new requests once it is stopping
        httpx.post(f"{server.url}/predict", json=ONE, timeout=5)
    for t in threads:
        t.join(60)
    elapsed = server.stop(timeout=40)
    assert results == [200] * 12, results
    assert elapsed < 40


def test_killed_export_leaves_nothing_that_looks_complete_and_a_rerun_works(tmp_path):
    out = tmp_path / "digits"
    env = {**os.environ, "PYTHONPATH": str(FIXTURES)}
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "export", "digits", "--out", str(out),
                             "--variants", "onnx-fp32,pruned-onnx-int8"], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "fine-tune epoch 1/" in line:  # killed in the middle of fine-tuning
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not any((p / "manifest.json").exists() for p in tmp_path.glob(".digits.tmp-*"))
    result = run_kiln("export", "digits", "--out", str(out), "--variants", "onnx-fp32")
    assert result.returncode == 0, result.stderr
    read_manifest(out).verify_file("onnx-fp32")
    assert not list(tmp_path.glob(".digits.tmp-*")), "the killed export's staging folder was not cleaned"


def test_two_exports_to_one_folder_do_not_corrupt_each_other(tmp_path):
    out = tmp_path / "digits"
    env = {**os.environ, "PYTHONPATH": str(FIXTURES)}
    args = [sys.executable, "-m", "kiln", "export", "digits", "--out", str(out), "--force"]
    procs = [subprocess.Popen(args + ["--no-select", "--variants", v], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env) for v in ("onnx-fp32", "torchscript-fp32,onnx-fp32")]
    codes = [p.wait(300) for p in procs]
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    manifest = read_manifest(out)
    for name in manifest.variant_names:
        manifest.verify_file(name)
    assert set(p.name for p in out.iterdir()) == {"manifest.json"} | {v.file for v in manifest.variants}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"], "staging or old folders left behind"


@pytest.fixture()
def damaged(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    return copy


def _damage(folder: Path, how: str) -> None:
    if how == "truncated onnx":
        path = folder / "onnx-fp32.onnx"
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "manifest not json":
        (folder / "manifest.json").write_text("{ this is not json")
    elif how == "manifest lacks fields":
        data = json.loads((folder / "manifest.json").read_text())
        del data["variants"]
        (folder / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("how,error", [("truncated onnx", "IntegrityError"), ("manifest not json", "ManifestError"),
                                       ("manifest lacks fields", "ManifestError")])
@pytest.mark.parametrize("command", ["serve", "bench"])
def test_damaged_folders_are_refused_by_serve_and_bench(damaged, how, error, command):
    _damage(damaged, how)
    before = {p.name: p.read_bytes() for p in damaged.iterdir()}
    args = ["serve", str(damaged), "--port", "18766"] if command == "serve" else \
        ["bench", str(damaged), "--batch-sizes", "1", "--max-seconds", "0.1"]
    result = run_kiln(*args, timeout=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{error}: ") and "; " in last, last
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == before


def test_checkpoints_load_weights_only_and_artifacts_are_never_unpickled():
    root = Path(__file__).resolve().parent.parent
    for folder in ("models", "export", "serve"):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            for line in text.splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
            if path.name != "channel.py":  # the worker channel's pickles come only from kiln's own processes
                assert "pickle.load" not in text, path.name
            assert "allow_pickle=True" not in text, path.name


SPELLINGS = [
    ("POST", "/predict"), ("POST", "/predict/"), ("POST", "/PREDICT"), ("POST", "//predict"),
    ("HEAD", "/predict"), ("OPTIONS", "/predict"), ("GET", "/predict"),
    ("POST", "/v2/models/digits/infer"), ("POST", "/v2/models/digits/infer/"), ("POST", "/V2/Models/digits/Infer"),
    ("POST", "/v2/models/digits/versions/1/infer"), ("OPTIONS", "/v2/models/digits/infer"),
    ("HEAD", "/v2/models/digits"), ("GET", "/v2/models/digits/"), ("GET", "/v2"),
    ("GET", "/v2/health/../models/digits"), ("GET", "/metrics/../predict"),
]


def test_every_spelling_of_an_inference_route_needs_the_key(digits_artifacts):
    key = "kiln-test-key-" + "x" * 24
    server = ServerProcess(digits_artifacts, "--api-key-env", "KILN_FAULT_KEY", env={"KILN_FAULT_KEY": key})
    server.wait_ready()
    try:
        body = json.dumps(ONE).encode()
        with httpx.Client(base_url=server.url) as client:
            for method, path in SPELLINGS:
                request = client.build_request(method, path, content=body if method == "POST" else None,
                                               headers={"content-type": "application/json"})
                request.url = request.url.copy_with(raw_path=path.encode())  # keep the spelling as sent
                response = client.send(request)
                assert response.status_code == 401, (method, path, response.status_code)
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                ok = client.post("/predict", json=ONE, headers=headers)
                assert ok.status_code == 200
                ok = client.post("/predict/", json=ONE, headers=headers)  # served directly, no redirect
                assert ok.status_code == 200
                ok = client.post("/v2/models/digits/versions/1/infer", headers=headers, json={"inputs": [
                    {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                     "data": np.zeros(64).tolist()}]})
                assert ok.status_code == 200
            for wrong in ({"Authorization": "Bearer " + key[:-1]}, {"X-API-Key": key.upper()},
                          {"Authorization": key}):
                assert client.post("/predict", json=ONE, headers=wrong).status_code == 401
        assert key not in server.log_path.read_text()
    finally:
        server.stop()


def _read_until_closed(sock) -> bytes:
    """The whole answer: the head and the body may come in separate segments; the 408 closes the connection."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_that_trickles_in_gets_408_and_frees_the_connection(digits_artifacts):
    import socket

    server = ServerProcess(digits_artifacts, "--body-timeout", "1").wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{}")
            t0 = time.monotonic()
            answer = _read_until_closed(sock)
            assert time.monotonic() - t0 < 8
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert "did not arrive" in json.loads(body)["error"]
        # A byte every 0.3 s never lets a per-read timeout of 1 s expire; the deadline is for the whole body.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n")
            t0 = time.monotonic()
            sock.settimeout(0.3)
            answer = b""
            while not answer and time.monotonic() - t0 < 8:
                try:
                    sock.sendall(b" ")
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
            assert time.monotonic() - t0 < 3, "a trickled body held the connection past the body timeout"
            sock.settimeout(10)
            answer += _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert httpx.post(f"{server.url}/predict", json=ONE).status_code == 200
    finally:
        server.stop()
