"""`--select`: choose by the one policy (kiln.core.selection) and record the choice in the manifest.

The measuring is kiln.bench.driver's (its `select_default` measures, then calls these): this module imports
nothing from the driver, so the two do not import each other. Only `default_variant` and `selection` change,
written atomically, and only if the artifacts did not change while they were being measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
           "DEFAULT_SELECT_BATCH_SIZE", "apply_selection", "choose"]


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
