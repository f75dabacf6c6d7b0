"""Which models one server serves, and how: the folders named on the command line, resolved to a plan per model.

`kiln serve DIR [DIR ...]` takes artifact folders (each with a manifest.json) and model repositories (a folder of
artifact folders, as a Triton model repository is a folder of model folders). Every manifest is read, every
variant chosen and its hash checked before any process starts, so a bad folder fails the whole start with one line
rather than a server that comes up missing a model.

Per-model settings (`--variant`, `--workers`, `--threads`) take a plain value for every model or `name=value`
forms for one (`--workers digits=2,minilm=1`). Unset threads share the cores: with several models each worker gets
an equal share, so two models on two cores do not each spin two threads against the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.errors import ManifestError, RuntimeUnavailable, UsageError
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


def model_folders(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """Artifact folders, with each repository expanded to the artifact folders inside it (sorted by name)."""
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / MANIFEST_NAME).is_file():
            folders.append(path)
            continue
        if not path.is_dir():
            raise ManifestError(f"{raw} is not a folder; give an artifact folder written by `kiln export` or a "
                                "repository of them")
        inside = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
        if not inside:
            raise ManifestError(f"{raw} has no {MANIFEST_NAME} and no artifact folders inside it; give a folder "
                                "written by `kiln export`, or a repository holding such folders")
        folders.extend(inside)
    return folders


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


def plan_models(config) -> list[ModelPlan]:
    """Every model the server will serve (config: serve.server.ServeConfig), checked and with its variant chosen."""
    from kiln.core.autoselect import served_variant
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import check_runnable

    folders = model_folders(config.artifact_dirs)
    manifests = [read_manifest(folder) for folder in folders]
    names = [m.model for m in manifests]
    seen: dict[str, Path] = {}
    for name, folder in zip(names, folders):
        if name in seen:
            raise UsageError(f"two folders serve a model named {name!r}: {seen[name]} and {folder}; export one with "
                             "--name to tell them apart")
        seen[name] = folder
    variant, variants = per_model(config.variant, names, "--variant")
    workers, workers_by = per_model(config.workers, names, "--workers", _positive)
    threads, threads_by = per_model(config.threads, names, "--threads", _positive)
    worker_counts = {name: workers_by.get(name, workers or 1) for name in names}
    shared = None
    if len(names) > 1 and threads is None:  # share the cores among every worker of every model
        shared = max(1, (os.cpu_count() or 1) // sum(worker_counts.values()))
    plans = []
    for index, (name, folder, manifest) in enumerate(zip(names, folders, manifests)):
        chosen = variants.get(name, variant)
        model_threads = threads_by.get(name, threads if threads is not None else shared)
        choice = served_variant(folder, manifest, chosen, model_threads, (1, min(8, config.max_batch_size)),
                                rechoose=True)
        if choice.auto is not None:
            print(f"kiln: {name}: --variant auto: {choice.entry.name} ({choice.how}, {choice.auto.seconds:.1f} s): "
                  f"{choice.reason}", flush=True)
        if choice.warning:
            print(f"kiln: warning: {name}: {choice.warning}", flush=True)
        entry = choice.entry
        _require_torch_if_needed(manifest, entry)
        check_runnable(manifest, entry.name)  # refuse a tampered or foreign artifact before any process starts
        plans.append(ModelPlan(name, str(folder.resolve()), manifest, entry, choice, worker_counts[name],
                               model_threads, index))
    return plans
