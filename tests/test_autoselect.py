"""`--variant auto` in process: it measures here and caches, reuses the cache on the same machine, re-measures on
another, never picks a precision this CPU emulates (flags injected through the probe, the runtimes real), ignores a
corrupt cache, and falls back to fp32 when nothing fits the recorded budget."""

import json
import shutil

import pytest

import kiln
from kiln.core.autoselect import CACHE_NAME, auto_variant
from kiln.core.machine import machine_info
from kiln.core.manifest import fp32_default, read_manifest

pytestmark = pytest.mark.slow  # uses the session's exported digits artifacts


@pytest.fixture()
def folder(digits_artifacts, tmp_path):
    target = tmp_path / "digits"
    shutil.copytree(digits_artifacts, target)
    return target


def _machine(model: str, **isa: bool) -> dict:
    here = machine_info()
    return {**here, "cpu_model": model, "isa": {flag: False for flag in here["isa"]} | isa}


AMX = {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": True, "amx_tile": True, "amx_int8": True,
       "amx_bf16": True}


def test_measures_here_caches_and_reuses(folder):
    manifest_before = (folder / "manifest.json").read_bytes()
    first = auto_variant(folder, threads=1, seconds=0.05, probe=lambda: _machine("Test AMX", **AMX))
    assert first.how == "chosen" and first.variant in read_manifest(folder).variant_names
    assert set(first.measured_p50_ms) and "measured here" in first.reason
    cache = json.loads((folder / CACHE_NAME).read_text())
    assert first.fingerprint in cache["machines"]
    second = auto_variant(folder, threads=1, seconds=0.05, probe=lambda: _machine("Test AMX", **AMX))
    assert second.how == "cached" and second.variant == first.variant
    assert (folder / "manifest.json").read_bytes() == manifest_before  # the manifest and its hashes are untouched
    read_manifest(folder).verify_file()
    other = auto_variant(folder, threads=1, seconds=0.05, probe=lambda: _machine("Another CPU", **AMX))
    assert other.how == "chosen" and other.fingerprint != first.fingerprint
    assert set(json.loads((folder / CACHE_NAME).read_text())["machines"]) == {first.fingerprint, other.fingerprint}


def test_never_picks_a_precision_this_cpu_emulates(folder):
    choice = auto_variant(folder, threads=1, seconds=0.05, use_cache=False,
                          probe=lambda: _machine("AVX2 only", avx2=True))
    bf16 = [v.name for v in read_manifest(folder).variants if v.precision == "bf16"]
    assert bf16 and choice.variant not in bf16
    for name in bf16:
        assert "emulated" in choice.rejected[name] and name not in choice.measured_p50_ms


def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(folder):
    (folder / CACHE_NAME).write_text("{ not json")
    choice = auto_variant(folder, threads=1, seconds=0.05, probe=lambda: _machine("Test AMX", **AMX))
    assert choice.how == "chosen"
    data = json.loads((folder / CACHE_NAME).read_text())
    data["machines"][choice.fingerprint]["choice"]["variant"] = "not-a-variant"  # foreign: names no variant here
    (folder / CACHE_NAME).write_text(json.dumps(data))
    assert auto_variant(folder, threads=1, seconds=0.05, probe=lambda: _machine("Test AMX", **AMX)).how == "chosen"


def test_a_budget_nothing_meets_falls_back_to_fp32_with_the_reason(folder):
    manifest = read_manifest(folder)
    manifest.selection = {"budget": {"min_cosine": 1.5}}  # a cosine no variant can reach
    manifest.save()
    choice = auto_variant(folder, threads=1, seconds=0.05, use_cache=False, probe=lambda: _machine("X", **AMX))
    assert choice.how == "fallback" and choice.variant == "onnx-fp32" and "fp32 default" in choice.reason


def test_kiln_load_auto(folder):
    runtime = kiln.load(folder, "auto", threads=1)
    assert runtime.variant in read_manifest(folder).variant_names


