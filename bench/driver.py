"""`kiln bench`: latency of the eager fp32 baseline and every artifact in a folder, and the choice of a default.

The question users bring is "which format should I deploy?", so the numbers must be comparable:
every runtime gets the same input arrays, the same explicit thread count, and a fresh process of its
own (kiln.bench.worker), one after another; the machine (CPU model, the ISA flags that decide
INT8/BF16 speed) and library versions are recorded beside the figures. Accuracy and parity come from
the manifest, where the export measured them on held-out data, so speed and quality sit side by side.

Outputs are written atomically (temporary file, then rename) and only after every measurement has
succeeded, so a failed or interrupted run leaves the folder as it was. `--select` re-reads the
manifest and changes only `default_variant` (and records why in `selection`), via Manifest.save().
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.bench import select
from kiln.core.console import Progress, to_stderr
from kiln.core.console import format_table as align
from kiln.core.errors import BenchmarkError, KilnError, UsageError
from kiln.core.machine import ISA_FLAGS, default_threads, machine_info
from kiln.core.manifest import EAGER, Manifest, library_versions, read_manifest
from kiln.core.runtime import check_runnable, require_installed

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LEN = 128
CSV_COLUMNS = ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "items_per_s", "speedup_vs_eager", "bytes",
               "peak_rss_mb", "accuracy", "cosine_min", "batch_invariance")
OUTPUT_NAMES = ("bench.json", "bench.csv", "bench.png")
__all__ = ["CSV_COLUMNS", "EAGER", "ISA_FLAGS", "BenchSettings", "bench", "measure"]


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; checked on construction so bad values fail before any process starts."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seq_len: int = DEFAULT_SEQ_LEN  # used only for text models (preprocessing kind "text")
    threads: int | None = None  # None: the cores this process may run on
    warmup: int = 5
    min_iters: int = 5
    max_iters: int = 10_000
    max_seconds: float = 2.0
    variants: tuple[str, ...] | None = None  # None: every variant in the manifest

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise UsageError(f"batch sizes {list(self.batch_sizes)} must be positive integers; e.g. --batch-sizes 1,8,32")
        if self.seq_len < 1:
            raise UsageError(f"--seq-len {self.seq_len} must be a positive integer; e.g. --seq-len 128")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be a positive integer; e.g. --threads 2")
        if self.warmup < 0:
            raise UsageError(f"--warmup {self.warmup} must be 0 or more")
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise UsageError(f"--min-iters {self.min_iters} and --max-iters {self.max_iters} must satisfy "
                             "1 <= min <= max")
        if not self.max_seconds > 0:
            raise UsageError(f"--max-seconds {self.max_seconds} must be positive; e.g. --max-seconds 2")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`1,8,32` -> (1, 8, 32), sorted and deduplicated; anything else is a UsageError."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--batch-sizes {text!r} must be positive integers separated by commas; "
                             "e.g. --batch-sizes 1,8,32")
        sizes.append(int(part))
    return tuple(sorted(set(sizes)))


def parse_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--variants {text!r} names no variant; e.g. --variants onnx-fp32,onnx-int8")
    return names


def preflight(folder: Path, settings: BenchSettings, writing: bool) -> tuple[Manifest, list[str]]:
    """Every check that needs no measuring: manifest, variant names, hashes, runtimes, a writable folder."""
    manifest = read_manifest(folder)
    available = manifest.variant_names
    names = list(settings.variants) if settings.variants else available
    unknown = [n for n in names if n not in available]
    if EAGER in unknown:
        names = [n for n in names if n != EAGER]  # the baseline is always measured
        unknown.remove(EAGER)
    if unknown:
        raise UsageError(f"variant(s) {', '.join(unknown)} are not in {folder}; choose from {', '.join(available)}")
    for name in names:
        require_installed(manifest.variant(name).runtime, name)
    for name in names:
        check_runnable(manifest, name)
    if writing and not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(folder)!r} is not writable and bench writes bench.json there; "
                         "make it writable or bench a copy")
    return manifest, names


def _raise_worker_error(variant: str, result: dict | None, rc: int, log: Path, verbose: bool) -> None:
    from kiln.core import errors

    if result and "error_type" in result:
        cls = getattr(errors, result["error_type"], None)
        if isinstance(cls, type) and issubclass(cls, KilnError) and cls is not errors.VerificationError:
            raise cls(result["message"])
        raise BenchmarkError(result["message"])
    text = log.read_text(errors="replace") if log.exists() else ""
    if verbose and text:
        print(text, file=sys.stderr)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
    how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
    hint = "; it may have run out of memory" if rc == -9 else ""
    raise BenchmarkError(f"measuring {variant} failed ({how}: {last[:200]}){hint}; "
                      "re-run with --verbose for its log, or leave the variant out with --variants")


def _run_worker(config: dict, scratch: Path, on_cell: Callable[[dict], None], verbose: bool) -> dict:
    """One variant in a fresh interpreter; relays its per-cell lines; returns its result."""
    stem = config["variant"]
    config = {**config, "result": str(scratch / f"{stem}.result.json")}
    config_path = scratch / f"{stem}.config.json"
    config_path.write_text(json.dumps(config))
    log = scratch / f"{stem}.log"
    threads = str(config["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as log_handle:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.bench.worker", str(config_path)],
                                stdout=subprocess.PIPE, stderr=log_handle, text=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a library printing to stdout
                if isinstance(record, dict) and "batch_size" in record:
                    on_cell(record)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result_path = Path(config["result"])
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if rc != 0 or result is None or "error" in result:
        _raise_worker_error(stem, result, rc, log, verbose)
    return result


def _figures(manifest: Manifest, name: str) -> dict[str, Any]:
    if name == EAGER:
        return {"bytes": None, "accuracy": manifest.reference_accuracy, "cosine_min": 1.0, "format": "pytorch",
                "runtime": "torch-eager", "precision": "fp32", "pruning": None, "quantization": None,
                "batch_invariance": None}
    entry = manifest.variant(name)
    return {
        "bytes": entry.bytes,
        "accuracy": entry.accuracy,
        "cosine_min": entry.cosine_min,
        "format": entry.format,
        "runtime": entry.runtime,
        "precision": entry.precision,
        "pruning": entry.pruning_method,
        "quantization": entry.quantization_mode,
        # The worst cosine of an item alone vs inside a batch, measured at export; None for older exports.
        "batch_invariance": (entry.batch_invariance or {}).get("cosine_min"),
    }


def measure(folder: str | Path, settings: BenchSettings, progress: Progress = to_stderr, writing: bool = True,
            verbose: bool = False) -> dict[str, Any]:
    """Measure the baseline and the variants; return the report (nothing is written here)."""
    folder = Path(folder).absolute()
    manifest, names = preflight(folder, settings, writing)
    threads = settings.threads or default_threads()
    seq_len = settings.seq_len if manifest.is_text else None
    batch_sizes = sorted(settings.batch_sizes)
    order = [EAGER, *names]
    total = len(order) * len(batch_sizes)
    progress(f"[kiln] bench {manifest.model}: {len(order)} runtimes x batch sizes {batch_sizes}"
             f"{f', seq_len {seq_len}' if seq_len else ''}, {threads} thread(s), "
             f"up to {settings.max_seconds:g} s per cell")
    scratch = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    results: dict[str, dict] = {}
    eager_p50: dict[int, float] = {}
    done = 0
    try:
        base = {
            "folder": str(folder), "threads": threads, "batch_sizes": batch_sizes, "seq_len": seq_len,
            "inputs": str(scratch / "inputs.npz"), "warmup": settings.warmup, "min_iters": settings.min_iters,
            "max_iters": settings.max_iters, "max_seconds": settings.max_seconds,
        }
        for name in order:
            def on_cell(cell: dict, name: str = name) -> None:
                nonlocal done
                done += 1
                if name == EAGER:
                    eager_p50[cell["batch_size"]] = cell["p50_ms"]
                ratio = eager_p50.get(cell["batch_size"])
                speed = f", {ratio / cell['p50_ms']:.2f}x eager" if ratio else ""
                progress(f"[kiln] bench [{done}/{total}] {name} batch {cell['batch_size']}: "
                         f"p50 {cell['p50_ms']:.3f} ms, p99 {cell['p99_ms']:.3f} ms, "
                         f"{cell['items_per_s']:,.0f} items/s{speed} ({cell['iterations']} calls)")

            results[name] = _run_worker({**base, "variant": name}, scratch, on_cell, verbose)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    for name in order:
        figures = _figures(manifest, name)
        if name == EAGER:
            figures["bytes"] = results[name].get("module_bytes")
        for cell in results[name]["cells"]:
            baseline = eager_p50[cell["batch_size"]]
            rows.append({
                "variant": name,
                **cell,
                "speedup_vs_eager": baseline / cell["p50_ms"] if cell["p50_ms"] > 0 else None,
                **figures,
                "load_seconds": results[name]["load_seconds"],
            })
    return {
        "kiln_bench": 1,
        "model": manifest.model,
        "task": manifest.task,
        "folder": str(folder),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "default_variant": manifest.default_variant,
        "reference": manifest.reference,
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": {**asdict(settings), "batch_sizes": batch_sizes, "threads": threads, "seq_len": seq_len,
                     "variants": names},
        "hashes": {n: manifest.variant(n).sha256 for n in names},
        "results": rows,
    }


# --- outputs ------------------------------------------------------------------------------------------------


def _csv_value(column: str, value):
    if value is None:
        return ""
    if isinstance(value, float):
        digits = {"items_per_s": 1, "peak_rss_mb": 1, "speedup_vs_eager": 3}.get(column, 6 if column in
                                                                                  ("accuracy", "cosine_min",
                                                                                   "batch_invariance") else 4)
        return f"{value:.{digits}f}"
    return value


def _stage(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    return Path(tmp)


def stage_outputs(folder: Path, report: dict, scatter_batch: int) -> list[tuple[Path, Path]]:
    """Write bench.json/csv/png beside their targets; return (temporary, final) pairs to rename."""
    from kiln.bench import plot

    staged: list[tuple[Path, Path]] = []
    try:
        for name in OUTPUT_NAMES:
            staged.append((_stage(folder, name), folder / name))
        json_tmp, csv_tmp, png_tmp = (tmp for tmp, _ in staged)
        json_tmp.write_text(json.dumps(report, indent=2) + "\n")
        with open(csv_tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in report["results"]:
                writer.writerow([_csv_value(c, row.get(c)) for c in CSV_COLUMNS])
        plot.plot(report, png_tmp, scatter_batch)
        for tmp, _ in staged:
            tmp.chmod(0o644)
    except BaseException:
        discard(staged)
        raise
    return staged


def discard(staged: list[tuple[Path, Path]]) -> None:
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


def commit(staged: list[tuple[Path, Path]]) -> None:
    for tmp, final in staged:
        os.replace(tmp, final)


def format_table(report: dict[str, Any]) -> str:
    default = report.get("selection", {}).get("default_variant", report["default_variant"])
    rows = [("variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs eager", "MB", "peak RSS MB",
             "accuracy", "cosine_min", "batch inv.")]
    for r in report["results"]:
        rows.append((
            r["variant"] + (" *" if r["variant"] == default else ""),
            str(r["batch_size"]),
            f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
            f"{r['items_per_s']:,.0f}",
            f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-",
            f"{r['bytes'] / 1e6:.2f}" if r["bytes"] is not None else "-",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-",
            f"{r['cosine_min']:.5f}" if r["cosine_min"] is not None else "-",
            f"{r['batch_invariance']:.6f}" if r.get("batch_invariance") is not None else "-",
        ))
    return align(rows)


def bench(folder: str | Path, settings: BenchSettings | None = None, *, select_default: bool = False,
          max_accuracy_drop: float | None = None, min_cosine: float | None = None,
          select_batch_size: int | None = None, progress: Progress = to_stderr,
          verbose: bool = False, min_batch_invariance: float | None = None) -> dict[str, Any]:
    """Measure, then write bench.json/csv/png (and, with `select_default`, the new default) in one go.

    Every budget is checked before anything is measured; outputs are staged beside their targets and renamed
    only after every measurement succeeded, so a failed or interrupted run leaves the folder as it was.
    """
    settings = settings or BenchSettings()
    if not select_default and (max_accuracy_drop is not None or min_cosine is not None
                               or select_batch_size is not None or min_batch_invariance is not None):
        raise UsageError("--max-accuracy-drop, --min-cosine, --min-batch-invariance and --select-batch-size only "
                         "apply with --select; add --select")
    if min_batch_invariance is not None and not -1.0 <= min_batch_invariance <= 1.0:
        raise UsageError(f"--min-batch-invariance {min_batch_invariance} is a cosine and must lie in [-1, 1]; "
                         "e.g. 0.999")
    if max_accuracy_drop is not None and not 0.0 <= max_accuracy_drop <= 100.0:
        raise UsageError(f"--max-accuracy-drop {max_accuracy_drop} is in percentage points and must lie in "
                         "[0, 100]; e.g. 0.5")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise UsageError(f"--min-cosine {min_cosine} must lie in [-1, 1]; e.g. 0.99")
    select_batch = select_batch_size if select_batch_size is not None else select.DEFAULT_SELECT_BATCH_SIZE
    if select_batch < 1:
        raise UsageError(f"--select-batch-size {select_batch} must be a positive integer; e.g. 16")
    if select_default and select_batch not in settings.batch_sizes:
        settings = BenchSettings(**{**asdict(settings), "batch_sizes": tuple(sorted({*settings.batch_sizes,
                                                                                     select_batch}))})
    if select_default and max_accuracy_drop is not None:
        manifest = read_manifest(folder)
        if manifest.reference_accuracy is None:
            raise UsageError(f"{manifest.model!r} ({manifest.task}) has no accuracy figure, so --max-accuracy-drop "
                             "does not apply; give a budget with --min-cosine, e.g. 0.99")
    report = measure(folder, settings, progress, verbose=verbose)
    folder = Path(report["folder"])
    scatter_batch = select_batch if select_default else max(report["settings"]["batch_sizes"])
    if select_default:
        report["selection"] = select.choose(read_manifest(folder), report, select_batch, max_accuracy_drop,
                                            min_cosine, min_batch_invariance)
    staged = stage_outputs(folder, report, scatter_batch)
    try:
        if select_default:
            select.apply_selection(folder, report["selection"], report["hashes"])
        commit(staged)
    finally:
        discard(staged)
    return report


def summary(report: dict[str, Any]) -> str:
    """What `kiln bench` prints: the machine, the table, the selection and the files written."""
    settings = report["settings"]
    lines = [f"{report['model']} on {report['machine']['cpu_model']}, {settings['threads']} thread(s)"
             + (f", seq_len {settings['seq_len']}" if settings["seq_len"] else "")
             + "  (* = default variant; vs eager = eager p50 / p50)",
             format_table(report)]
    selection = report.get("selection")
    if selection:
        lines.append(f"select: {selection['reason']}")
        if selection["chosen"] is not None:
            lines.append(f"default variant is now {selection['default_variant']} (kiln serve loads it)")
        else:
            lines.append(f"default variant stays {selection['default_variant']}")
    lines.append(f"wrote {', '.join(str(Path(report['folder']) / n) for n in OUTPUT_NAMES)}")
    return "\n".join(lines)
