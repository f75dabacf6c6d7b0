"""Which models one server serves, and how: the folders named on the command line, resolved to a plan per model.

`kiln serve DIR [DIR ...]` takes artifact folders (each with a manifest.json) and model repositories (a folder of
artifact folders, as a Triton model repository is a folder of model folders). Every manifest is read, every
variant chosen and its hash checked before any process starts, so a bad folder fails the whole start with one line
rather than a server that comes up missing a model.

Versions (Triton's layout): a model folder `NAME/` holding numbered artifact folders `NAME/1/`, `NAME/2/` is one
model, named by the folder, whose versions are those numbers. The newest version that passes every check serves
(Triton's `latest` policy, one version); a newer one that fails is passed over with its reason (serve.control lists
it in the repository index), so one damaged upload does not keep the model from starting.

Per-model settings (`--variant`, `--workers`, `--threads`) take a plain value for every model or `name=value`
forms for one (`--workers digits=2,minilm=1`). Unset threads share the cores: with several models each worker gets
an equal share, so two models on two cores do not each spin two threads against the other.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.errors import KilnError, ManifestError, RuntimeUnavailable, UsageError, one_line
from kiln.core.manifest import MANIFEST_NAME, Manifest, VariantEntry

if TYPE_CHECKING:
    from kiln.core.autoselect import ServedVariant


@dataclass(frozen=True)
class ModelPlan:
    """One model as the server will run it."""

    name: str
    folder: str  # absolute
    manifest: Manifest
    variant: VariantEntry
    served: ServedVariant  # which variant and how it was chosen (default, forced, chosen, cached, fallback), and why
    workers: int
    threads: int | None
    index: int  # its place on the command line: names its worker socket and LitServe api_path
    version: str = "1"  # an unversioned artifact folder is version 1
    skipped: tuple[tuple[str, str], ...] = ()  # newer versions passed over at start: (version, why)


VERSION = re.compile(r"[1-9][0-9]{0,8}")  # a version folder's name, as Triton's: a positive integer


@dataclass(frozen=True)
class ModelEntry:
    """One model the command line names: an artifact folder (version 1, the manifest names the model) or a model
    folder of version folders (the folder names the model)."""

    folder: Path
    versions: tuple[tuple[str, Path], ...]  # (version, artifact folder), newest first
    name: str | None = None  # the model folder's name; None: the manifest's model name


def version_folders(path: Path) -> tuple[tuple[str, Path], ...]:
    """The numbered artifact folders inside a model folder (`NAME/1/manifest.json`), newest first."""
    try:
        found = [(p.name, p) for p in path.iterdir()
                 if VERSION.fullmatch(p.name) and (p / MANIFEST_NAME).is_file()]
    except OSError:
        return ()
    return tuple(sorted(found, key=lambda pair: -int(pair[0])))


def entry_for(path: Path) -> ModelEntry | None:
    """The model a folder holds (an artifact folder, or a model folder of versions), or None."""
    if (path / MANIFEST_NAME).is_file():
        return ModelEntry(path, (("1", path),))
    versions = version_folders(path) if path.is_dir() else ()
    return ModelEntry(path, versions, path.name) if versions else None


def model_entries(paths: tuple[str, ...] | list[str]) -> list[ModelEntry]:
    """The models the command line names, each repository expanded to the models inside it (sorted by name)."""
    entries: list[ModelEntry] = []
    for raw in paths:
        path = Path(raw)
        entry = entry_for(path)
        if entry is not None:
            entries.append(entry)
            continue
        if not path.is_dir():
            raise ManifestError(f"{raw} is not a folder; give an artifact folder written by `kiln export` or a "
                                "repository of them")
        inside = [e for e in (entry_for(p) for p in sorted(path.iterdir())) if e is not None]
        if not inside:
            raise ManifestError(f"{raw} has no {MANIFEST_NAME} and no artifact folders inside it; give a folder "
                                "written by `kiln export`, or a repository holding such folders (or model folders "
                                "of numbered versions, NAME/1/)")
        entries.extend(inside)
    return entries


def repository_roots(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """The folders a running server may load more from (model control, --poll): every repository and model folder
    on the command line, resolved. A lone artifact folder is none: nothing beside it was offered."""
    return [Path(raw).resolve() for raw in paths if not (Path(raw) / MANIFEST_NAME).is_file()]


def model_folders(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """The artifact folder of each model (its newest version), each repository expanded (sorted by name)."""
    return [entry.versions[0][1] for entry in model_entries(paths)]


def per_model(values: list[str] | str | int | None, names: list[str], option: str,
              cast=str) -> tuple[Any, dict[str, Any]]:
    """A per-model option: (the value for every model, {name: its own value}). `values` are the option's
    occurrences, each `VALUE` or `name=VALUE[,name=VALUE]`."""
    if values is None:
        return None, {}
    if not isinstance(values, list):
        values = [str(values)]
    common = None
    own: dict[str, Any] = {}
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, text = part.rpartition("=")
            try:
                parsed = cast(text)
            except ValueError:
                raise UsageError(f"{option} {part!r}: {text!r} is not a valid value") from None
            if not sep:
                common = parsed
            elif name not in names:
                raise UsageError(f"{option} {part!r} names model {name!r}; this server serves {', '.join(names)}")
            else:
                own[name] = parsed
    return common, own


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _require_torch_if_needed(manifest, entry) -> None:
    """A serve-only install (no torch) serves ONNX and OpenVINO variants: say so before any process starts."""
    from kiln.core.runtime import module_installed, needs_torch

    if not needs_torch(entry) or module_installed("torch"):
        return
    onnx = [v.name for v in manifest.variants if not needs_torch(v)]
    raise RuntimeUnavailable(
        f"variant {entry.name!r} ({entry.format}) of {manifest.model!r} loads through torch, which this serve-only "
        "install lacks; pip install 'kiln[export]'" + (f", or serve a variant that needs no torch: --variant {onnx[0]}" if onnx
                                                        else ""))


def plan_version(config, name: str, version: str, folder: Path, index: int, variant: str | None,
                 workers: int, threads: int | None, manifest: Manifest | None = None) -> ModelPlan:
    """One version of one model, checked (manifest, variant, hashes, runtime) and with its variant chosen: at start,
    and for every version a running server loads (serve.control). Raises the KilnError that refuses it."""
    from kiln.core.autoselect import served_variant
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import check_runnable

    manifest = manifest or read_manifest(folder)
    choice = served_variant(folder, manifest, variant, threads, (1, min(8, config.max_batch_size)), rechoose=True)
    if choice.auto is not None:
        print(f"kiln: {name}: --variant auto: {choice.entry.name} ({choice.how}, {choice.auto.seconds:.1f} s): "
              f"{choice.reason}", flush=True)
    if choice.warning:
        print(f"kiln: warning: {name}: {choice.warning}", flush=True)
    entry = choice.entry
    _require_torch_if_needed(manifest, entry)
    check_runnable(manifest, entry.name)  # refuse a tampered or foreign artifact before any process starts
    return ModelPlan(name, str(folder.resolve()), manifest, entry, choice, workers, threads, index, version)


class Settings:
    """The per-model options of one server (--variant, --workers, --threads) for any model name it may serve."""

    def __init__(self, config, names: list[str]) -> None:
        self.config = config
        self.variant, self.variants = per_model(config.variant, names, "--variant")
        workers, self.workers_by = per_model(config.workers, names, "--workers", _positive)
        self.workers = workers or 1
        self.threads, self.threads_by = per_model(config.threads, names, "--threads", _positive)
        self.shared = None
        counts = [self.workers_by.get(name, self.workers) for name in names]
        if len(names) > 1 and self.threads is None:  # share the cores among every worker of every model
            self.shared = max(1, (os.cpu_count() or 1) // sum(counts))

    def of(self, name: str) -> tuple[str | None, int, int | None]:
        """(variant, workers, threads) for the model `name`."""
        threads = self.threads_by.get(name, self.threads if self.threads is not None else self.shared)
        return self.variants.get(name, self.variant), self.workers_by.get(name, self.workers), threads


def plan_models(config) -> list[ModelPlan]:
    """Every model the server will serve (config: serve.server.ServeConfig), checked and with its variant chosen."""
    from kiln.core.manifest import read_manifest

    entries = model_entries(config.artifact_dirs)
    manifests: list[Manifest | None] = [None if e.name else read_manifest(e.folder) for e in entries]
    names = [m.model if m is not None else str(e.name) for e, m in zip(entries, manifests)]
    seen: dict[str, Path] = {}
    for name, entry in zip(names, entries):
        if name in seen:
            raise UsageError(f"two folders serve a model named {name!r}: {seen[name]} and {entry.folder}; export one "
                             "with --name to tell them apart")
        seen[name] = entry.folder
    settings = Settings(config, names)
    plans = []
    for index, (name, entry, manifest) in enumerate(zip(names, entries, manifests)):
        variant, workers, threads = settings.of(name)
        skipped: list[tuple[str, str]] = []
        for version, folder in entry.versions:
            try:
                plan = plan_version(config, name, version, folder, index, variant, workers, threads, manifest)
                break
            except KilnError as error:
                if version == entry.versions[-1][0]:
                    raise  # no version of the model can serve: the start fails with the oldest one's reason
                skipped.append((version, one_line(error)))
                print(f"kiln: warning: {name} version {version} is passed over: {one_line(error)}", flush=True)
        plans.append(dataclasses.replace(plan, skipped=tuple(skipped)))
    return plans
