"""`--select`: measure, choose by the one policy (kiln.core.selection), and record the choice in the manifest.

Only `default_variant` and `selection` change, written atomically, and only if the artifacts did not change
while they were being measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core.console import Progress, to_stderr
from kiln.core.errors import ManifestError
from kiln.core.manifest import read_manifest
from kiln.core.selection import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_BATCH_INVARIANCE,
    DEFAULT_MIN_COSINE,
    DEFAULT_SELECT_BATCH_SIZE,
    choose,
)

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "DEFAULT_MIN_BATCH_INVARIANCE", "DEFAULT_MIN_COSINE",
           "DEFAULT_SELECT_BATCH_SIZE", "apply_selection", "choose", "select_default"]


def apply_selection(folder: str | Path, selection: dict[str, Any], hashes: dict[str, str]) -> None:
    """Re-read the manifest, set default_variant and selection, save atomically (Manifest.save)."""
    manifest = read_manifest(folder)
    default = selection["default_variant"]
    entry = next((v for v in manifest.variants if v.name == default), None)
    if entry is None or (default in hashes and entry.sha256 != hashes[default]):
        raise ManifestError(f"{folder} changed while it was being measured (variant {default!r}); "
                            "run kiln bench --select again")
    manifest.default_variant = default
    manifest.selection = selection
    manifest.save()  # write_json_atomic keeps the file's mode, so a server running as another user still reads it
    read_manifest(folder)  # what a server will read must still be valid


def select_default(folder: str | Path, max_accuracy_drop: float | None = None, min_cosine: float | None = None,
                   batch_size: int = DEFAULT_SELECT_BATCH_SIZE, threads: int | None = None,
                   progress: Progress = to_stderr, min_batch_invariance: float | None = None,
                   accept_unstable: bool = False) -> dict[str, Any]:
    """Measure every variant at one batch size and make the fastest within budget the default (`export --select`)."""
    from kiln.bench.driver import BenchSettings, measure

    settings = BenchSettings(batch_sizes=(batch_size,), threads=threads)
    report = measure(folder, settings, progress)
    selection = choose(read_manifest(folder), report, batch_size, max_accuracy_drop, min_cosine, min_batch_invariance,
                       accept_unstable)
    apply_selection(folder, selection, report["hashes"])
    progress(f"[kiln] select: default variant {selection['default_variant']}: {selection['reason']}")
    return selection
