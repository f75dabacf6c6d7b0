"""The one rule for reading folders kiln did not write itself: a Hugging Face model folder from a supplier, an
artifact folder someone uploaded. Such a folder is data, not a set of instructions about the rest of the disk.

- Every path kiln takes from such a folder (a file name in `manifest.json` or `modules.json`, a tokenizer file, a
  weights file) must resolve inside the folder once symlinks are resolved; one that leads outside (an absolute path,
  `..`, a symlink to `/etc/passwd` or to a secret) is refused with one line naming it. A hash in the manifest proves
  nothing here: the supplier can hash any file the victim's machine holds.
- What kiln parses itself (manifest, tokenizer, JSON configs) is capped in size before it is read: parsing JSON costs
  several times the file's size in memory, and a folder can hold any size.
- Only regular files are read or copied: a FIFO or a device named `vocab.txt` is refused, not waited on.

The callers pass the error class of their room (`ModelSourceError` for model folders, `ManifestError` for artifact
folders), so the CLI prints `ErrorName: message` as everywhere else.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError, ManifestError, one_line

MiB = 1 << 20
# manifest.json: kiln's own are about 10 KB; a thousand times that is still not a manifest.
MAX_MANIFEST_BYTES = 8 * MiB
# tokenizer.json: MiniLM's is 0.5 MB, large multilingual ones (XLM-R, Gemma) 17-35 MB.
MAX_TOKENIZER_BYTES = 64 * MiB
# config.json, modules.json, tokenizer_config.json, sentence-transformers configs, bench.json, loadtest.json.
MAX_CONFIG_BYTES = 16 * MiB

# A model name is one path segment: it becomes a route (/v2/models/NAME/infer), a Triton folder and a file name.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MODEL_NAME_RULE = "1-128 letters, digits, '.', '_' and '-', starting with a letter, digit or '_'"

ErrorClass = type[KilnError]


def check_model_name(name: object, error: ErrorClass = ManifestError,
                     fix: str = "name the model with --name, e.g. --name my-model") -> str:
    """`name` if it is one path segment of safe characters; else `error` saying how to name it."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise error(f"model name {name!r} is not one path segment of {MODEL_NAME_RULE} (it becomes a route, a folder "
                    f"and a file name); {fix}")
    return name


def safe_name(text: str) -> str:
    """A model name made from free text (a folder's name): every run of other characters becomes '-'. A Hugging
    Face cache snapshot's folder is a revision hash: its repository (`models--ORG--NAME`) gives NAME instead."""
    folder = Path(text)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        text = folder.parent.parent.name.rsplit("--", 1)[-1]
    else:
        text = folder.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:128]
    return name if MODEL_NAME.fullmatch(name) else "model"


def snapshot_blobs(root: Path) -> tuple[Path, ...]:
    """The blobs folder of a Hugging Face cache snapshot (`models--ORG--NAME/snapshots/REV`), whose files are links
    into `models--ORG--NAME/blobs`: the one place outside a folder that a link may lead, because the cache lays one
    model out in two parts. Only that exact layout; a link must still resolve fully (every link followed) into it."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return (root.parent.parent / "blobs",)
    return ()


def inside(folder: Path, relative: str | Path, what: str, error: ErrorClass = ManifestError,
           fix: str = "copy the file into the folder") -> Path:
    """The real path of `relative` within `folder`, symlinks resolved; refused unless it stays inside the folder.

    `what` names the file for the message ("tokenizer file", "variant 'onnx-fp32'")."""
    shown = str(relative)
    if not isinstance(relative, (str, Path)) or not shown or "\x00" in shown:
        raise error(f"{what} {relative!r} is not a file name; {fix}")
    if Path(relative).is_absolute():
        raise error(f"{what} {shown!r} is an absolute path, outside the folder {str(folder)!r}; kiln reads only files "
                    f"inside the folder it is given: {fix}")
    root = Path(folder).resolve()
    resolved = (root / relative).resolve()
    if not any(resolved.is_relative_to(r) for r in (root, *snapshot_blobs(root))):
        raise error(f"{what} {str(Path(folder) / relative)!r} resolves to {str(resolved)!r}, outside the folder "
                    f"{str(root)!r}; kiln reads only files inside the folder it is given: {fix}")
    return resolved


def regular_file(folder: Path, relative: str | Path, what: str, error: ErrorClass = ManifestError,
                 fix: str = "copy the file into the folder") -> Path:
    """`inside`, and a regular file (not a folder, FIFO or device); its resolved path."""
    path = inside(folder, relative, what, error, fix)
    if not path.is_file():
        state = "is missing" if not path.exists() else "is not a regular file"
        raise error(f"{what} {str(Path(folder) / relative)!r} {state}; {fix}")
    return path


def check_tree(folder: Path, what: str, error: ErrorClass = ManifestError,
               fix: str = "copy the files into the folder") -> None:
    """Every symlink anywhere under `folder` resolves inside it: for readers kiln does not control (transformers
    loading weights, shards and configs by names it chooses), the folder is checked as a whole first."""
    root = Path(folder).resolve()
    for current, folders, files in os.walk(root, followlinks=False):
        for name in folders + files:
            path = Path(current) / name
            if path.is_symlink():
                inside(root, path.relative_to(root), what, error, fix)


def read_capped(path: Path, limit: int, what: str, error: ErrorClass = ManifestError) -> bytes:
    """The bytes of a regular file no larger than `limit`; larger (or not regular) is refused before reading.
    Non-blocking open: a FIFO in place of a file is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or one_line(exc)})") from exc
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise error(f"{what} {str(path)!r} is not a regular file")
        if status.st_size > limit:
            raise error(f"{what} {str(path)!r} is {status.st_size / MiB:,.1f} MiB, over kiln's limit of "
                        f"{limit / MiB:,.0f} MiB for such a file; it is not one kiln wrote or a model folder holds")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {str(path)!r} grew past kiln's limit of {limit / MiB:,.0f} MiB while being read")
    return data


def read_json(path: Path, limit: int, what: str, error: ErrorClass = ManifestError,
              fix: str = "re-export the folder") -> Any:
    """Parse a capped JSON file; every failure (size, encoding, syntax, nesting) is one `error`."""
    data = read_capped(path, limit, what, error)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{what} {str(path)!r} is not valid JSON ({one_line(exc, 120)}); {fix}") from exc
