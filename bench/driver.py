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
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.bench import select, stats
from kiln.core.bench_row import BenchRow
from kiln.core.console import Progress, to_stderr
from kiln.core.console import format_table as align
from kiln.core.errors import BenchmarkError, KilnError, UnstableMeasurement, UsageError, one_line
from kiln.core.machine import ISA_FLAGS, bf16_native, default_threads, fingerprint, machine_info
from kiln.core.manifest import EAGER, Manifest, library_versions, read_manifest
from kiln.core.runtime import check_runnable, require_installed

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQ_LEN = 128
SEQ_COST_LENGTHS = (16, 64, 256)  # `kiln bench`'s default --seq-costs: a text model's cost by sequence length
CSV_COLUMNS = ("variant", "batch_size", "p50_ms", "p90_ms", "p99_ms", "items_per_s", "speedup_vs_eager", "bytes",
               "peak_rss_mb", "accuracy", "cosine_min", "batch_invariance", "rounds", "p50_min_ms", "p50_max_ms",
               "spread", "cv", "stable", "gflops_per_s", "pct_of_peak", "precision", "emulated")
OUTPUT_NAMES = ("bench.json", "bench.csv", "bench.png")
__all__ = ["CSV_COLUMNS", "EAGER", "ISA_FLAGS", "BenchSettings", "bench", "measure", "select_default"]


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; checked on construction so bad values fail before any process starts."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seq_len: int = DEFAULT_SEQ_LEN  # used only for text models (preprocessing kind "text")
    threads: int | None = None  # None: the cores this process may run on
    warmup: int = 5  # untimed calls at least, the first time a cell is measured; then until the latency settles
    min_iters: int = 5
    max_iters: int = 10_000
    max_seconds: float = 1.0  # timed seconds per cell and round (and the warm-up's bound)
    variants: tuple[str, ...] | None = None  # None: every variant in the manifest
    rounds: int = 3
    max_spread: float = stats.DEFAULT_MAX_SPREAD
    # Text models: also the cost of one item at these sequence lengths (at the largest batch size, every row that
    # long), the curve a token budget is set from; lengths past the model's max_length are left out. () : none.
    seq_costs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise UsageError(f"batch sizes {list(self.batch_sizes)} must be positive integers; e.g. --batch-sizes 1,8,32")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.seq_costs):
            raise UsageError(f"--seq-costs {list(self.seq_costs)} must be positive integers; e.g. --seq-costs 16,64,256")
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
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 50:
            raise UsageError(f"--rounds {self.rounds} must be an integer in 1..50; e.g. --rounds 3")
        if not 0 < self.max_spread <= 10:
            raise UsageError(f"--max-spread {self.max_spread} must be a positive fraction; e.g. 0.2 for 20%")