def test_served_variant_and_why_are_reported(folder):
    """`kiln serve --variant auto` says which variant it serves and why: in /v2/models/{name} parameters, in
    kiln_info on /metrics and in its start-up line; a second start reuses the cached choice."""
    import httpx
    from server_process import ServerProcess

    for expected_how in (("chosen", "fallback"), ("cached",)):
        server = ServerProcess(folder, "--variant", "auto", "--threads", "1").wait_ready(180)
        try:
            meta = httpx.get(f"{server.url}/v2/models/digits", timeout=10).json()
            parameters = meta["parameters"]
            assert parameters["how"] in expected_how and parameters["variant"] in read_manifest(folder).variant_names
            assert parameters["reason"]
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert f'kiln_info{{how="{parameters["how"]}",model="digits",variant="{parameters["variant"]}",version="1"}} 1' \
                in metrics
        finally:
            server.stop()
        assert "--variant auto" in server.log_path.read_text()
    forced = ServerProcess(folder, "--variant", "onnx-fp32", "--threads", "1").wait_ready(180)
    try:
        parameters = httpx.get(f"{forced.url}/v2/models/digits", timeout=10).json()["parameters"]
        assert parameters == {"variant": "onnx-fp32", "how": "forced", "reason": "named with --variant"}
    finally:
        forced.stop()


def test_serve_rechooses_a_default_chosen_on_another_machine_and_load_warns(folder):
    from kiln.core.autoselect import served_variant

    here = machine_info()
    manifest = read_manifest(folder)
    manifest.selection = {"chosen": manifest.default_variant, "default_variant": manifest.default_variant,
                          "reason": "chosen elsewhere",
                          "machine": _machine("Another CPU", **{f: not v for f, v in here["isa"].items()})}
    manifest.save()
    manifest = read_manifest(folder)
    warned = served_variant(folder, manifest, None, threads=1)  # kiln.load's way: served, with a warning
    assert warned.how == "default" and warned.auto is None and "differ in" in warned.warning
    rechosen = served_variant(folder, manifest, None, threads=1, batch_sizes=(1,), rechoose=True)  # kiln serve's
    assert rechosen.auto is not None and rechosen.how in ("chosen", "fallback")
    assert rechosen.reason.startswith("re-chosen on this machine (the default variant was chosen on Another CPU")
    told = served_variant(folder, manifest, "default", threads=1, rechoose=True)  # `kiln serve --variant default`
    assert told.how == "default" and told.entry.name == manifest.default_variant and told.warning


def test_export_selection_chooses_here_or_keeps_fp32_and_says_why(folder, monkeypatch):
    """The selection that ends `kiln export`: bounded, recorded with the machine; when it fails, the fp32 default
    stays, the manifest says why, and nothing is raised."""
    from kiln.bench import driver
    from kiln.core.errors import UnstableMeasurement
    from kiln.export.recipe import Recipe

    recipe = Recipe(variants=tuple(read_manifest(folder).variant_names))
    kiln.select_at_export(folder, recipe, lambda message: None, strict=False)
    selection = read_manifest(folder).selection
    assert selection["machine"]["fingerprint"] and read_manifest(folder).default_variant == selection["default_variant"]
    if selection["chosen"]:  # measured steadily enough here: chosen by the budget kiln bench --select uses
        assert selection["budget"]["max_accuracy_drop"] == 0.5
    else:  # digits' cells are tens of microseconds: on a busy machine the rounds may disagree
        assert "kept the fp32 default" in selection["reason"]

    def unstable(*args, **kwargs):
        raise UnstableMeasurement("the rounds disagree")

    monkeypatch.setattr(driver, "select_default", unstable)
    said = []
    kiln.select_at_export(folder, recipe, said.append, strict=False)
    manifest = read_manifest(folder)
    assert said[0] == "[kiln] select: the measurement was unstable; measuring once more"
    assert manifest.selection["chosen"] is None and "UnstableMeasurement twice: the rounds disagree" in said[1]
    assert manifest.default_variant == manifest.selection["default_variant"] == fp32_default(manifest.variants)
    assert manifest.selection["machine"]["fingerprint"]
    with pytest.raises(UnstableMeasurement):
        kiln.select_at_export(folder, recipe, said.append, strict=True)
