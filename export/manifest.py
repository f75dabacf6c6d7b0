"""manifest.json: the one file a server trusts about an artifact folder.

It records what each artifact is (format, runtime, precision, pruning, quantization), how to feed
it (signature, preprocessing), that it is intact (bytes, sha256) and how good it is (measured
parity and accuracy). Reading checks structure; `verify_file` checks integrity before a load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.models.errors import IntegrityError, ManifestError
from kiln.models.signature import Signature

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "model", "task", "signature", "preprocessing", "variants", "default_variant")
VARIANT_KEYS = ("name", "file", "format", "runtime", "precision", "pruning", "quantization", "bytes", "sha256")


LIBRARIES = ("kiln", "torch", "onnxruntime", "onnx", "numpy")


def library_versions() -> dict:
    """Installed versions, read from package metadata (no import of torch or onnxruntime needed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fp32_default(variants: list[dict]) -> str | None:
    """The default before any speed is measured: unpruned ONNX fp32, else any unpruned fp32 (the export's
    reference numbers, never a lossy variant chosen without a benchmark)."""
    for wanted in ("onnx", None):
        for entry in variants:
            if entry["precision"] == "fp32" and not entry.get("pruning") and wanted in (None, entry["format"]):
                return entry["name"]
    return None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private; keep the target's mode (or 0644) so a server user can read it.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    folder: Path
    data: dict

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def signature(self) -> Signature:
        return Signature.from_dict(self.data["signature"])

    @property
    def preprocessing(self) -> dict:
        return self.data["preprocessing"]

    @property
    def variants(self) -> dict[str, dict]:
        return {v["name"]: v for v in self.data["variants"]}

    @property
    def default_variant(self) -> str:
        return self.data["default_variant"]

    @property
    def source(self) -> dict:
        return self.data.get("source", {})

    def variant(self, name: str | None = None) -> dict:
        name = name or self.default_variant
        variants = self.variants
        if name not in variants:
            raise ManifestError(
                f"variant {name!r} is not in {self.folder / MANIFEST_NAME}; choose one of {', '.join(variants)}"
            )
        return variants[name]

    def path_of(self, variant: dict) -> Path:
        return self.folder / variant["file"]

    def verify_file(self, name: str | None = None) -> Path:
        """Check the variant's file against its recorded size and sha256; return its path."""
        variant = self.variant(name)
        path = self.path_of(variant)
        if not path.is_file():
            raise IntegrityError(f"artifact {variant['file']!r} of variant {variant['name']!r} is missing; re-export the folder")
        size = path.stat().st_size
        if size != variant["bytes"] or sha256_file(path) != variant["sha256"]:
            raise IntegrityError(
                f"artifact {variant['file']!r} of variant {variant['name']!r} does not match its sha256 in the "
                "manifest (changed or truncated since export); re-export the folder and do not edit artifacts"
            )
        for extra in self.data.get("files", []):
            extra_path = self.folder / extra["file"]
            if not extra_path.is_file() or sha256_file(extra_path) != extra["sha256"]:
                raise IntegrityError(
                    f"file {extra['file']!r} does not match its sha256 in the manifest; re-export the folder"
                )
        return path

    def save(self) -> None:
        write_json_atomic(self.folder / MANIFEST_NAME, self.data)


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"artifact folder {str(folder)!r} does not exist; run `kiln export` first")
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} has no {MANIFEST_NAME}; point at a folder written by `kiln export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-export the folder") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; re-export the folder")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}; re-export the folder with this kiln")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {data['schema_version']!r}, this kiln reads {SCHEMA_VERSION}; re-export"
        )
    if not isinstance(data["variants"], list) or not data["variants"]:
        raise ManifestError(f"{path} lists no variants; re-export the folder")
    for variant in data["variants"]:
        lacking = [k for k in VARIANT_KEYS if not isinstance(variant, dict) or k not in variant]
        if lacking:
            raise ManifestError(f"a variant in {path} lacks {', '.join(lacking)}; re-export the folder")
        if Path(variant["file"]).is_absolute() or ".." in Path(variant["file"]).parts:
            raise ManifestError(f"variant {variant['name']!r} points outside its folder; re-export the folder")
    manifest = Manifest(folder, data)
    if manifest.default_variant not in manifest.variants:
        raise ManifestError(f"{path}: default_variant {manifest.default_variant!r} is not among its variants")
    try:
        manifest.signature
    except Exception as exc:
        raise ManifestError(f"{path} has a malformed signature ({exc}); re-export the folder") from exc
    return manifest
