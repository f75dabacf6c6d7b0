"""`kiln bench` for real on the exported digits artifacts, with tiny iteration counts (no timing assertions).

Each measuring run spawns a fresh process per variant, so the runs are few and share the session's
exported folder (copied before anything mutates it).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_kiln

from kiln.bench.driver import CSV_COLUMNS, EAGER, ISA_FLAGS
from kiln.core.manifest import read_manifest

pytestmark = pytest.mark.slow  # real exports and `kiln` subprocesses

TINY = ("--max-seconds", "0.2", "--warmup", "1", "--min-iters", "2")
# Tiny rounds on a shared CI machine are often unstable; these tests check the choice itself, so they accept it.
# The instability flag has its own test below (a real CPU hog during one round).
SELECT = ("--select", "--accept-unstable")
NON_NUMERIC = ("variant", "stable", "precision", "emulated")
ROW_FIELDS = (*CSV_COLUMNS, "mean_ms", "min_ms", "iterations", "format", "runtime", "precision", "load_seconds")


def _entries(manifest) -> dict[str, dict]:
    """The manifest's variant entries as written in manifest.json, by name."""
    return {v.name: v.to_dict() for v in manifest.variants}


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "digits"
    shutil.copytree(source, target)
    return target


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fits(entry: dict, reference: float, drop: float | None, min_cosine: float | None) -> bool:
    if drop is not None and entry["accuracy"] < reference - drop / 100.0 - 1e-9:
        return False
    return min_cosine is None or entry["cosine_min"] >= min_cosine


@pytest.fixture(scope="module")
def benched(digits_artifacts, tmp_path_factory) -> dict:
    """One full run with --select on a copy: every variant, two batch sizes, both budgets."""
    folder = _copy(digits_artifacts, tmp_path_factory.mktemp("bench"))
    before = read_manifest(folder)
    result = run_kiln("bench", str(folder), "--batch-sizes", "1,2", *TINY, "--threads", "1",
                      *SELECT, "--max-accuracy-drop", "0.5", "--min-cosine", "0.9995", "--select-batch-size", "2")
    assert result.returncode == 0, result.stderr
    return {"folder": folder, "before": before, "result": result,
            "report": json.loads((folder / "bench.json").read_text())}


