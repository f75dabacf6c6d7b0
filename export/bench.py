"""`kiln bench`: latency of the eager fp32 baseline and every artifact in a folder, and the choice of a default.

The question users bring is "which format should I deploy?", so the numbers must be comparable:
every runtime gets the same input arrays, the same explicit thread count, and a fresh process of its
own (kiln.export.bench_worker), one after another; the machine (CPU model, the ISA flags that decide
INT8/BF16 speed) and library versions are recorded beside the figures. Accuracy and parity come from
the manifest, where the export measured them on held-out data, so speed and quality sit side by side.

Outputs are written atomically (temporary file, then rename) and only after every measurement has
succeeded, so a failed or interrupted run leaves the folder as it was. `--select` re-reads the
manifest and changes only `default_variant` (and records why in `selection`), via Manifest.save().
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kiln.export.manifest import fp32_default, library_versions
from kiln.models.errors import BenchmarkError, KilnError, ManifestError, RuntimeUnavailable, UsageError

EAGER = "eager-fp32"
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LEN = 128
DEFAULT_SELECT_BATCH_SIZE = 16
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points
DEFAULT_MIN_COSINE = 0.99
CSV_COLUMNS = ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "items_per_s", "speedup_vs_eager", "bytes",
               "peak_rss_mb", "accuracy", "cosine_min")
OUTPUT_NAMES = ("bench.json", "bench.csv", "bench.png")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# The module each runtime imports; checked before any measuring so a missing one fails fast.
RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "torchscript": "torch"}

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def machine_info() -> dict:
    """CPU model and the ISA flags that decide INT8/BF16 speed: figures mean little without them."""
    from kiln.export.runtime import default_threads

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {
        "cpu_model": model,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "logical_cpus": os.cpu_count(),
        "usable_cpus": default_threads(),
        "platform": platform.platform(),
    }


def preflight(folder: Path, settings: BenchSettings, writing: bool) -> tuple[object, list[str]]:
    """Every check that needs no measuring: manifest, variant names, hashes, runtimes, a writable folder."""
    from kiln.export.manifest import read_manifest

    manifest = read_manifest(folder)
    available = list(manifest.variants)
    names = list(settings.variants) if settings.variants else available
    unknown = [n for n in names if n not in available]
    if EAGER in unknown:
        names = [n for n in names if n != EAGER]  # the baseline is always measured
        unknown.remove(EAGER)
    if unknown:
        raise UsageError(f"variant(s) {', '.join(unknown)} are not in {folder}; choose from {', '.join(available)}")
    for name in names:
        runtime = manifest.variants[name]["runtime"]
        module = RUNTIME_MODULES.get(runtime)
        if module is None:
            raise RuntimeUnavailable(f"variant {name!r} needs runtime {runtime!r}, which this kiln does not support; "
                                     f"upgrade kiln, or leave it out with --variants")
        if importlib.util.find_spec(module) is None:
            raise RuntimeUnavailable(f"variant {name!r} needs {module}, which is not installed; "
                                     f"pip install {module}, or leave it out with --variants")
    for name in names:
        manifest.verify_file(name)
    if writing and not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(folder)!r} is not writable and bench writes bench.json there; "
                         "make it writable or bench a copy")
    return manifest, names


def _raise_worker_error(variant: str, result: dict | None, rc: int, log: Path, verbose: bool) -> None:
    from kiln.models import errors

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
        proc = subprocess.Popen([sys.executable, "-m", "kiln.export.bench_worker", str(config_path)],
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


def _figures(manifest, name: str) -> dict:
    if name == EAGER:
        reference = manifest.data.get("reference", {})
        return {"bytes": None, "accuracy": reference.get("accuracy"), "cosine_min": 1.0, "format": "pytorch",
                "runtime": "torch-eager", "precision": "fp32", "pruning": None, "quantization": None}
    entry = manifest.variants[name]
    return {
        "bytes": entry["bytes"],
        "accuracy": entry.get("accuracy"),
        "cosine_min": entry.get("cosine_min"),
        "format": entry["format"],
        "runtime": entry["runtime"],
        "precision": entry["precision"],
        "pruning": (entry.get("pruning") or {}).get("method"),
        "quantization": (entry.get("quantization") or {}).get("mode"),
    }


def measure(folder: str | Path, settings: BenchSettings, progress: Progress = _stderr, writing: bool = True,
            verbose: bool = False) -> dict:
    """Measure the baseline and the variants; return the report (nothing is written here)."""
    from kiln.export.runtime import default_threads

    folder = Path(folder).absolute()
    manifest, names = preflight(folder, settings, writing)
    threads = settings.threads or default_threads()
    text = (manifest.preprocessing or {}).get("kind") == "text"
    seq_len = settings.seq_len if text else None
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
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "default_variant": manifest.default_variant,
        "reference": manifest.data.get("reference", {}),
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": {**asdict(settings), "batch_sizes": batch_sizes, "threads": threads, "seq_len": seq_len,
                     "variants": names},
        "hashes": {n: manifest.variants[n]["sha256"] for n in names},
        "results": rows,
    }


# --- choosing a default -------------------------------------------------------------------------------------


def choose(manifest, report: dict, batch_size: int, max_accuracy_drop: float | None = None,
           min_cosine: float | None = None) -> dict:
    """The fastest measured variant whose manifest figures fit the budget, at `batch_size`.

    Classifiers (with a reference accuracy) are held to accuracy >= eager - drop; a min cosine is
    applied too when given. Other tasks are held to cosine_min >= min_cosine (default 0.99).
    """
    reference = manifest.data.get("reference", {}).get("accuracy")
    budget: dict = {}
    if reference is not None:
        budget["max_accuracy_drop"] = DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
        budget["min_accuracy"] = reference - budget["max_accuracy_drop"] / 100.0
    elif max_accuracy_drop is not None and min_cosine is None:
        raise UsageError(f"{manifest.model!r} ({manifest.task}) has no accuracy figure, so --max-accuracy-drop "
                         "does not apply; give a budget with --min-cosine, e.g. 0.99")
    if min_cosine is not None or reference is None:
        budget["min_cosine"] = DEFAULT_MIN_COSINE if min_cosine is None else min_cosine
    rows = {r["variant"]: r for r in report["results"] if r["batch_size"] == batch_size}
    if not rows:
        raise UsageError(f"batch size {batch_size} was not measured; add it to --batch-sizes")
    fits, rejected = [], {}
    for name, row in rows.items():
        if name == EAGER:
            continue
        why = []
        if "min_accuracy" in budget:
            if row.get("accuracy") is None:
                why.append("no accuracy figure in the manifest")
            elif row["accuracy"] < budget["min_accuracy"] - 1e-9:
                why.append(f"accuracy {row['accuracy'] * 100:.2f}% is "
                           f"{(reference - row['accuracy']) * 100:.2f} points below eager")
        if "min_cosine" in budget:
            if row.get("cosine_min") is None:
                why.append("no cosine_min figure in the manifest")
            elif row["cosine_min"] < budget["min_cosine"]:
                why.append(f"cosine_min {row['cosine_min']:.5f} < {budget['min_cosine']}")
        if why:
            rejected[name] = "; ".join(why)
        else:
            fits.append(row)
    fits.sort(key=lambda r: r["p50_ms"])
    described = ", ".join(f"{k} {v:g}" for k, v in budget.items() if k != "min_accuracy")
    if fits:
        best = fits[0]
        chosen, default = best["variant"], best["variant"]
        reason = (f"fastest of {len(fits)} variant(s) within budget ({described}) at batch {batch_size}: "
                  f"p50 {best['p50_ms']:.3f} ms, {best['speedup_vs_eager']:.2f}x eager fp32")
    else:
        chosen, default = None, fp32_default(manifest.data["variants"]) or manifest.default_variant
        reason = f"no measured variant fits the budget ({described}) at batch {batch_size}; kept the fp32 default"
    return {
        "batch_size": batch_size,
        "budget": budget,
        "chosen": chosen,
        "default_variant": default,
        "reason": reason,
        "measured_p50_ms": {name: row["p50_ms"] for name, row in rows.items()},
        "rejected": rejected,
        "threads": report["settings"]["threads"],
        "cpu_model": report["machine"]["cpu_model"],
        "selected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def apply_selection(folder: str | Path, selection: dict, hashes: dict[str, str]) -> None:
    """Re-read the manifest, set default_variant and selection, save atomically (Manifest.save)."""
    from kiln.export.manifest import read_manifest

    manifest = read_manifest(folder)
    default = selection["default_variant"]
    entry = manifest.variants.get(default)
    if entry is None or (default in hashes and entry["sha256"] != hashes[default]):
        raise ManifestError(f"{folder} changed while it was being measured (variant {default!r}); "
                            "run kiln bench --select again")
    manifest.data["default_variant"] = default
    manifest.data["selection"] = selection
    manifest.save()  # write_json_atomic keeps the file's mode, so a server running as another user still reads it
    read_manifest(folder)  # what a server will read must still be valid


def select_default(folder: str | Path, max_accuracy_drop: float | None = None, min_cosine: float | None = None,
                   batch_size: int = DEFAULT_SELECT_BATCH_SIZE, threads: int | None = None,
                   progress: Progress = _stderr) -> dict:
    """Measure every variant at one batch size and make the fastest within budget the default (`export --select`)."""
    settings = BenchSettings(batch_sizes=(batch_size,), threads=threads)
    report = measure(folder, settings, progress)
    from kiln.export.manifest import read_manifest

    selection = choose(read_manifest(folder), report, batch_size, max_accuracy_drop, min_cosine)
    apply_selection(folder, selection, report["hashes"])
    progress(f"[kiln] select: default variant {selection['default_variant']}: {selection['reason']}")
    return selection


# --- outputs ------------------------------------------------------------------------------------------------


def _csv_value(column: str, value):
    if value is None:
        return ""
    if isinstance(value, float):
        digits = {"items_per_s": 1, "peak_rss_mb": 1, "speedup_vs_eager": 3}.get(column, 6 if column in
                                                                                  ("accuracy", "cosine_min") else 4)
        return f"{value:.{digits}f}"
    return value


def _stage(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    return Path(tmp)


def stage_outputs(folder: Path, report: dict, scatter_batch: int) -> list[tuple[Path, Path]]:
    """Write bench.json/csv/png beside their targets; return (temporary, final) pairs to rename."""
    from kiln.export import bench_plot

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
        bench_plot.plot(report, png_tmp, scatter_batch)
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


def format_table(report: dict) -> str:
    default = report.get("selection", {}).get("default_variant", report["default_variant"])
    header = ("variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs eager", "MB", "peak RSS MB",
              "accuracy", "cosine_min")
    lines = [header]
    for r in report["results"]:
        lines.append((
            r["variant"] + (" *" if r["variant"] == default else ""),
            str(r["batch_size"]),
            f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
            f"{r['items_per_s']:,.0f}",
            f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-",
            f"{r['bytes'] / 1e6:.2f}" if r["bytes"] is not None else "-",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-",
            f"{r['cosine_min']:.5f}" if r["cosine_min"] is not None else "-",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


# --- the command --------------------------------------------------------------------------------------------


def run_bench_command(args) -> int:
    """`kiln bench`: validate everything, measure, then write outputs (and the selection) in one go."""
    folder = Path(args.folder)
    if not args.select and (args.max_accuracy_drop is not None or args.min_cosine is not None
                            or args.select_batch_size is not None):
        raise UsageError("--max-accuracy-drop, --min-cosine and --select-batch-size only apply with --select; "
                         "add --select")
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 100.0:
        raise UsageError(f"--max-accuracy-drop {args.max_accuracy_drop} is in percentage points and must lie in "
                         "[0, 100]; e.g. 0.5")
    if args.min_cosine is not None and not -1.0 <= args.min_cosine <= 1.0:
        raise UsageError(f"--min-cosine {args.min_cosine} must lie in [-1, 1]; e.g. 0.99")
    select_batch = args.select_batch_size if args.select_batch_size is not None else DEFAULT_SELECT_BATCH_SIZE
    if select_batch < 1:
        raise UsageError(f"--select-batch-size {select_batch} must be a positive integer; e.g. 16")
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.select and select_batch not in batch_sizes:
        batch_sizes = tuple(sorted({*batch_sizes, select_batch}))
    settings = BenchSettings(
        batch_sizes=batch_sizes, seq_len=args.seq_len, threads=args.threads, warmup=args.warmup,
        min_iters=args.min_iters, max_iters=args.max_iters, max_seconds=args.max_seconds,
        variants=parse_names(args.variants),
    )
    if args.select:
        from kiln.export.manifest import read_manifest

        manifest = read_manifest(folder)
        has_accuracy = manifest.data.get("reference", {}).get("accuracy") is not None
        if args.max_accuracy_drop is not None and not has_accuracy:
            raise UsageError(f"{manifest.model!r} ({manifest.task}) has no accuracy figure, so --max-accuracy-drop "
                             "does not apply; give a budget with --min-cosine, e.g. 0.99")
    report = measure(folder, settings, verbose=getattr(args, "verbose", False))
    folder = Path(report["folder"])
    scatter_batch = select_batch if args.select else max(report["settings"]["batch_sizes"])
    if args.select:
        from kiln.export.manifest import read_manifest

        selection = choose(read_manifest(folder), report, select_batch, args.max_accuracy_drop, args.min_cosine)
        report["selection"] = selection
    staged = stage_outputs(folder, report, scatter_batch)
    try:
        if args.select:
            apply_selection(folder, report["selection"], report["hashes"])
        commit(staged)
    finally:
        discard(staged)
    print(f"{report['model']} on {report['machine']['cpu_model']}, {report['settings']['threads']} thread(s)"
          + (f", seq_len {report['settings']['seq_len']}" if report["settings"]["seq_len"] else "")
          + "  (* = default variant; vs eager = eager p50 / p50)")
    print(format_table(report))
    if args.select:
        print(f"select: {report['selection']['reason']}")
        if report["selection"]["chosen"] is not None:
            print(f"default variant is now {report['selection']['default_variant']} (kiln serve loads it)")
        else:
            print(f"default variant stays {report['selection']['default_variant']}")
    print(f"wrote {', '.join(str(folder / n) for n in OUTPUT_NAMES)}")
    return 0
