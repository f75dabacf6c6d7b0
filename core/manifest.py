"""manifest.json: the one file that bench, serve and deploy trust about an artifact folder.

It records what each artifact is (format, runtime, precision, pruning, quantization), how to feed
it (signature, preprocessing), that it is intact (bytes, sha256 of each of its files) and how good it is (measured
parity and accuracy). This module is the only place the schema is defined, written and validated:
`Manifest` and `VariantEntry` are typed views of the JSON, `read_manifest` checks structure and
`verify_file` checks integrity before a load. Keys this kiln does not know are kept in `extra` and
written back unchanged, so a newer kiln's fields survive a `--select` by an older one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.core.errors import IntegrityError, ManifestError
from kiln.core.paths import MAX_MANIFEST_BYTES, check_model_name, inside, read_capped, read_json, regular_file
from kiln.core.signature import Signature

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
LIBRARIES = ("kiln", "torch", "onnxruntime", "onnx", "numpy")
EAGER = "eager-fp32"  # the name of the eager PyTorch fp32 baseline wherever variants are listed beside it
REEXPORT = "re-export the folder with `kiln export`"


def library_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (no import of torch or onnxruntime needed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
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


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
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


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "folder"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a variant, as the manifest records it: a name inside the folder, its sha256 and its size."""

    file: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> "ArtifactFile":
        return cls(path.name, sha256_file(path), path.stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


@dataclass
class VariantEntry:
    """One artifact in the folder and the figures its verification measured.

    An artifact may be several files: `file` (with `bytes` and `sha256`) is the one its runtime opens, and
    `companions` the others it reads beside it ({file, sha256, bytes} each; an OpenVINO model's weights `.bin`
    beside its `.xml`). A one-file variant has none and writes no `companions` key, as before there were any."""

    name: str
    file: str
    format: str
    runtime: str
    precision: str
    pruning: dict[str, Any] | None
    quantization: dict[str, Any] | None
    bytes: int
    sha256: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    parity_cosine_min: float | None = None
    cosine_min: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    parity_reference: str | None = None
    evaluation_items: int | None = None
    # How much an item's answer depends on its batch: {"cosine_min", "max_abs_diff", "items", "batch"}.
    batch_invariance: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    companions: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("name", "file", "format", "runtime", "precision", "pruning", "quantization", "bytes", "sha256")

    @property
    def artifact_files(self) -> list[ArtifactFile]:
        """Every file of the variant, the one its runtime opens first."""
        return [ArtifactFile(self.file, self.sha256, self.bytes),
                *(ArtifactFile(c["file"], c["sha256"], c["bytes"]) for c in self.companions)]

    @property
    def total_bytes(self) -> int:
        """The size of every file of the variant (an OpenVINO model's weights are in its `.bin`, not its `.xml`)."""
        return sum(f.bytes for f in self.artifact_files)

    @property
    def pruning_method(self) -> str | None:
        return (self.pruning or {}).get("method")

    @property
    def quantization_mode(self) -> str | None:
        return (self.quantization or {}).get("mode")

    @property
    def figures(self) -> dict[str, float]:
        """The verification figures that were measured (absent ones left out), for reports."""
        names = ("accuracy", "cosine_min", "parity_cosine_min", "top1_agreement", "max_abs_error", "max_rel_error")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        optional = ("max_rel_error", "parity_cosine_min", "top1_agreement", "accuracy", "parity_reference",
                    "evaluation_items", "max_abs_error", "cosine_min", "batch_invariance")
        data = {k: v for k, v in data.items() if not (k in optional and v is None)}
        if not self.companions:  # a one-file variant is written as before variants could have more
            del data["companions"]
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VariantEntry":
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class Preprocessing:
    """The fields of the manifest's `preprocessing` record that kiln acts on, read in one place. The record itself
    stays as written (`Manifest.preprocessing`): sources add fields only people read (a description, the pooling)."""

    kind: str | None = None  # "text": requests carry raw strings that `tokenizer` turns into the signature's inputs
    tokenizer: str | None = None  # a file listed in the manifest's `files`
    max_length: int | None = None  # None: kiln.core.preprocessing.DEFAULT_MAX_LENGTH

    @property
    def is_text(self) -> bool:
        return self.kind == "text"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Preprocessing":
        return cls(record.get("kind"), record.get("tokenizer"), record.get("max_length"))


@dataclass
class Manifest:
    """A typed view of manifest.json; `folder` is where it was read from (or will be written)."""

    folder: Path
    model: str
    task: str
    signature: Signature
    preprocessing: dict[str, Any]
    variants: list[VariantEntry]
    default_variant: str
    source: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, str]] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    export_seconds: float | None = None
    selection: dict[str, Any] | None = None
    # Recommended variants left out, each {"variant", "reason"}: no toolchain here, not buildable, or verification missed.
    skipped: list[dict[str, str]] = field(default_factory=list)
    flops: dict[str, Any] | None = None  # eager FLOPs per item and the shape counted at (kiln.export.flops)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("schema_version", "model", "task", "signature", "preprocessing", "variants", "default_variant")

    @property
    def preprocessing_spec(self) -> Preprocessing:
        return Preprocessing.from_record(self.preprocessing)

    @property
    def is_text(self) -> bool:
        """Whether requests carry raw text that the manifest's tokenizer turns into the signature's inputs."""
        return self.preprocessing_spec.is_text

    @property
    def reference_accuracy(self) -> float | None:
        """Eager fp32's held-out accuracy, for classifiers measured on labelled data; None otherwise."""
        return self.reference.get("accuracy")

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str | None = None) -> VariantEntry:
        name = name or self.default_variant
        for entry in self.variants:
            if entry.name == name:
                return entry
        raise ManifestError(
            f"variant {name!r} is not in {self.folder / MANIFEST_NAME}; choose one of {', '.join(self.variant_names)}"
        )

    def path_of(self, variant: VariantEntry) -> Path:
        """The variant's file (the one its runtime opens), symlinks resolved; refused when that leads outside the
        folder (kiln.core.paths)."""
        return inside(self.folder, variant.file, f"the file of variant {variant.name!r}", fix=REEXPORT)

    def paths_of(self, variant: VariantEntry) -> list[Path]:
        """Every file of the variant (`path_of` first), each symlink-resolved and refused outside the folder."""
        return [self.path_of(variant), *(inside(self.folder, c.file, f"a file of variant {variant.name!r}",
                                               fix=REEXPORT) for c in variant.artifact_files[1:])]

    def listed(self, relative: str) -> dict[str, str]:
        """The `files` entry of a file the manifest relies on besides the variants (the tokenizer)."""
        for extra in self.files:
            if extra["file"] == relative:
                return extra
        raise IntegrityError(f"{str(self.folder / MANIFEST_NAME)!r} relies on {relative!r} but does not list it in "
                             "`files` with its sha256, so it cannot be checked; re-export the folder")

    def read_listed(self, relative: str, limit: int, what: str) -> bytes:
        """The bytes of a file listed in `files`, read once, size-capped and checked against its sha256: the bytes
        checked are the bytes used."""
        entry = self.listed(relative)
        path = regular_file(self.folder, relative, what, fix=REEXPORT)
        data = read_capped(path, limit, what)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{what} {relative!r} does not match its sha256 in the manifest; re-export the folder")
        return data

    def verify_file(self, name: str | None = None) -> Path:
        """Check each of the variant's files against its recorded size and sha256, every listed file against its
        sha256, and that the tokenizer parses: what a server, a bench or a deploy writer is about to use. Returns the
        path of the file its runtime opens."""
        variant = self.variant(name)
        paths = self.paths_of(variant)
        for path, recorded in zip(paths, variant.artifact_files, strict=True):
            if not path.is_file():
                raise IntegrityError(f"artifact {recorded.file!r} of variant {variant.name!r} is missing; "
                                     "re-export the folder")
            if path.stat().st_size != recorded.bytes or sha256_file(path) != recorded.sha256:
                raise IntegrityError(
                    f"artifact {recorded.file!r} of variant {variant.name!r} does not match its sha256 in the "
                    "manifest (changed or truncated since export); re-export the folder and do not edit artifacts"
                )
        for extra in self.files:
            extra_path = inside(self.folder, extra["file"], "listed file", fix=REEXPORT)
            if not extra_path.is_file() or sha256_file(extra_path) != extra["sha256"]:
                raise IntegrityError(
                    f"file {extra['file']!r} does not match its sha256 in the manifest; re-export the folder"
                )
        if self.is_text:
            from kiln.core.preprocessing import text_preprocessor

            text_preprocessor(self)  # a damaged tokenizer is refused here, as one line, before anything starts
        return paths[0]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model": self.model,
            "task": self.task,
            "created": self.created,
            "signature": self.signature.to_dict(),
            "preprocessing": self.preprocessing,
            "source": self.source,
            "reference": self.reference,
            "variants": [v.to_dict() for v in self.variants],
            "default_variant": self.default_variant,
            "files": self.files,
            "versions": self.versions,
            "recipe": self.recipe,
            "export_seconds": self.export_seconds,
        }
        if self.selection is not None:
            data["selection"] = self.selection
        if self.skipped:
            data["skipped"] = self.skipped
        if self.flops is not None:
            data["flops"] = self.flops
        return {**{k: v for k, v in data.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, folder: Path, data: dict[str, Any]) -> "Manifest":
        known, extra = _split_known(cls, data)
        known["signature"] = Signature.from_dict(known["signature"])
        known["variants"] = [VariantEntry.from_dict(v) for v in known["variants"]]
        return cls(folder=Path(folder), **known, extra=extra)

    def save(self) -> None:
        write_json_atomic(self.folder / MANIFEST_NAME, self.to_dict())


def fp32_default(variants: list[VariantEntry]) -> str | None:
    """The default before any speed is measured: unpruned ONNX fp32, else any unpruned fp32 (the export's
    reference numbers, never a lossy variant chosen without a benchmark)."""
    for wanted in ("onnx", None):
        for entry in variants:
            if entry.precision == "fp32" and not entry.pruning and wanted in (None, entry.format):
                return entry.name
    return None


def _check_relative(text: object, what: str, path: Path) -> None:
    """A file name the manifest gives: relative, no '..', no NUL; where symlinks lead is checked where it is read."""
    if (not isinstance(text, str) or not text or "\x00" in text or Path(text).is_absolute()
            or ".." in Path(text).parts):
        raise ManifestError(f"{what} {text!r} in {path} points outside its folder (only plain relative names inside "
                            "the folder are read); re-export the folder")


def read_manifest(folder: str | Path) -> Manifest:
    """manifest.json, size-capped and checked for structure: every file it names stays inside the folder, every
    file it relies on is listed with its sha256, and the model name is one path segment."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"artifact folder {str(folder)!r} does not exist; run `kiln export` first")
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} has no {MANIFEST_NAME}; point at a folder written by `kiln export`")
    data = read_json(regular_file(folder, MANIFEST_NAME, "manifest", fix=REEXPORT), MAX_MANIFEST_BYTES, "manifest",
                     fix=REEXPORT)
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; re-export the folder")
    missing = [k for k in Manifest.REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}; re-export the folder with this kiln")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {data['schema_version']!r}, this kiln reads {SCHEMA_VERSION}; re-export"
        )
    check_model_name(data["model"], ManifestError, "re-export the folder with `kiln export ... --name NAME`, e.g. "
                     "--name my-model")
    if not isinstance(data["variants"], list) or not data["variants"]:
        raise ManifestError(f"{path} lists no variants; re-export the folder")
    for variant in data["variants"]:
        lacking = [k for k in VariantEntry.REQUIRED if not isinstance(variant, dict) or k not in variant]
        if lacking:
            raise ManifestError(f"a variant in {path} lacks {', '.join(lacking)}; re-export the folder")
        if not isinstance(variant["file"], str) or not isinstance(variant["name"], str):
            raise ManifestError(f"a variant in {path} has a non-string name or file; re-export the folder")
        _check_relative(variant["file"], f"the file of variant {variant['name']!r}", path)
        companions = variant.get("companions", [])
        if not isinstance(companions, list) or not all(
                isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("sha256"), str)
                and isinstance(c.get("bytes"), int) for c in companions):
            raise ManifestError(f"variant {variant['name']!r} in {path}: companions is not a list of "
                                "{file, sha256, bytes}; re-export the folder")
        for companion in companions:
            _check_relative(companion["file"], f"a file of variant {variant['name']!r}", path)
    files = data.get("files", [])
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("sha256"), str) for f in files):
        raise ManifestError(f"{path}: files is not a list of {{file, sha256}}; re-export the folder")
    for extra in files:
        _check_relative(extra["file"], "listed file", path)
    if not isinstance(data["preprocessing"], dict):
        raise ManifestError(f"{path}: preprocessing is not an object; re-export the folder")
    preprocessing = Preprocessing.from_record(data["preprocessing"])
    if preprocessing.is_text:
        tokenizer = preprocessing.tokenizer
        _check_relative(tokenizer, "preprocessing.tokenizer", path)
        if tokenizer not in {f["file"] for f in files}:
            raise ManifestError(f"preprocessing.tokenizer {tokenizer!r} in {path} is not listed in `files` with its "
                                "sha256, so it cannot be checked before use; re-export the folder")
    try:
        manifest = Manifest.from_dict(folder, data)
    except Exception as exc:
        raise ManifestError(f"{path} has a malformed signature or entry ({exc}); re-export the folder") from exc
    if manifest.default_variant not in manifest.variant_names:
        raise ManifestError(f"{path}: default_variant {manifest.default_variant!r} is not among its variants")
    return manifest
