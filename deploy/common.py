"""What both deploy targets share: flag parsing with one-line errors, the figures bench and loadtest left in the
artifact folder, and writing a folder atomically (staged beside its target, renamed into place).

bench.json and loadtest.json are read as plain JSON here, not through kiln.bench, so that `kiln deploy` runs in a
serve-only install; the keys read are the ones kiln.bench.driver and kiln.bench.loadtest write.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.core.bench_row import BenchRow
from kiln.core.errors import KilnError, ManifestError, UsageError, one_line
from kiln.core.folders import swap_into_place
from kiln.core.manifest import Manifest, VariantEntry
from kiln.core.paths import MAX_CONFIG_BYTES, read_json, regular_file

BENCH_NAME = "bench.json"
LOADTEST_NAME = "loadtest.json"


def parse_int(flag: str, value: int | str, minimum: int = 1, example: int = 1) -> int:
    """An integer flag given as text, or a UsageError that fits on one line."""
    if isinstance(value, bool):
        raise UsageError(f"{flag} {value!r} is not an integer; e.g. {flag} {example}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise UsageError(f"{flag} {value!r} is not an integer; e.g. {flag} {example}")
        number = int(text)
    if number < minimum:
        raise UsageError(f"{flag} {number} must be at least {minimum}; e.g. {flag} {example}")
    return number


def parse_float(flag: str, value: float | str, example: float, allow_zero: bool = False) -> float:
    """A positive (or, with `allow_zero`, non-negative) finite number flag given as text, or a one-line UsageError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not a number; e.g. {flag} {example:g}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise UsageError(f"{flag} {value!r} must be a {'non-negative' if allow_zero else 'positive'} number; "
                         f"e.g. {flag} {example:g}")
    return number


def resolve_variant(manifest: Manifest, name: str | None) -> VariantEntry:
    """Manifest.variant, refused as a UsageError (exit 2): for deploy the variant is an argument to fix."""
    try:
        return manifest.variant(name)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None


# --- bench.json ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchFigures:
    """What `kiln bench` measured for one variant: a row per batch size (each with a positive items_per_s), the
    threads and the CPU it ran on."""

    variant: str
    cells: tuple[BenchRow, ...]
    threads: int | None
    cpu_model: str | None

    @property
    def peak_rss_mb(self) -> float | None:
        values = [c.peak_rss_mb for c in self.cells if c.peak_rss_mb is not None]
        return max(values) if values else None


def read_bench(manifest: Manifest, entry: VariantEntry) -> tuple[BenchFigures | None, str]:
    """The variant's cells from bench.json beside the manifest, or None and why not (for the user's notes)."""
    path = manifest.folder / BENCH_NAME
    if not path.is_file():
        return None, f"no {BENCH_NAME} in {str(manifest.folder)!r} (run `kiln bench` to measure one)"
    try:
        data = read_json(regular_file(manifest.folder, BENCH_NAME, BENCH_NAME), MAX_CONFIG_BYTES, BENCH_NAME,
                         fix="re-run `kiln bench`")
        rows = data["results"]
        hashes = data.get("hashes") or {}
        settings = data.get("settings") or {}
        machine = data.get("machine") or {}
    except KilnError as exc:
        return None, f"{one_line(exc)}; ignored it"
    except (KeyError, TypeError, AttributeError) as exc:
        return None, f"{path} is unreadable ({type(exc).__name__}); ignored it"
    if hashes.get(entry.name) not in (None, entry.sha256):
        return None, f"{path} measured another file for {entry.name!r} (sha256 differs); ignored it: re-run `kiln bench`"
    cells: dict[int, BenchRow] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or row.get("variant") != entry.name:
            continue
        try:
            batch = int(row["batch_size"])
            items = float(row["items_per_s"])
            rss = float(row["peak_rss_mb"]) if row.get("peak_rss_mb") is not None else None
        except (KeyError, TypeError, ValueError):
            continue
        if batch >= 1 and math.isfinite(items) and items > 0:
            cells[batch] = BenchRow(entry.name, batch, items_per_s=items, peak_rss_mb=rss)
    if not cells:
        return None, f"{path} has no figures for {entry.name!r}; ignored it"
    threads = settings.get("threads")
    figures = BenchFigures(entry.name, tuple(cells[b] for b in sorted(cells)),
                           threads if isinstance(threads, int) and threads > 0 else None,
                           machine.get("cpu_model") if isinstance(machine, dict) else None)
    sizes = ", ".join(f"{c.batch_size}: {c.items_per_s:,.0f}/s" for c in figures.cells)
    return figures, f"{path}: {entry.name} items/s by batch size {sizes}" + (
        f" ({figures.threads} thread(s), {figures.cpu_model})" if figures.threads else "")


# Triton's batcher should wait for a batch size only where items get cheaper there: at least this much more
# throughput than the last size kept (batch 1 first). Below it the curve is flat and waiting only adds latency.
PREFERRED_GAIN = 1.10


