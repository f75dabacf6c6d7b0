"""`--variant auto`: choose the variant to serve on the machine that serves it, not the one that exported it.

A default chosen on an AMX machine may be a bf16 variant that an AVX2 machine only emulates, 30-50x slower. So the
server (and `kiln.load(folder, "auto")`) re-chooses here: a short, bounded measurement of the candidates that held
the export's budget, at the served batch sizes, under the budget the manifest records, by the same policy as
`--select` (kiln.core.selection). A precision this CPU only emulates is never a candidate.

The choice is cached in `auto-variant.json` beside the manifest, keyed by the machine's fingerprint and the
manifest's own hash: the manifest and its artifacts stay untouched, a matching machine reuses the choice, another
one re-measures, and a corrupt or foreign cache is ignored and rewritten. A read-only folder (a mounted volume)
gets its cache under $XDG_CACHE_HOME/kiln instead.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.bench_row import BenchRow
from kiln.core.errors import KilnError, one_line
from kiln.core.machine import bf16_native, fingerprint, machine_info, speed_mismatch
from kiln.core.manifest import MANIFEST_NAME, Manifest, VariantEntry, fp32_default, read_manifest, write_json_atomic
from kiln.core.paths import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, read_capped, read_json
from kiln.core.runtime import Runtime, RuntimeOptions, check_runnable, module_installed, needs_torch, open_artifact
from kiln.core.selection import choose

CACHE_NAME = "auto-variant.json"
CACHE_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 8)
SECONDS_PER_CELL = 0.25
# Text to measure text models on: varied lengths, as served traffic is (the manifest's tokenizer encodes them).
SAMPLE_TEXTS = (
    "The cat sat on the mat.",
    "Interest rates rose again this quarter, and the markets took it calmly.",
    "A short one.",
    "Deploying a model means measuring it on the machine that will serve it, not the one that built it.",
    "Ünïcödé, emoji 🙂 and 中文 travel through the same tokenizer.",
    "Why did the export choose this variant?",
    "Latency, throughput and accuracy are three different questions with three different answers.",
    "ok",
)


@dataclass
class AutoChoice:
    """What `--variant auto` serves and why: `chosen` (measured now), `cached`, or `fallback`."""

    variant: str
    how: str
    reason: str
    fingerprint: str
    measured_p50_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class ServedVariant:
    """Which variant a folder is served with and why: `how` is default, forced (named), or `--variant auto`'s
    chosen, cached or fallback; `warning` names a default chosen on a machine whose speed flags differ."""

    entry: VariantEntry
    how: str
    reason: str
    warning: str | None = None
    auto: AutoChoice | None = None

    @property
    def parameters(self) -> dict[str, str]:
        """What a front end reports about it (V2 model metadata `parameters`): variant, how and reason."""
        return {"variant": self.entry.name, "how": self.how, "reason": self.reason}


def served_variant(folder: str | Path, manifest: Manifest, variant: str | None, threads: int | None = None,
                   batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, rechoose: bool = False) -> ServedVariant:
    """The one rule for what `kiln.load` and `kiln serve` run: a named variant, `auto` (chosen on this machine,
    cached, or the fp32 fallback), or the manifest's default. With `rechoose` (kiln serve), a default chosen on a
    machine whose speed-deciding ISA flags differ from this one's is chosen again here, as `auto` chooses; without
    it (kiln.load), or with `variant="default"`, it is served with a warning."""
    if variant == "default":  # the recorded default, as told: served with a warning where the machine differs
        variant, rechoose = None, False
    selection = manifest.selection or {}
    mismatch = None if variant else speed_mismatch(selection.get("machine"))
    default = manifest.variant(None)
    # A default this install cannot load (it needs torch, and this is the serve-only install): re-chosen among
    # the variants that load here, as the Docker image must serve the fastest it can load.
    unloadable = not variant and needs_torch(default) and not module_installed("torch")
    if variant == "auto" or (rechoose and (mismatch or unloadable)):
        choice = auto_variant(folder, threads, batch_sizes, manifest=manifest)
        reason = choice.reason
        if mismatch and not variant:
            reason = f"re-chosen on this machine ({mismatch.split(':')[0]}): {reason}"
        elif unloadable:
            reason = f"re-chosen: the default {default.name} needs torch, which this install lacks: {reason}"
        return ServedVariant(manifest.variant(choice.variant), choice.how, reason, auto=choice)
    if variant:
        return ServedVariant(manifest.variant(variant), "forced", "named with --variant")
    return ServedVariant(manifest.variant(None), "default",
                         selection.get("reason") or "the export's fp32 default (no selection was run)", mismatch)


def manifest_digest(folder: Path) -> str:
    return hashlib.sha256(read_capped(folder / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")).hexdigest()


def cache_paths(folder: Path) -> list[Path]:
    """Beside the manifest first; a per-user cache where the folder is not writable (a read-only mount)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln"
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / CACHE_NAME, home / f"auto-variant-{key}.json"]


