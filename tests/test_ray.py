"""`kiln deploy ray` and kiln's Ray Serve application (kiln.serve.ray_app).

The fast tests check the writer: its config is what Ray 2.60's own schema accepts, every figure where it came from,
one-line errors. The slow test deploys the writer's output, unchanged, on a real two-node Ray cluster on this machine,
in a network and PID namespace of its own (tests/ray_cluster.py: one cluster start for every check, since a start
costs ~20 s of a 2-core CI machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import run_kiln
from test_deploy import _one_line_error, make_folder

DRIVER = Path(__file__).resolve().parent / "ray_cluster.py"


def _deploy(tmp_path: Path, *folders: Path, args: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "ray"
    result = run_kiln("deploy", "ray", *map(str, folders), "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert f"serve deploy {out / 'serve.yaml'}" in result.stdout
    return yaml.safe_load((out / "serve.yaml").read_text())


def test_ray_config_is_what_ray_accepts(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    digits = make_folder(tmp_path / "a")
    minilm = make_folder(tmp_path / "b", "minilm", text=True)
    config = _deploy(tmp_path, digits, minilm, args=(
        "--threads", "2", "--min-replicas", "1", "--max-replicas", "4", "--target-concurrency", "3",
        "--api-key-env", "KILN_API_KEY", "--variant", "minilm=onnx-int8", "--port", "8100", "--host", "0.0.0.0",
        "--max-replicas-per-node", "1", "--downscale-delay-s", "30", "--max-batch-tokens", "2048"))
    schema = ServeDeploySchema.model_validate(config)  # Ray's own validation of `serve deploy`'s input
    app = schema.applications[0]
    assert app.import_path == "kiln.serve.ray_app:build" and app.route_prefix == "/"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8100}
    models = config["applications"][0]["args"]["models"]
    assert [(m["name"], m["variant"], m["threads"]) for m in models] == [("digits", "onnx-fp32", 2),
                                                                        ("minilm", "onnx-int8", 2)]
    assert all(Path(m["folder"]).is_absolute() for m in models)
    assert config["applications"][0]["args"]["serve"]["api_key_env"] == "KILN_API_KEY"  # the name, never a key
    assert config["applications"][0]["args"]["serve"]["max_batch_tokens"] == 2048
    from kiln.serve.ray_app import parse_args

    assert parse_args(config["applications"][0]["args"])[1].max_batch_tokens == 2048  # the app takes what it wrote
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["kiln-ingress"]["ray_actor_options"] == {"num_cpus": 0}
    digits_deployment = deployments["digits"]
    assert digits_deployment["ray_actor_options"]["num_cpus"] == 2
    assert digits_deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                                       "target_ongoing_requests": 3, "downscale_delay_s": 30.0}
    assert digits_deployment["max_ongoing_requests"] == 32 and digits_deployment["max_replicas_per_node"] == 1


def test_ray_target_from_loadtest(tmp_path):
    digits = make_folder(tmp_path / "a")
    levels = [{"concurrency": c, "p99_ms": p, "error_count": 0, "requests_per_s": 100.0}
              for c, p in ((1, 5.0), (4, 40.0), (16, 300.0))]
    (digits / "loadtest.json").write_text(json.dumps({"model": "digits", "levels": levels}))
    result = run_kiln("deploy", "ray", str(digits), "--out", str(tmp_path / "ray"))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "ray" / "serve.yaml").read_text())
    scaling = config["applications"][0]["deployments"][1]["autoscaling_config"]
    assert scaling["target_ongoing_requests"] == 4  # the highest level within the 100 ms p99 budget
    assert "target_ongoing_requests 4: the highest loadtest concurrency" in result.stderr


def test_ray_writer_refuses_in_one_line(tmp_path):
    digits = make_folder(tmp_path / "a")
    out = str(tmp_path / "ray")
    line = _one_line_error(run_kiln("deploy", "ray", str(digits), "--out", out, "--min-replicas", "3",
                                    "--max-replicas", "2"), "UsageError")
    assert "--max-replicas 2" in line
    line = _one_line_error(run_kiln("deploy", "ray", str(digits), "--out", out, "--variant", "nope"), "UsageError")
    assert "nope" in line
    line = _one_line_error(run_kiln("deploy", "ray", str(digits), "--out", out, "--api-key-env", "A-B"),
                           "UsageError")
    assert "--api-key-env" in line
    line = _one_line_error(run_kiln("deploy", "ray", str(digits), "--out", out, "--max-batch-tokens", "-1"),
                           "UsageError")
    assert "--max-batch-tokens" in line
    assert not Path(out).exists()  # a refusal writes nothing
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    line = _one_line_error(run_kiln("deploy", "ray", str(digits), "--out", str(tmp_path / "full")), "UsageError")
    assert "--force" in line and (tmp_path / "full" / "x").read_text() == "keep"


def test_ray_app_args_refused_with_the_fix():
    from kiln.core.errors import UsageError
    from kiln.serve.ray_app import parse_args

    for bad in ({}, {"models": []}, {"models": [{"name": "x"}]}, {"models": [{"name": "x", "folder": "/", "y": 1}]},
                {"models": [{"name": "x", "folder": "/"}], "serve": {"port": 1}}):
        with pytest.raises(UsageError):
            parse_args(bad)


def _namespace_command() -> list[str]:
    """A network namespace with loopback only and a PID namespace: Ray sees 127.0.0.1 alone, and every process it
    starts ends with the namespace's first process (the driver), whatever happens."""
    user = [] if os.geteuid() == 0 else ["-r"]  # unprivileged: a user namespace maps us to root inside
    return ["unshare", *user, "-n", "-p", "-f", "-m", "--mount-proc"]