def test_json_has_every_variant_and_batch_with_all_fields(benched):
    report, before = benched["report"], benched["before"]
    rows = report["results"]
    expected = {(name, batch) for name in [EAGER, *before.variant_names] for batch in (1, 2)}
    assert {(r["variant"], r["batch_size"]) for r in rows} == expected
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, (row["variant"], missing)
        assert row["p50_ms"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["items_per_s"] > 0 and row["iterations"] >= 2 and row["peak_rss_mb"] > 0
        assert row["bytes"] > 0 and row["accuracy"] is not None and row["cosine_min"] is not None
        if row["variant"] == EAGER:
            assert row["speedup_vs_eager"] == pytest.approx(1.0)
            assert row["accuracy"] == before.reference_accuracy
        else:
            entry = _entries(before)[row["variant"]]
            variant = before.variant(row["variant"])  # every file of it: an OpenVINO IR is .xml + .bin
            assert (row["bytes"], row["accuracy"], row["cosine_min"]) == (
                variant.total_bytes, entry["accuracy"], entry["cosine_min"])
    assert report["settings"]["threads"] == 1 and report["settings"]["batch_sizes"] == [1, 2]
    assert report["settings"]["seq_len"] is None  # digits is not a text model
    assert report["machine"]["cpu_model"] and set(report["machine"]["isa"]) == set(ISA_FLAGS)
    assert report["versions"]["torch"] and report["versions"]["onnxruntime"]
    # The progress display: one line per measured cell and round, and a table on stdout.
    stderr_cells = [line for line in benched["result"].stderr.splitlines() if line.startswith("[kiln] bench [")]
    assert len(stderr_cells) == len(expected) * report["settings"]["rounds"]
    assert all(r["rounds"] == report["settings"]["rounds"] for r in rows)
    assert all(name in benched["result"].stdout for name, _ in expected)


def test_csv_and_png_are_valid(benched):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    folder = benched["folder"]
    with open(folder / "bench.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(benched["report"]["results"])
    for row in rows:
        assert int(row["batch_size"]) in (1, 2)
        for column in CSV_COLUMNS[2:]:
            if column in NON_NUMERIC or (column == "batch_invariance" and row["variant"] == EAGER):
                continue
            float(row[column])  # every figure present and numeric for digits
        assert row["stable"] in ("true", "false") and row["precision"] in ("fp32", "bf16", "int8")
    assert {r["variant"] for r in rows if float(r["speedup_vs_eager"]) == 1.0} >= {EAGER}
    png = folder / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_select_picks_the_fastest_within_budget_and_keeps_the_manifest_valid(benched):
    folder, before, report = benched["folder"], benched["before"], benched["report"]
    after = read_manifest(folder)  # still valid for a server
    selection = after.selection
    assert selection == report["selection"]
    reference = before.reference_accuracy
    chosen = selection["chosen"]
    assert chosen is not None and after.default_variant == chosen
    assert _fits(_entries(before)[chosen], reference, 0.5, 0.9995)
    p50 = selection["measured_p50_ms"]
    assert set(p50) == {EAGER, *before.variant_names}
    for name, entry in _entries(before).items():
        if p50[name] < p50[chosen]:
            assert not _fits(entry, reference, 0.5, 0.9995), f"{name} was faster and within budget"
        assert (name in selection["rejected"]) == (not _fits(entry, reference, 0.5, 0.9995))
    assert selection["batch_size"] == 2 and selection["budget"]["min_cosine"] == 0.9995
    # Only default_variant and selection changed; every artifact entry is untouched.
    assert after.to_dict()["variants"] == before.to_dict()["variants"]
    assert {k: v for k, v in after.to_dict().items() if k not in ("default_variant", "selection")} == \
        {k: v for k, v in before.to_dict().items() if k not in ("default_variant", "selection")}
    assert (folder / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_select_keeps_the_fp32_default_when_nothing_fits(digits_artifacts, tmp_path):
    folder = _copy(digits_artifacts, tmp_path)
    before = read_manifest(folder)
    # Both INT8 variants sit below a 0.9999 cosine floor (the export holds INT8 only to 0.99).
    int8 = [n for n, e in _entries(before).items() if e["precision"] == "int8"]
    assert int8 and all(_entries(before)[n]["cosine_min"] < 0.9999 for n in int8)
    result = run_kiln("bench", str(folder), "--variants", ",".join(int8), "--batch-sizes", "1", *TINY,
                      "--threads", "1", *SELECT, "--min-cosine", "0.9999", "--select-batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert "no measured variant fits the budget" in result.stdout
    after = read_manifest(folder)
    assert after.default_variant == before.default_variant == "onnx-fp32"
    assert after.selection["chosen"] is None
    assert set(after.selection["rejected"]) == set(int8)
    report = json.loads((folder / "bench.json").read_text())
    assert {r["variant"] for r in report["results"]} == {EAGER, *int8}


def test_export_select_sets_the_default(tmp_path):
    out = tmp_path / "digits"
    result = run_kiln("export", "digits", "--out", str(out), "--variants", "onnx-fp32,onnx-int8", *SELECT,
                      "--max-accuracy-drop", "1.0")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    selection = manifest.selection
    assert selection["chosen"] in ("onnx-fp32", "onnx-int8") and manifest.default_variant == selection["chosen"]
    assert set(selection["measured_p50_ms"]) == {EAGER, "onnx-fp32", "onnx-int8"}
    assert selection["batch_size"] == 16 and selection["budget"]["max_accuracy_drop"] == 1.0
    assert f"{selection['chosen']} *" in result.stdout  # the export report marks the new default


def test_a_cpu_hog_during_one_round_is_flagged_and_select_refuses(digits_artifacts, tmp_path):
    """Two busy-looping processes run during round 2 only (started and stopped on the bench's own progress lines):
    the run must be marked unstable, name the cause, and `--select` must refuse (exit 4) leaving the manifest as it
    was, while bench.json records the unstable run."""
    import os
    import signal
    import subprocess
    import sys

    folder = _copy(digits_artifacts, tmp_path)
    before = (folder / "manifest.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent / "fixtures")}
    bench = subprocess.Popen(
        [sys.executable, "-m", "kiln", "bench", str(folder), "--variants", "onnx-fp32", "--batch-sizes", "8",
         "--rounds", "3", "--max-seconds", "0.6", "--threads", "2", "--select"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    hogs: list[subprocess.Popen] = []
    stderr_lines = []
    try:
        assert bench.stderr is not None
        for line in bench.stderr:
            stderr_lines.append(line)
            if "round 2" in line and not hogs:
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
            if "round 3" in line and hogs:
                for hog in hogs:
                    hog.send_signal(signal.SIGKILL)
                    hog.wait()
        stdout = bench.stdout.read() if bench.stdout else ""
        code = bench.wait(300)
    finally:
        for hog in hogs:
            hog.kill()
        bench.kill()
    assert code == 4, "".join(stderr_lines)[-3000:]
    assert stderr_lines[-1].startswith("UnstableMeasurement:") and "--accept-unstable" in stderr_lines[-1]
    assert "unstable:" in stdout and "another process was using the cores" in stdout
    report = json.loads((folder / "bench.json").read_text())
    assert report["stable"] is False and "selection" not in report
    assert any(not r["stable"] and r["unstable_reasons"] for r in report["results"])
    assert (folder / "manifest.json").read_bytes() == before


# --- bad input: one line, non-zero exit, folder untouched --------------------------------------------------


def _assert_one_line_error(result, name: str, code: int) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), result.stderr
    assert "; " in lines[0] and "Traceback" not in result.stderr


def test_folder_without_manifest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    result = run_kiln("bench", str(tmp_path), *TINY)
    _assert_one_line_error(result, "ManifestError", 1)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    _assert_one_line_error(run_kiln("bench", str(tmp_path / "absent"), *TINY), "ManifestError", 1)


def test_hash_mismatch(digits_artifacts, tmp_path):
    folder = _copy(digits_artifacts, tmp_path)
    with open(folder / "onnx-int8.onnx", "ab") as handle:
        handle.write(b"\0")
    before = _snapshot(folder)
    result = run_kiln("bench", str(folder), *TINY, "--select")
    _assert_one_line_error(result, "IntegrityError", 1)
    assert "onnx-int8" in result.stderr
    assert _snapshot(folder) == before


def test_variant_whose_runtime_is_not_available(digits_artifacts, tmp_path):
    folder = _copy(digits_artifacts, tmp_path)
    manifest = read_manifest(folder)
    for entry in manifest.variants:
        if entry.name == "onnx-int8":
            entry.runtime = "tensorrt"  # as written by a kiln that supports more runtimes
    manifest.save()
    before = _snapshot(folder)
    result = run_kiln("bench", str(folder), *TINY)
    _assert_one_line_error(result, "RuntimeUnavailable", 1)
    assert "onnx-int8" in result.stderr and "--variants" in result.stderr
    assert _snapshot(folder) == before


@pytest.mark.parametrize("sizes", ["0", "1,-2", "a", "1.5", "", "4,,8", " "])
def test_batch_sizes_must_be_positive_integers(digits_artifacts, sizes):
    before = _snapshot(digits_artifacts)
    result = run_kiln("bench", str(digits_artifacts), "--batch-sizes", sizes, *TINY)
    _assert_one_line_error(result, "UsageError", 2)
    assert _snapshot(digits_artifacts) == before


@pytest.mark.parametrize("args", [
    ("--variants", "onnx-fp64"),
    ("--min-cosine", "0.99"),  # a budget without --select
    ("--select", "--max-accuracy-drop", "150"),
    ("--threads", "0"),
    ("--max-seconds", "0"),
    ("--select", "--select-batch-size", "0"),
])
def test_other_usage_errors(digits_artifacts, args):
    before = _snapshot(digits_artifacts)
    result = run_kiln("bench", str(digits_artifacts), *TINY, *args)
    _assert_one_line_error(result, "UsageError", 2)
    assert _snapshot(digits_artifacts) == before
