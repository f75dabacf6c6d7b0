"""Putting a finished folder in place of another in one step, so a reader sees the old folder or the new one,
never half of either: the export's artifact folder and the deploy writers' outputs both land this way."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` is renamed aside first and removed after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
