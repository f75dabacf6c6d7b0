"""Model control and versions (issue 21): load, unload and the index over HTTP, Triton's version layout, --poll,
and a version swap under steady traffic that drops nothing.

Version 2 of digits is version 1's export with another default variant (onnx-int8 instead of the fp32 default): no
second export, and its answers differ from version 1's (int8 logits), besides naming their version.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_process import ServerProcess, free_port

from kiln.serve.repository import model_entries, plan_models, repository_roots, version_folders

API_KEY = "control-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _copy_version(source: Path, target: Path, default: str | None = None) -> Path:
    """An artifact folder copied (a new version); `default` changes its default variant."""
    staging = target.parent / f".staging-{target.name}"
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("auto-variant*"))
    if default is not None:
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["default_variant"] = default
        (staging / "manifest.json").write_text(json.dumps(manifest))
    staging.rename(target)  # appears whole: --poll never sees half a copy
    return target


def _damage(folder: Path) -> None:
    """One byte changed in every variant file: the sha256 check refuses the folder."""
    for path in folder.glob("*.onnx"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    for path in folder.glob("*.pt"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


# --- fast: the layout -------------------------------------------------------------------------------------------


def _fake_artifact(folder: Path, name: str = "m") -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model": name}))
    return folder


def test_a_model_folder_of_numbered_versions_is_one_model_newest_first(tmp_path):
    repo = tmp_path / "repo"
    _fake_artifact(repo / "digits" / "1")
    _fake_artifact(repo / "digits" / "10")
    _fake_artifact(repo / "digits" / "2")
    (repo / "digits" / "notes").mkdir()
    (repo / "digits" / "03").mkdir()  # not a version (Triton's are plain positive integers)
    _fake_artifact(repo / "minilm")
    entries = model_entries([str(repo)])
    assert [(e.name, [v for v, _ in e.versions]) for e in entries] == [("digits", ["10", "2", "1"]), (None, ["1"])]
    assert [v for v, _ in version_folders(repo / "digits")] == ["10", "2", "1"]
    assert repository_roots([str(repo), str(repo / "minilm")]) == [repo.resolve()]


@pytest.mark.slow
def test_a_damaged_newest_version_is_passed_over_at_start_with_its_reason(digits_artifacts, tmp_path):
    from kiln.serve.server import ServeConfig

    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    _copy_version(digits_artifacts, repo / "digits" / "1")
    _damage(_copy_version(digits_artifacts, repo / "digits" / "2"))
    (plan,) = plan_models(ServeConfig(artifact_dirs=(str(repo),), variant="onnx-fp32"))
    assert (plan.name, plan.version) == ("digits", "1")
    assert [v for v, _ in plan.skipped] == ["2"] and "sha256" in plan.skipped[0][1]


# --- slow: one real server, traffic while versions change -----------------------------------------------------------


class Traffic:
    """Clients at a fixed concurrency sending digits requests back to back; every answer recorded."""

    def __init__(self, url: str, images: np.ndarray, concurrency: int = 8) -> None:
        self.url = url
        self.body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                                 "data": images.ravel().tolist()}]}
        self.records: list[tuple[float, float, int, str, list]] = []  # start, end, status, version, logits row 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def _client(self) -> None:
        with httpx.Client(timeout=30, headers=AUTH) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    reply = client.post(f"{self.url}/v2/models/digits/infer", json=self.body)
                    status = reply.status_code
                    body = reply.json() if status == 200 else {}
                except httpx.HTTPError:
                    status, body = 0, {}
                version = body.get("model_version", "")
                logits = body["outputs"][0]["data"][:10] if status == 200 else []
                self.records.append((start, time.monotonic(), status, version, logits))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture(scope="module")
def versioned(digits_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    repo = root / "repo"
    (repo / "digits").mkdir(parents=True)
    _copy_version(digits_artifacts, repo / "digits" / "1", default="onnx-fp32")
    grpc_port = free_port()
    server = ServerProcess(repo, "--threads", "1", "--max-batch-size", "8", "--poll", "0.5", "--grpc-port",
                           str(grpc_port), "--api-key-env", "KILN_TEST_KEY", env={"KILN_TEST_KEY": API_KEY})
    server.grpc_url = f"127.0.0.1:{grpc_port}"
    try:
        server.wait_ready(120)
        yield server, repo, root
    finally:
        server.stop()


def _index(server) -> list[dict]:
    reply = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH)
    assert reply.status_code == 200
    return reply.json()


@pytest.mark.slow
def test_a_new_version_replaces_the_old_under_traffic_without_an_error(versioned, digits_artifacts):
    from kiln.models.digits import splits

    server, repo, _ = versioned
    images = splits()[1].inputs["image"][:4]
    with Traffic(server.url, images) as traffic:
        time.sleep(1.5)  # steady state on version 1
        steady_end = time.monotonic()
        _copy_version(digits_artifacts, repo / "digits" / "2", default="onnx-int8")  # --poll finds it
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if [(r["version"], r["state"]) for r in _index(server)] == [("1", "UNAVAILABLE"), ("2", "READY")]:
                break
            time.sleep(0.2)
        swapped = time.monotonic()
        time.sleep(1.5)
    records = traffic.records
    errors = [r for r in records if r[2] != 200]
    assert not errors, f"{len(errors)} of {len(records)} requests failed during the swap: {errors[:3]}"
    index = _index(server)
    assert [(r["version"], r["state"]) for r in index] == [("1", "UNAVAILABLE"), ("2", "READY")], index
    assert "version 2 serves" in index[0]["reason"]
    ordered = sorted(records)
    versions = [r[3] for r in ordered]
    first_two = versions.index("2")
    assert set(versions[:first_two]) == {"1"} and versions[-1] == "2"
    assert all(r[3] == "2" for r in ordered if r[0] > swapped)  # after the swap, only version 2 answers
    one = np.array(next(r[4] for r in ordered if r[3] == "1"))
    two = np.array(next(r[4] for r in ordered if r[3] == "2"))
    assert not np.array_equal(one, two)  # int8's logits are not fp32's: the answers, not only the label, changed
    steady = [r[1] - r[0] for r in ordered if r[1] <= steady_end]
    during = [r[1] - r[0] for r in ordered if r[1] > steady_end and r[0] < swapped]
    print(f"swap: {len(records)} requests, {len(errors)} errors; steady p99 "
          f"{np.percentile(steady, 99) * 1000:.1f} ms (median {statistics.median(steady) * 1000:.1f} ms), worst "
          f"during the swap {max(during) * 1000:.1f} ms over {len(during)} requests")
    reply = httpx.post(f"{server.url}/v2/models/digits/versions/1/infer", json=traffic.body, headers=AUTH)
    assert reply.status_code == 404  # version 1 is unloaded
    reply = httpx.post(f"{server.url}/v2/models/digits/versions/2/infer", json=traffic.body, headers=AUTH)
    assert reply.status_code == 200 and reply.json()["model_version"] == "2"
    assert httpx.get(f"{server.url}/v2/models/digits/versions/2/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/digits", headers=AUTH).json()["versions"] == ["2"]


@pytest.mark.slow
def test_a_damaged_version_does_not_replace_the_serving_one(versioned, digits_artifacts):
    server, repo, _ = versioned
    serving = next(r["version"] for r in _index(server) if r["state"] == "READY")
    damaged = str(max(int(p.name) for p in (repo / "digits").iterdir() if p.name.isdigit()) + 1)
    _damage(_copy_version(digits_artifacts, repo / "digits" / damaged, default="onnx-fp32"))
    reply = httpx.post(f"{server.url}/v2/repository/models/digits/load", headers=AUTH)
    assert reply.status_code == 400 and "sha256" in reply.json()["error"], reply.text
    rows = {r["version"]: r for r in _index(server)}
    assert rows[serving]["state"] == "READY" and rows[damaged]["state"] == "UNAVAILABLE"
    assert "failed to load" in rows[damaged]["reason"] and "sha256" in rows[damaged]["reason"]
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=AUTH)
    assert reply.status_code == 200 and reply.json()["model_version"] == serving
    shutil.rmtree(repo / "digits" / damaged)


@pytest.mark.slow
def test_load_and_unload_on_request_keep_to_the_repository(versioned, digits_artifacts):
    server, repo, root = versioned
    url = server.url
    assert httpx.post(f"{url}/v2/repository/models/digits/load").status_code == 401  # behind auth
    assert httpx.post(f"{url}/v2/repository/models/digits/unload").status_code == 401
    for folder in ("../", str(root), "/etc", "digits/../../"):
        reply = httpx.post(f"{url}/v2/repository/models/digits/load", json={"parameters": {"folder": folder}},
                           headers=AUTH)
        assert reply.status_code == 400 and "outside" in reply.json()["error"], (folder, reply.text)
    (root / "elsewhere").mkdir()
    (repo / "link").symlink_to(root / "elsewhere")  # a link out of the repository is refused the same way
    reply = httpx.post(f"{url}/v2/repository/models/digits/load", json={"parameters": {"folder": "link"}},
                       headers=AUTH)
    assert reply.status_code == 400 and "outside" in reply.json()["error"]
    reply = httpx.post(f"{url}/v2/repository/models/digits/load", json={"parameters": {"folder": 3}}, headers=AUTH)
    assert reply.status_code == 400
    assert httpx.post(f"{url}/v2/repository/models/nothing/load", headers=AUTH).status_code == 404
    # An artifact folder of any name inside the repository becomes the model's next version.
    _copy_version(digits_artifacts, repo / "staging", default="onnx-fp32")
    highest = max(int(r["version"]) for r in _index(server))
    reply = httpx.post(f"{url}/v2/repository/models/digits/load", json={"parameters": {"folder": "staging"}},
                       headers=AUTH)
    assert reply.status_code == 200, reply.text
    new = reply.json()["version"]
    assert int(new) == highest + 1 and reply.json()["state"] == "READY"
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    assert httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=AUTH).json()["model_version"] == new
    # A large body is parsed in the offload helper, which learns of the new version too.
    padded = json.dumps(body).replace(",", "," + " " * 5000).encode()
    assert len(padded) > 256 * 1024
    reply = httpx.post(f"{url}/v2/models/digits/versions/{new}/infer", content=padded,
                       headers={**AUTH, "content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["model_version"] == new, reply.text
    # Unloaded: 404 on its routes, the server stays ready, and --poll does not bring it back.
    reply = httpx.post(f"{url}/v2/repository/models/digits/unload", headers=AUTH)
    assert reply.status_code == 200 and [r["version"] for r in reply.json()] == [new]
    assert httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=AUTH).status_code == 404
    time.sleep(1.5)
    assert httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=AUTH).status_code == 404
    assert httpx.post(f"{url}/v2/repository/models/digits/unload", headers=AUTH).status_code == 404
    # Loaded again: the newest version in its model folder.
    newest = str(max(int(p.name) for p in (repo / "digits").iterdir() if p.name.isdigit()))
    reply = httpx.post(f"{url}/v2/repository/models/digits/load", headers=AUTH)
    assert reply.status_code == 200 and reply.json()["version"] == newest, reply.text
    assert httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=AUTH).json()["model_version"] == newest
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_a_loaded_versions_worker_that_dies_is_started_again(versioned, digits_artifacts):
    """LitServe's monitor restarts only the workers it started; serve.control watches those it starts itself."""
    import os
    import re
    import signal

    server, repo, _ = versioned
    _copy_version(digits_artifacts, repo / "digits" / "9", default="onnx-fp32")
    assert httpx.post(f"{server.url}/v2/repository/models/digits/load", headers=AUTH).json()["version"] == "9"
    started = r"^kiln: digits worker digits-v9-0 ready \(pid (\d+);"
    pids = re.findall(started, server.log_path.read_text(), re.M)
    os.kill(int(pids[-1]), signal.SIGKILL)
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if re.search(r"version 9: 1 worker\(s\) died; restarted", server.log_path.read_text()):
            reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=AUTH)
            if reply.status_code == 200:
                break
        time.sleep(0.2)
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=AUTH)
    assert reply.status_code == 200 and reply.json()["model_version"] == "9", server.log_path.read_text()[-2000:]
    assert re.findall(started, server.log_path.read_text(), re.M)[-1] != pids[-1]


