"""Writing an artifact folder atomically: build in a staging folder beside the target, rename into place.

A failed or killed export never leaves a folder that looks complete: the manifest is written last, inside the
staging folder, before the rename; staging folders of exports whose process is gone are removed on the next
run; two exports to the same target are serialized by a lock on the parent folder itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kiln.core.errors import UsageError
from kiln.core.folders import swap_into_place


def check_output_folder(out: Path, force: bool) -> None:
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {str(out)!r} already exists and is not empty; pass --force to replace it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {str(parent)!r} ({exc.strerror}); choose a writable --out") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(parent)!r} is not writable; choose a writable --out")


def remove_stale_staging(out: Path) -> None:
    """Staging folders of exports that were killed (their pid is gone) are removed on the next run."""
    for folder in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(folder.name[len(f".{out.name}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Serializes the final swap when two exports target the same folder (a lock on the parent folder
    itself, so no lock file is left behind)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """A private folder beside `out`; whatever is left of it when the block ends (published or not) is removed."""
    check_output_folder(out, force)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path, force: bool) -> None:
    for path in staging.iterdir():
        path.chmod(0o644)
    staging.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
    with _folder_lock(out):
        if out.exists() and not force and any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} appeared during the export; pass --force to replace it")
        swap_into_place(staging, out)