def preferred_batch_sizes(figures: BenchFigures | None, max_batch_size: int, gain: float = PREFERRED_GAIN) -> list[int]:
    """Batch sizes whose items/s beat the last size kept by `gain` (starting from the smallest measured), up to
    `max_batch_size`; empty when the curve is flat or nothing was measured."""
    if figures is None:
        return []
    cells = [c for c in figures.cells if c.batch_size <= max_batch_size]
    if len(cells) < 2:
        return []
    reference = _items_per_s(cells[0])
    chosen = []
    for cell in cells[1:]:
        if _items_per_s(cell) >= reference * gain:
            chosen.append(cell.batch_size)
            reference = _items_per_s(cell)
    return chosen


def _items_per_s(row: BenchRow) -> float:
    return row.items_per_s or 0.0  # read_bench keeps only rows with a positive figure


# --- loadtest.json ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadLevel:
    concurrency: int
    p99_ms: float
    error_count: int
    requests_per_s: float


def read_loadtest(path: Path, model: str, explicit: bool) -> tuple[list[LoadLevel] | None, str]:
    """The levels of a `kiln loadtest` result for `model`. A file named by the user (`explicit`) must be usable
    (UsageError otherwise); one found beside the manifest is skipped with a note when it is not."""

    def refuse(reason: str) -> tuple[None, str]:
        if explicit:
            raise UsageError(f"--loadtest {str(path)!r} {reason}; point it at a loadtest.json written by `kiln loadtest`")
        return None, f"{path} {reason}; ignored it"

    if not path.is_file():
        if explicit:
            return refuse("does not exist")
        return None, f"no {LOADTEST_NAME} in {str(path.parent)!r} (`kiln loadtest URL --ceiling {path.parent}` writes one there)"
    try:
        data = read_json(path, MAX_CONFIG_BYTES, LOADTEST_NAME, fix="re-run `kiln loadtest`")
        raw_levels = data["levels"]
        name = data.get("model")
    except (KilnError, KeyError, TypeError, AttributeError):
        return refuse("is not a kiln loadtest result")
    if name is not None and name != model:
        return refuse(f"measured model {name!r}, not {model!r}")
    levels = []
    for level in raw_levels if isinstance(raw_levels, list) else []:
        try:
            levels.append(LoadLevel(int(level["concurrency"]), float(level["p99_ms"]), int(level["error_count"]),
                                    float(level.get("requests_per_s") or 0.0)))
        except (KeyError, TypeError, ValueError):
            continue
    if not levels:
        return refuse("has no concurrency levels")
    return sorted(levels, key=lambda level: level.concurrency), f"{path}: " + ", ".join(
        f"concurrency {lv.concurrency}: p99 {lv.p99_ms:.1f} ms, {lv.error_count} errors" for lv in levels)


def concurrency_within(levels: list[LoadLevel] | None, p99_budget_ms: float) -> int | None:
    """The highest measured concurrency that answered everything with p99 within the budget; None if none did."""
    kept = [lv.concurrency for lv in levels or [] if lv.error_count == 0 and math.isfinite(lv.p99_ms)
            and lv.p99_ms <= p99_budget_ms and lv.concurrency >= 1]
    return max(kept) if kept else None


# --- sizing a replica ----------------------------------------------------------------------------------------------

DEFAULT_TARGET_CONCURRENCY = 8  # Knative's own default (100) suits I/O-bound apps, not a CPU-bound model server
DEFAULT_P99_BUDGET_MS = 100.0
DEFAULT_THREADS = 1
DEFAULT_MEMORY_MIB = 1024
MEMORY_MARGIN = 1.25
SERVER_OVERHEAD_MIB = 256
MEMORY_STEP_MIB = 64


def memory_mib(peak_rss_mb: float | None) -> int:
    """The memory to ask for: bench's peak RSS of the variant with a margin, plus the server's other processes,
    rounded up to MEMORY_STEP_MIB; DEFAULT_MEMORY_MIB without a measurement."""
    if peak_rss_mb is None:
        return DEFAULT_MEMORY_MIB
    wanted = peak_rss_mb * MEMORY_MARGIN + SERVER_OVERHEAD_MIB
    return int(math.ceil(wanted / MEMORY_STEP_MIB) * MEMORY_STEP_MIB)


@dataclass(frozen=True)
class ReplicaSizing:
    """One replica of `kiln serve` as any stack that scales replicas needs it: the cores its inference worker
    runs on, its memory, the concurrency one replica takes before another is added, and a note per figure saying
    where it came from (measured, given, or a default)."""

    threads: int
    memory_mib: int
    target_concurrency: int
    notes: tuple[str, ...]


DEFAULT_MIN_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 3