@pytest.mark.slow
def test_grpc_loads_unloads_and_lists_the_same_versions(versioned, digits_artifacts):
    """tritonclient.grpc's load_model / unload_model / get_model_repository_index reach the same model control."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    server, repo, _ = versioned
    client = tg.InferenceServerClient(server.grpc_url)
    headers = {"authorization": f"Bearer {API_KEY}"}  # gRPC metadata keys are lower-case

    def grpc_version() -> str:
        image = tg.InferInput("image", [1, 1, 8, 8], "FP32")
        image.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        return client.infer("digits", [image], headers=headers).get_response().model_version

    def grpc_index() -> list:
        rows = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
        return sorted((r["name"], r["version"], r.get("state", "")) for r in rows)

    assert grpc_index() == sorted((r["name"], r["version"], r["state"]) for r in _index(server))
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("digits")
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    new = str(max(int(p.name) for p in (repo / "digits").iterdir() if p.name.isdigit()) + 1)
    _copy_version(digits_artifacts, repo / "digits" / new, default="onnx-int8")
    client.load_model("digits", headers=headers)  # returns once the new version serves
    assert grpc_version() == new
    assert list(client.get_model_metadata("digits", headers=headers).versions) == [new]
    assert ("digits", new, "READY") in grpc_index()
    client.unload_model("digits", headers=headers)
    with pytest.raises(InferenceServerException) as gone:
        grpc_version()
    assert gone.value.status() == "StatusCode.NOT_FOUND"
    assert ("digits", new, "UNAVAILABLE") in grpc_index()
    client.load_model("digits", headers=headers)
    assert grpc_version() == new


def test_poll_takes_a_sane_period():
    from kiln.core.errors import UsageError
    from kiln.serve.server import ServeConfig

    assert ServeConfig(artifact_dirs=("x",), poll_s=2.5).poll_s == 2.5
    for bad in (0.0, -1.0, 1e9):
        with pytest.raises(UsageError, match="--poll"):
            ServeConfig(artifact_dirs=("x",), poll_s=bad)