def parse_batch_sizes(text: str, flag: str = "--batch-sizes") -> tuple[int, ...]:
    """`1,8,32` -> (1, 8, 32), sorted and deduplicated; anything else is a UsageError."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"{flag} {text!r} must be positive integers separated by commas; "
                             f"e.g. {flag} 1,8,32")
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


class Worker:
    """One variant's measuring process, alive across rounds; asked for one cell at a time."""

    def __init__(self, config: dict[str, Any], scratch: Path, verbose: bool) -> None:
        self.name = config["variant"]
        self.verbose = verbose
        config_path = scratch / f"{self.name}.config.json"
        config_path.write_text(json.dumps(config))
        self.log = scratch / f"{self.name}.log"
        threads = str(config["threads"])
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
        self._log_handle = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.bench.worker", str(config_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_handle,
                                     text=True, env=env)
        self.ready: dict[str, Any] = self._receive("ready")

    def _receive(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing to stdout
            if isinstance(record, dict) and key in record:
                return dict(record[key])
            if isinstance(record, dict) and "error" in record:
                self._fail(record)
        self._fail(None)
        raise AssertionError("unreachable")  # pragma: no cover

    def measure(self, batch_size: int, seconds: float, seq_len: int | None = None) -> dict[str, Any]:
        """One cell; with `seq_len`, at that sequence length (every row that long) instead of the bench's own."""
        assert self.proc.stdin is not None
        command = {"measure": batch_size, "seconds": seconds, **({"seq_len": seq_len} if seq_len else {})}
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail(None)
        return self._receive("cell")

    def _fail(self, result: dict[str, Any] | None) -> None:
        from kiln.core import errors

        rc = self.proc.wait()
        self._log_handle.flush()
        if result and "error_type" in result:
            cls = getattr(errors, result["error_type"], None)
            if isinstance(cls, type) and issubclass(cls, KilnError) and cls is not errors.VerificationError:
                raise cls(result["message"])
            raise BenchmarkError(result["message"])
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.verbose and text:
            print(text, file=sys.stderr)
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
        how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
        hint = "; it may have run out of memory" if rc == -9 else ""
        raise BenchmarkError(f"measuring {self.name} failed ({how}: {last[:200]}){hint}; "
                             "re-run with --verbose for its log, or leave the variant out with --variants")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"exit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log_handle.close()


def measure_peaks(threads: int, precisions: list[str]) -> dict[str, float]:
    """This machine's GEMM peak per precision, in a fresh process with the bench's thread count."""
    result = subprocess.run([sys.executable, "-m", "kiln.bench.peak", str(threads), ",".join(precisions)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise BenchmarkError(f"measuring this machine's peak failed ({one_line(result.stderr[-300:])}); "
                             "re-run with --verbose")
    peaks: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return peaks


def _figures(manifest: Manifest, name: str) -> dict[str, Any]:
    if name == EAGER:
        return {"bytes": None, "accuracy": manifest.reference_accuracy, "cosine_min": 1.0, "format": "pytorch",
                "runtime": "torch-eager", "precision": "fp32", "pruning": None, "quantization": None,
                "batch_invariance": None}
    entry = manifest.variant(name)
    return {
        "bytes": entry.total_bytes,
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
    """Measure the baseline and the variants in interleaved rounds; return the report (nothing is written here).

    Every variant's process loads once and stays alive; in each round every (batch size, variant) cell is
    measured once, the variants taking turns (in a rotated order each round), so slow drift of the machine
    reaches all of them alike and shows up as spread instead of as a false ratio.
    """
    folder = Path(folder).absolute()
    manifest, names = preflight(folder, settings, writing)
    threads = settings.threads or default_threads()
    seq_len = settings.seq_len if manifest.is_text else None
    batch_sizes = sorted(settings.batch_sizes)
    order = [EAGER, *names]
    progress(f"[kiln] bench {manifest.model}: {len(order)} runtimes x batch sizes {batch_sizes}"
             f"{f', seq_len {seq_len}' if seq_len else ''}, {threads} thread(s), {settings.rounds} round(s) of "
             f"up to {settings.max_seconds:g} s per cell")
    max_length = (manifest.preprocessing_spec.max_length or DEFAULT_SEQ_LEN) if manifest.is_text else 0
    seq_costs = sorted(n for n in set(settings.seq_costs) if n <= max_length)
    measured = run_rounds(folder, manifest, order, {"threads": threads, "batch_sizes": batch_sizes,
                                                     "seq_len": seq_len}, settings, progress, verbose, seq_costs)
    machine = machine_info()
    machine["fingerprint"] = fingerprint(machine)
    rows = bench_rows(manifest, order, batch_sizes, measured, settings.max_spread, machine)
    return {
        "kiln_bench": 2,
        "model": manifest.model,
        "task": manifest.task,
        "folder": str(folder),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "default_variant": manifest.default_variant,
        "reference": manifest.reference,
        "machine": {**machine, "load_average": measured.load},
        "peak_gflops": measured.peaks,
        "stable": all(r.stable for r in rows),
        "versions": library_versions(),
        "settings": {**asdict(settings), "batch_sizes": batch_sizes, "threads": threads, "seq_len": seq_len,
                     "variants": names},
        "hashes": {n: manifest.variant(n).sha256 for n in names},
        "results": [r.to_record() for r in rows],
        **({"seq_cost": seq_cost(measured, order, max(batch_sizes), seq_costs)} if seq_costs else {}),
    }


def seq_cost(measured: Rounds, order: list[str], batch: int, lengths: list[int]) -> dict[str, Any]:
    """Each variant's cost per item and per token by sequence length (median p50 over rounds, every row of the
    batch that long): what a token budget for batching (kiln serve --max-batch-tokens) is read from."""
    variants: dict[str, dict[str, Any]] = {}
    for name in order:
        for length in lengths:
            cells = measured.seq_cells.get((name, length))
            if not cells:
                continue
            p50 = float(statistics.median(c["p50_ms"] for c in cells))
            variants.setdefault(name, {})[str(length)] = {
                "p50_ms": round(p50, 4), "ms_per_item": round(p50 / batch, 4),
                "us_per_token": round(1000 * p50 / (batch * length), 3),
                "p50_range_ms": [round(min(c["p50_ms"] for c in cells), 4), round(max(c["p50_ms"] for c in cells), 4)]}
    return {"batch_size": batch, "lengths": lengths, "variants": variants}


@dataclass(frozen=True)
class Rounds:
    """What the interleaved rounds left: each cell's per-round figures, each worker's `ready` record (load time,
    module size, FLOPs per item), this machine's peaks and how loaded it was meanwhile."""

    cells: dict[tuple[str, int], list[dict[str, Any]]]
    ready: dict[str, dict[str, Any]]
    peaks: dict[str, float]
    load: dict[str, Any]
    seq_cells: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)  # (variant, length)


def run_rounds(folder: Path, manifest: Manifest, order: list[str], shape: dict[str, Any], settings: BenchSettings,
               progress: Progress, verbose: bool, seq_costs: list[int] | None = None) -> Rounds:
    """Start one worker per runtime (eager first: it writes the inputs every variant reads), measure the peaks,
    then every cell once per round with the variants taking turns; the workers stop whatever happens.
    `shape`: the threads, the (ascending) batch sizes and the sequence length, as resolved by `measure`."""
    threads, batch_sizes = shape["threads"], shape["batch_sizes"]
    total = len(order) * len(batch_sizes) * settings.rounds
    scratch = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    workers: dict[str, Worker] = {}
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    seq_cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    seq_costs = seq_costs or []
    total += len(order) * len(seq_costs) * settings.rounds
    done = 0
    try:
        base = {
            "folder": str(folder), **shape, "inputs": str(scratch / "inputs.npz"), "warmup": settings.warmup,
            "min_iters": settings.min_iters, "max_iters": settings.max_iters,
        }
        for name in order:
            workers[name] = Worker({**base, "variant": name}, scratch, verbose)
        precisions = sorted({_figures(manifest, n)["precision"] for n in order})
        peaks = measure_peaks(threads, precisions)
        progress("[kiln] peak here: " + ", ".join(f"{p} {g:,.0f} GFLOP/s" for p, g in peaks.items()))
        load_before = os.getloadavg()
        cpu_before = _cpu_snapshot(workers.values())
        for index in range(settings.rounds):
            turn = order[index % len(order):] + order[:index % len(order)]
            for batch in batch_sizes:
                for name in turn:
                    cell = workers[name].measure(batch, settings.max_seconds)
                    cells.setdefault((name, batch), []).append(cell)
                    done += 1
                    progress(f"[kiln] bench [{done}/{total}] round {index + 1} {name} batch {batch}: "
                             f"p50 {cell['p50_ms']:.3f} ms, p99 {cell['p99_ms']:.3f} ms ({cell['iterations']} calls)")
            for length in seq_costs:
                for name in turn:
                    cell = workers[name].measure(batch_sizes[-1], settings.max_seconds, length)
                    seq_cells.setdefault((name, length), []).append(cell)
                    done += 1
                    progress(f"[kiln] bench [{done}/{total}] round {index + 1} {name} batch {batch_sizes[-1]} at "
                             f"{length} tokens: p50 {cell['p50_ms']:.3f} ms ({cell['iterations']} calls)")
        load_after = os.getloadavg()
        cpu_after = _cpu_snapshot(workers.values())
    finally:
        for worker in workers.values():
            worker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    load = stats.load_summary(load_before, load_after, default_threads(), threads,
                              _other_cpu(cpu_before, cpu_after))
    return Rounds(cells, {name: worker.ready for name, worker in workers.items()}, peaks, load, seq_cells)


def _other_cpu(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Cores' worth of CPU that processes other than kiln's took during the rounds; None where unknown."""
    if not before or not after:
        return None
    elapsed = after["wall"] - before["wall"]
    ours = after["ours"] - before["ours"]
    return max(0.0, (after["machine"] - before["machine"] - ours) / elapsed) if elapsed > 0 else None


def bench_rows(manifest: Manifest, order: list[str], batch_sizes: list[int], measured: Rounds, max_spread: float,
               machine: dict[str, Any]) -> list[BenchRow]:
    """One row per (variant, batch size): the rounds combined, the manifest's figures, the roofline, and the
    speed-up over eager at the same batch size."""
    eager_info = measured.ready[EAGER]
    rows = []
    for name in order:
        figures = _figures(manifest, name)
        if name == EAGER:
            figures["bytes"] = eager_info.get("module_bytes")
        for batch in batch_sizes:
            per_round = measured.cells[(name, batch)]
            cell = stats.combine_rounds(per_round, batch)
            reasons = stats.unstable_reasons(cell, per_round, max_spread, measured.load)
            rows.append(BenchRow(
                variant=name, batch_size=batch, **cell,
                peak_rss_mb=per_round[0]["peak_rss_mb"],  # sizes ascend in round 1: the peak up to this size
                stable=not reasons, unstable_reasons=reasons,
                **figures,
                **roofline(eager_info.get("flops_per_item", {}).get(str(batch)), batch, cell["p50_ms"],
                           figures["precision"], measured.peaks, machine),
                load_seconds=measured.ready[name]["load_seconds"],
            ))
    eager_p50 = {r.batch_size: r.p50_ms for r in rows if r.variant == EAGER}
    return [dataclasses.replace(r, speedup_vs_eager=_ratio(eager_p50[r.batch_size], r.p50_ms)) for r in rows]


def _ratio(eager_ms: float | None, p50_ms: float | None) -> float | None:
    return eager_ms / p50_ms if eager_ms is not None and p50_ms is not None and p50_ms > 0 else None


def _cpu_snapshot(workers: Iterable[Worker]) -> dict[str, float] | None:
    """Busy CPU seconds of the whole machine and of kiln's own processes (this one and its workers), to tell how
    much CPU other processes took during the rounds. None where /proc is not there."""
    import time

    try:
        ticks = float(os.sysconf("SC_CLK_TCK"))
        machine = stats.machine_busy_seconds(Path("/proc/stat").read_text(), ticks)
        ours = stats.process_cpu_seconds(Path("/proc/self/stat").read_text(), ticks)
        for worker in workers:
            ours += stats.process_cpu_seconds(Path(f"/proc/{worker.proc.pid}/stat").read_text(), ticks)
    except (OSError, ValueError, IndexError):
        return None
    return {"machine": machine, "ours": ours, "wall": time.monotonic()}


def roofline(flops_per_item: float | None, batch: int, p50_ms: float, precision: str, peaks: dict[str, float],
             machine: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of a cell and its fraction of this machine's peak for its precision; BF16 without AVX-512 BF16 or
    AMX is marked emulated (its 'peak' is then the emulation's, far below the fp32 one)."""
    emulated = precision == "bf16" and not bf16_native(machine)
    if not flops_per_item or p50_ms <= 0:
        return {"gflops_per_s": None, "pct_of_peak": None, "emulated": emulated}
    rate = flops_per_item * batch / (p50_ms / 1000.0) / 1e9
    peak = peaks.get(precision)
    return {"gflops_per_s": rate, "pct_of_peak": 100.0 * rate / peak if peak else None, "emulated": emulated}


# --- outputs ------------------------------------------------------------------------------------------------


def _csv_value(column: str, value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        digits = {"items_per_s": 1, "peak_rss_mb": 1, "speedup_vs_eager": 3, "gflops_per_s": 2,
                  "pct_of_peak": 2}.get(column, 6 if column in ("accuracy", "cosine_min", "batch_invariance",
                                                                "spread", "cv") else 4)
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
            for row in map(BenchRow.from_record, report["results"]):
                writer.writerow([_csv_value(c, getattr(row, c)) for c in CSV_COLUMNS])
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
    rows = [("variant", "batch", "p50 ms", "p50 range (rounds)", "cv", "p99 ms", "items/s", "vs eager", "MB",
             "peak RSS MB", "accuracy", "cosine_min", "batch inv.", "GFLOP/s", "% of peak")]
    for r in map(BenchRow.from_record, report["results"]):
        peak = "-"
        if r.pct_of_peak is not None:
            peak = f"{r.pct_of_peak:.1f}%" + (" (emulated)" if r.emulated else "")
        rows.append((
            r.variant + (" *" if r.variant == default else "") + ("" if r.stable else " !"),
            str(r.batch_size),
            f"{r.p50_ms:.3f}",
            f"{r.p50_min_ms:.3f}-{r.p50_max_ms:.3f}" if r.p50_min_ms is not None else "-",
            f"{r.cv:.1%}" if r.cv is not None else "-",
            f"{r.p99_ms:.3f}",
            f"{r.items_per_s:,.0f}",
            f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else "-",
            f"{r.bytes / 1e6:.2f}" if r.bytes is not None else "-",
            f"{r.peak_rss_mb:.0f}",
            f"{r.accuracy * 100:.2f}%" if r.accuracy is not None else "-",
            f"{r.cosine_min:.5f}" if r.cosine_min is not None else "-",
            f"{r.batch_invariance:.6f}" if r.batch_invariance is not None else "-",
            f"{r.gflops_per_s:,.1f}" if r.gflops_per_s is not None else "-",
            peak,
        ))
    table = align(rows)
    cost = report.get("seq_cost")
    if cost:
        lengths = cost["lengths"]
        seq_rows = [("variant", *(f"{n} tokens: ms/item (us/token)" for n in lengths))]
        for name, by_length in cost["variants"].items():
            seq_rows.append((name, *(f"{by_length[str(n)]['ms_per_item']:.3f} ({by_length[str(n)]['us_per_token']:.1f})"
                                     if str(n) in by_length else "-" for n in lengths)))
        table += f"\n\ncost of one item by sequence length (batch {cost['batch_size']}, every row that long):\n"
        table += align(seq_rows)
    return table


def instability_notes(report: dict[str, Any]) -> list[str]:
    """One line per unstable cell, naming the likely cause."""
    return [f"unstable: {r.variant} batch {r.batch_size}: {'; '.join(r.unstable_reasons)}"
            for r in map(BenchRow.from_record, report["results"]) if not r.stable]


def bench(folder: str | Path, settings: BenchSettings | None = None, *, select_default: bool = False,
          max_accuracy_drop: float | None = None, min_cosine: float | None = None,
          select_batch_size: int | None = None, progress: Progress = to_stderr,
          verbose: bool = False, min_batch_invariance: float | None = None,
          accept_unstable: bool = False) -> dict[str, Any]:
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
    refused: UnstableMeasurement | None = None
    if select_default:
        try:
            report["selection"] = select.choose(read_manifest(folder), report, select_batch, max_accuracy_drop,
                                                min_cosine, min_batch_invariance, accept_unstable)
        except UnstableMeasurement as exc:  # the run is still recorded (stable: false); the manifest is not touched
            refused, select_default = exc, False
            exc.report = report  # type: ignore[attr-defined]
    staged = stage_outputs(folder, report, scatter_batch)
    try:
        if select_default:
            select.apply_selection(folder, report["selection"], report["hashes"])
        commit(staged)
    finally:
        discard(staged)
    if refused is not None:
        raise refused
    return report


def select_default(folder: str | Path, max_accuracy_drop: float | None = None, min_cosine: float | None = None,
                   batch_size: int = select.DEFAULT_SELECT_BATCH_SIZE, threads: int | None = None,
                   progress: Progress = to_stderr, min_batch_invariance: float | None = None,
                   accept_unstable: bool = False, max_seconds: float | None = None) -> dict[str, Any]:
    """Measure every variant at one batch size and make the fastest within budget the default (`kiln export`'s
    selection; `max_seconds` bounds each cell's timed seconds per round, `kiln bench`'s when None)."""
    settings = BenchSettings(batch_sizes=(batch_size,), threads=threads,
                             **({"max_seconds": max_seconds} if max_seconds else {}))
    report = measure(folder, settings, progress)
    selection = select.choose(read_manifest(folder), report, batch_size, max_accuracy_drop, min_cosine,
                              min_batch_invariance, accept_unstable)
    select.apply_selection(folder, selection, report["hashes"])
    progress(f"[kiln] select: default variant {selection['default_variant']}: {selection['reason']}")
    return selection


def summary(report: dict[str, Any]) -> str:
    """What `kiln bench` prints: the machine, the table, the selection and the files written."""
    settings = report["settings"]
    isa = ", ".join(flag for flag, present in report["machine"]["isa"].items() if present) or "none of the listed"
    lines = [f"{report['model']} on {report['machine']['cpu_model']} ({isa}), {settings['threads']} thread(s)"
             + (f", seq_len {settings['seq_len']}" if settings["seq_len"] else "")
             + f", {settings['rounds']} round(s)  (* = default variant; ! = unstable; vs eager = eager p50 / p50; "
               "p50 = median of the rounds' p50s)",
             "peak here: " + ", ".join(f"{p} {g:,.0f} GFLOP/s" for p, g in report.get("peak_gflops", {}).items()),
             format_table(report)]
    notes = instability_notes(report)
    lines += notes
    if notes:
        lines.append(f"this run is unstable ({len(notes)} cell(s) over the --max-spread of "
                     f"{settings['max_spread']:.0%}): its ratios are not to be trusted; re-run on a quiet machine")
    selection = report.get("selection")
    if selection:
        lines.append(f"select: {selection['reason']}")
        if selection["chosen"] is not None:
            lines.append(f"default variant is now {selection['default_variant']} (kiln serve loads it)")
        else:
            lines.append(f"default variant stays {selection['default_variant']}")
    lines.append(f"wrote {', '.join(str(Path(report['folder']) / n) for n in OUTPUT_NAMES)}")
    return "\n".join(lines)