@pytest.mark.slow
def test_ray_cluster_two_nodes(digits_artifacts, minilm_artifacts, tmp_path):
    """The writer's config, deployed unchanged on a head node plus a second node: every listener on loopback,
    answers equal to `kiln serve`'s, digits scaled 1 -> 2 replicas on different nodes under load, one replica
    killed mid-load (the client's errors counted), replaced by Ray, and back to one replica after the load."""
    args = ("--variant", "onnx-fp32", "--threads", "1", "--min-replicas", "1", "--max-replicas", "2",
            "--target-concurrency", "2", "--max-replicas-per-node", "1", "--api-key-env", "KILN_API_KEY",
            "--proxy-location", "HeadOnly", "--upscale-delay-s", "1", "--downscale-delay-s", "2", "--port", "8100")
    config = _deploy(tmp_path, digits_artifacts, minilm_artifacts, args=args)
    max_ongoing = config["applications"][0]["deployments"][1]["max_ongoing_requests"]
    work = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        proc = subprocess.run([*_namespace_command(), sys.executable, str(DRIVER), str(tmp_path / "ray"), str(work),
                               str(digits_artifacts), str(minilm_artifacts), "--cpus", "2", "--concurrency", "12"],
                              capture_output=True, text=True, timeout=420)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"ok"')]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    assert result["ok"], (result.get("error"), result["log"], proc.stderr[-4000:])
    assert result["nodes_alive"] == 2

    # Only loopback exists, and every listener is on it, but for Ray Serve 2.60's replicas: each binds its
    # inter-deployment gRPC server on [::]:0 (ray/serve/_private/replica.py, no setting changes it).
    assert [line.split()[0] for line in result["interfaces"] if line.strip()] == ["lo"]
    for listeners in (result["listeners"], result["listeners_end"]):
        outside = [entry for entry in listeners if not _on_loopback(entry)]
        assert all(entry.endswith("ray::ServeRepli") and entry.startswith("*:") for entry in outside), listeners
        assert any(entry.startswith("127.0.0.1:8100 ") for entry in listeners)

    compare = result["compare"]
    assert compare["mismatches"] == [] and compare["requests"] >= 15
    statuses = [status for _method, _path, status in compare["statuses"]]
    assert statuses.count(200) >= 9 and statuses.count(401) == 2 and 422 in statuses and 404 in statuses

    scale = result["scale"]
    assert result["initial_replicas"] == 1 and scale["upscale_s"] > 0
    assert len(scale["replicas"]) == 2 and len(scale["nodes"]) == 2  # one replica on each node
    assert scale["errors_before_kill"] == 0 and scale["requests_before_kill"] > 0
    # A killed replica costs the client only the requests it held: at most its max_ongoing_requests and the
    # clients' concurrency, answered 503 (kiln's JSON error) right after the kill; after that, every answer is 200.
    assert scale["errors_after_kill"] <= min(max_ongoing, scale["concurrency"])
    # held_at_kill is read a few milliseconds before the kill (requests come and go meanwhile): 2 of slack for that
    assert scale["errors_after_kill"] <= scale["held_at_kill"] + 2
    assert set(scale["error_statuses"]) <= {503}
    assert scale["last_error_after_kill_s"] is None or scale["last_error_after_kill_s"] < 5
    assert scale["requests_after_kill"] > 10 * max(1, scale["errors_after_kill"])
    assert scale["killed_pid"] not in {r["pid"] for r in scale["replicas_after"]}
    assert len(scale["replicas_after"]) == 2
    assert result["downscale_s"] is not None  # back to min_replicas after the load