def read_cache(folder: Path, machine_key: str, digest: str) -> AutoChoice | None:
    """A cached choice for this machine and this manifest; anything else (corrupt, foreign, stale) is ignored."""
    for path in cache_paths(folder):
        try:
            data = read_json(path, MAX_CONFIG_BYTES, "cached choice")
            entry = data["machines"][machine_key]
            if data.get("version") != CACHE_VERSION or entry["manifest_sha256"] != digest:
                continue
            choice = AutoChoice(**entry["choice"])
        except (KilnError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(choice.variant, str) and choice.variant:
            return choice
    return None


def write_cache(folder: Path, choice: AutoChoice, digest: str) -> Path | None:
    for path in cache_paths(folder):
        try:
            existing = read_json(path, MAX_CONFIG_BYTES, "cached choice") if path.exists() else {}
            machines = existing.get("machines", {}) if isinstance(existing, dict) else {}
            if not isinstance(machines, dict) or existing.get("version") != CACHE_VERSION:
                machines = {}
        except KilnError:
            machines = {}
        machines[choice.fingerprint] = {"manifest_sha256": digest, "choice": asdict(choice),
                                        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"version": CACHE_VERSION, "machines": machines})
            return path
        except OSError:
            continue
    return None


def sample_inputs(manifest: Manifest, batch_sizes: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    """The inputs every candidate is measured on, by batch size (the tokenizer loaded once)."""
    from kiln.core.preprocessing import text_preprocessor
    from kiln.core.signature import generated_arrays

    preprocess = text_preprocessor(manifest)
    if preprocess is not None:
        return {b: preprocess([SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(b)]) for b in batch_sizes}
    return {b: generated_arrays(manifest.signature, b) for b in batch_sizes}


def candidates(manifest: Manifest, machine: dict[str, Any]) -> tuple[list[VariantEntry], dict[str, str]]:
    """The variants this machine can run well; the others with the reason they are left out."""
    keep, left_out = [], {}
    for entry in manifest.variants:
        if entry.precision == "bf16" and not bf16_native(machine):
            left_out[entry.name] = "bf16 is emulated on this CPU (no AVX-512 BF16 or AMX)"
            continue
        try:
            check_runnable(manifest, entry.name)
        except KilnError as exc:
            left_out[entry.name] = one_line(exc, 200)
            continue
        keep.append(entry)
    return keep, left_out


def _p50(runtime: Runtime, inputs: dict[str, np.ndarray], seconds: float) -> float:
    runtime.run(inputs)
    runtime.run(inputs)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        runtime.run(inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def _measure(manifest: Manifest, entry: VariantEntry, threads: int | None,
             inputs: dict[int, dict[str, np.ndarray]], seconds: float) -> dict[str, float]:
    runtime = open_artifact(manifest.path_of(entry), entry.runtime, manifest.signature, entry.name,
                            RuntimeOptions(threads))
    return {str(b): _p50(runtime, arrays, seconds) for b, arrays in inputs.items()}


def measure_and_choose(folder: Path, manifest: Manifest, machine: dict[str, Any], threads: int | None,
                       batch_sizes: tuple[int, ...], seconds: float) -> AutoChoice:
    started = time.perf_counter()
    machine_key = machine.get("fingerprint") or fingerprint(machine)
    keep, left_out = candidates(manifest, machine)
    inputs = sample_inputs(manifest, batch_sizes)
    rows, measured = [], {}
    for entry in keep:
        try:  # one runtime at a time: each is dropped before the next loads
            cells = _measure(manifest, entry, threads, inputs, seconds)
        except Exception as exc:  # a variant that cannot run here is left out, with the reason
            left_out[entry.name] = f"failed here: {one_line(exc, 160)}"
            continue
        measured[entry.name] = cells
        rows.append(BenchRow(entry.name, max(batch_sizes), p50_ms=cells[str(max(batch_sizes))],
                             accuracy=entry.accuracy, cosine_min=entry.cosine_min,
                             batch_invariance=(entry.batch_invariance or {}).get("cosine_min")).to_record())
    budget = (manifest.selection or {}).get("budget", {})
    report = {"results": rows, "settings": {"threads": threads}, "machine": machine}
    selection = choose(manifest, report, max(batch_sizes), budget.get("max_accuracy_drop"), budget.get("min_cosine"),
                       budget.get("min_batch_invariance")) if rows else None
    elapsed = round(time.perf_counter() - started, 2)
    if selection and selection["chosen"]:
        reason = (f"measured here: {selection['reason']}"
                  + (f"; left out: {', '.join(sorted(left_out))}" if left_out else ""))
        return AutoChoice(selection["chosen"], "chosen", reason, machine_key, measured,
                          {**left_out, **selection["rejected"]}, elapsed)
    fallback = fp32_default([e for e in manifest.variants if e.name not in left_out]) or manifest.default_variant
    why = selection["reason"] if selection else "no variant could be measured here"
    return AutoChoice(fallback, "fallback", f"{why}; serving the fp32 default {fallback}", machine_key, measured,
                      {**left_out, **(selection["rejected"] if selection else {})}, elapsed)


def auto_variant(folder: str | Path, threads: int | None = None, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 seconds: float = SECONDS_PER_CELL, probe: Callable[[], dict[str, Any]] = machine_info,
                 use_cache: bool = True, manifest: Manifest | None = None) -> AutoChoice:
    """The variant to serve on this machine: cached if this machine already chose for this manifest, else measured.

    `probe` describes the machine (CPU model, ISA flags); tests inject another machine's flags through it.
    `manifest`: the folder's, where the caller has read it already.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    machine = probe()
    machine_key = fingerprint(machine)
    machine = {**machine, "fingerprint": machine_key}
    digest = manifest_digest(folder)
    if use_cache:
        cached = read_cache(folder, machine_key, digest)
        if cached is not None and cached.variant in manifest.variant_names:
            cached.how = "cached"
            return cached
    choice = measure_and_choose(folder, manifest, machine, threads, tuple(sorted(set(batch_sizes))), seconds)
    if use_cache:
        write_cache(folder, choice, digest)
    return choice