@dataclass(frozen=True, kw_only=True)
class ScalingOptions:
    """What every target that scales replicas (KServe, Ray) takes alike: replica bounds, the concurrency target
    (given, or read from loadtest.json within the p99 budget), threads per replica. A target's options extend it;
    the flags are one block in kiln.cli, checked here once."""

    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = DEFAULT_MAX_REPLICAS
    target_concurrency: int | None = None
    p99_budget_ms: float = DEFAULT_P99_BUDGET_MS
    loadtest: Path | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise UsageError(f"--min-replicas {self.min_replicas} must be 0 (scale to zero) or more")
        if self.max_replicas < 1:
            raise UsageError(f"--max-replicas {self.max_replicas} must be at least 1")
        if self.min_replicas > self.max_replicas:
            raise UsageError(f"--min-replicas {self.min_replicas} is more than --max-replicas {self.max_replicas}; "
                             "min must not exceed max")
        for flag, value in (("--target-concurrency", self.target_concurrency), ("--threads", self.threads)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be a positive integer")

    def size(self, manifest: Manifest, entry: VariantEntry, target_name: str = "scaleTarget") -> "ReplicaSizing":
        """`size_replica` with these options."""
        return size_replica(manifest, entry, self.threads, self.target_concurrency, self.p99_budget_ms,
                            self.loadtest, target_name)


def size_replica(manifest: Manifest, entry: VariantEntry, threads: int | None = None,
                 target_concurrency: int | None = None, p99_budget_ms: float = DEFAULT_P99_BUDGET_MS,
                 loadtest: Path | None = None, target_name: str = "scaleTarget") -> ReplicaSizing:
    """Size a replica from what kiln measured in the folder: bench.json (threads, peak RSS) and loadtest.json (the
    highest concurrency answered within `p99_budget_ms` without errors); given values win, defaults fill the rest.
    `target_name` is what the stack calls the concurrency target (KServe's `scaleTarget`), for the notes."""
    notes: list[str] = []
    figures, bench_note = read_bench(manifest, entry)
    notes.append(bench_note)
    cores = threads or (figures.threads if figures else None) or DEFAULT_THREADS
    memory = memory_mib(figures.peak_rss_mb if figures else None)
    notes.append(f"memory {memory}Mi: " + (
        f"bench peak RSS {figures.peak_rss_mb:.0f} MB x {MEMORY_MARGIN} + {SERVER_OVERHEAD_MIB} MiB for the server's "
        "other processes" if figures and figures.peak_rss_mb else "the default (no bench.json figures)"))
    notes.append(f"cpu: {cores} thread(s) requested" + ("" if threads else
                                                        " (from bench.json)" if figures and figures.threads
                                                        else " (the default; set --threads)"))
    target, target_note = _target_concurrency(manifest, target_concurrency, p99_budget_ms, loadtest, target_name)
    return ReplicaSizing(cores, memory, target, (*notes, *target_note))


def _target_concurrency(manifest: Manifest, given: int | None, p99_budget_ms: float, loadtest: Path | None,
                        target_name: str) -> tuple[int, list[str]]:
    if given is not None:
        return given, [f"{target_name} {given}: --target-concurrency"]
    path = loadtest or manifest.folder / LOADTEST_NAME
    levels, load_note = read_loadtest(Path(path), manifest.model, explicit=loadtest is not None)
    within = concurrency_within(levels, p99_budget_ms)
    if within is not None:
        return within, [load_note, f"{target_name} {within}: the highest loadtest concurrency with p99 <= "
                                   f"{p99_budget_ms:g} ms and no errors"]
    if levels:
        return 1, [load_note, f"{target_name} 1: no loadtest level kept p99 within {p99_budget_ms:g} ms without "
                              "errors; a replica takes one request at a time (raise --p99-budget-ms or add replicas)"]
    return DEFAULT_TARGET_CONCURRENCY, [load_note, f"{target_name} {DEFAULT_TARGET_CONCURRENCY}: the default (no "
                                                   "loadtest.json; run `kiln loadtest` or pass --target-concurrency)"]


# --- writing ------------------------------------------------------------------------------------------------------


def check_target(out: Path, force: bool, flag: str = "--out") -> None:
    """Refuse an output before anything is written: a file, or a non-empty folder without --force."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {str(out)!r} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{str(out)!r} already exists and is not empty; pass --force to replace it")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(parent)!r} is not writable; choose a writable {flag}")


def _readable(folder: Path) -> None:
    """mkdtemp makes the staging folder private; a server reading the result may run as another user."""
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """A private folder beside `out` to write into; when the block ends without an error it becomes `out` by a
    rename (an existing `out` is swapped out only then), so a reader never sees a half-written folder. On an error
    nothing is left behind, not even a parent folder this call created."""
    out = Path(out)
    check_target(out, force)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    published = False
    try:
        yield staging
        _readable(staging)
        swap_into_place(staging, out)
        published = True
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not published:
            for folder in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def copy_verified(source: Path, target: Path, sha256: str) -> None:
    """Copy a file and check the copy's sha256 against the manifest's: what is deployed is what was verified."""
    from kiln.core.errors import IntegrityError
    from kiln.core.manifest import sha256_file

    shutil.copyfile(source, target)
    if sha256_file(target) != sha256:
        raise IntegrityError(f"the copy of {source.name} does not match its sha256 in the manifest; nothing was "
                             "written: check the disk and re-run")