def _on_loopback(listener: str) -> bool:
    host = listener.split()[0].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


def test_kiln_batcher_never_holds_a_lone_request_and_cuts_a_backlog_by_admission():
    """The replica's batching (kiln.serve.ray_app.KilnBatcher) is kiln serve's rule: a lone request runs at once
    (no window), what queued while a batch ran forms the next batch, cut by requests and items; a request whose
    caller gave up is not run."""
    import asyncio
    import time

    from kiln.core.runner import WorkItem
    from kiln.serve.admission import RowsAdmission
    from kiln.serve.batching import BatchCostModel
    from kiln.serve.ray_app import KilnBatcher

    batches: list[list[int]] = []

    async def run(items):
        batches.append([item.count for item in items])
        await asyncio.sleep(0.02)
        return [f"rows {item.count}" for item in items]

    def item(count: int) -> WorkItem:
        return WorkItem(None, ["x"] * count, count, time.time())

    async def scenario():
        batcher = KilnBatcher(run, RowsAdmission(3, 4), BatchCostModel(), delay_s=5.0)
        started = time.perf_counter()
        assert await batcher.submit(item(1)) == "rows 1"
        lone_s = time.perf_counter() - started
        first = asyncio.create_task(batcher.submit(item(1)))
        await asyncio.sleep(0.005)  # the first batch is running: the rest queue behind it
        rest = [asyncio.create_task(batcher.submit(item(n))) for n in (1, 1, 1, 1, 3, 2)]
        gave_up = asyncio.create_task(batcher.submit(item(1)))
        await asyncio.sleep(0)
        gave_up.cancel()
        answers = await asyncio.gather(first, *rest)
        return lone_s, answers

    lone_s, answers = asyncio.run(scenario())
    assert lone_s < 1.0  # not the 5 s delay: one request never waits for company
    assert answers == ["rows 1", "rows 1", "rows 1", "rows 1", "rows 1", "rows 3", "rows 2"]
    # [1] alone; [1] alone (running when the rest came); then at most 3 requests and 4 items per batch, in order
    assert batches == [[1], [1], [1, 1, 1], [1, 3], [2]]


def test_kiln_batcher_cuts_text_requests_by_length_with_a_token_budget():
    """With kiln serve's token budget (TokenBudgetAdmission) a replica's batches are cut from everything waiting, by
    length, the oldest first: short queries queued behind a passage are not padded to it, and the passage runs
    in the first cut once it is the oldest."""
    import asyncio
    import time

    from kiln.core.runner import WorkItem
    from kiln.serve.admission import TokenBudgetAdmission
    from kiln.serve.batching import BatchCostModel
    from kiln.serve.ray_app import KilnBatcher

    batches: list[list[int]] = []

    def measure(items):  # a text's tokens are its characters
        for item in items:
            item.tokens = item.length = len(item.texts[0])

    async def run(items):
        batches.append([item.length for item in items])
        await asyncio.sleep(0.02)
        return [item.length for item in items]

    async def scenario():
        batcher = KilnBatcher(run, TokenBudgetAdmission(8, 1024, 64), BatchCostModel(), 0.0, measure)
        first = asyncio.create_task(batcher.submit(WorkItem(None, ["q" * 12], 1, time.time())))
        await asyncio.sleep(0.005)  # running: the rest queue behind it
        lengths = [10, 200, 14, 11, 190, 13]
        rest = [asyncio.create_task(batcher.submit(WorkItem(None, ["x" * n], 1, time.time()))) for n in lengths]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [12, 10, 200, 14, 11, 190, 13]
    assert batches[0] == [12]
    # the oldest (10) opens the next cut with the queries near its length; then the passages, together
    assert batches[1:] == [[10, 14, 11, 13], [200, 190]]


def test_deploy_ray_needs_neither_ray_nor_the_export_extra(tmp_path):
    """`kiln deploy ray` writes the config in a serve-only install without Ray (only the cluster needs kiln[ray]);
    kiln.serve.ray_app imports there too (Ray is imported where the app is built)."""
    from test_deploy import BLOCKED, WITHOUT_EXPORT_EXTRA

    blocking = WITHOUT_EXPORT_EXTRA.replace(repr(BLOCKED), repr((*BLOCKED, "ray")))
    assert blocking != WITHOUT_EXPORT_EXTRA
    digits = make_folder(tmp_path / "a")
    script = blocking + ("import kiln.serve.ray_app\nfrom kiln.cli import main\n"
                         "code = main(sys.argv[1:])\nassert 'ray' not in sys.modules and 'torch' not in sys.modules\n"
                         "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script, "deploy", "ray", str(digits), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "r" / "serve.yaml").is_file()
