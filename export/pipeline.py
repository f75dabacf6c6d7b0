"""Runs an export in order: prune -> emit (and quantize) -> verify -> write the folder atomically.

Each variant's emitter comes from the variant registry, so this file never names a format. Every variant is
verified before anything is published, and every failure is collected and raised once, so one run shows all
that must be fixed.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.console import Progress, to_stderr
from kiln.core.errors import ExportError, KilnError, ToolchainMissing, UsageError, VerificationError, one_line
from kiln.core.manifest import ArtifactFile, Manifest, VariantEntry, fp32_default, library_versions, sha256_file
from kiln.core.paths import check_model_name, regular_file
from kiln.core.runtime import RuntimeOptions, open_artifact, runtime_spec
from kiln.export import prune, verify
from kiln.export.emitter import EmitJob, emitter_for, example_inputs
from kiln.export.flops import flops_record
from kiln.export.publish import publish, staging_folder
from kiln.export.recipe import Recipe
from kiln.export.variants import FORMATS, VariantSpec
from kiln.models.base import ModelBundle


def build_variant(spec: VariantSpec, bundle: ModelBundle, recipe: Recipe, sources: prune.Sources,
                  staging: Path, shared: dict[str, Any], references: dict[str | None, np.ndarray],
                  reference_accuracy: float | None, progress: Progress) -> tuple[VariantEntry, list[str]]:
    """Emit one variant into `staging`, verify it, and return its manifest entry and its failures."""
    module, prune_report = sources[spec.pruning]
    if spec.pruning not in references:
        references[spec.pruning] = verify.eager_outputs(module, bundle)
    # The file's suffix is its format's (the format's own runtime's), whichever runtime the variant names to open it.
    target = staging / f"{spec.name}{runtime_spec(FORMATS[spec.format].runtime).suffix}"
    progress(f"[kiln] emit: {spec.name}")
    started = time.perf_counter()
    result = emitter_for(spec).emit(EmitJob(spec, module, bundle, recipe, target, staging / ".scratch", shared))
    build_s = time.perf_counter() - started
    companions = [companion_of(target, path) for path in result.companions]
    runtime = open_artifact(target, spec.runtime, bundle.signature, spec.name, RuntimeOptions())
    figures = verify.measure(runtime, bundle, references[spec.pruning], references[None])
    worst = {"parity": figures.pop("parity_worst_item"), "task": figures.pop("worst_item")}
    failures = verify.check(spec.name, spec.precision, figures, reference_accuracy,
                            recipe.tolerances, bundle.task)
    failures = [f + worst_item_text(bundle, worst["parity" if "its eager model" in f else "task"])
                if "cosine_min" in f else f for f in failures]
    shown = {k: v for k, v in figures.items() if isinstance(v, float)}
    invariance = figures["batch_invariance"]
    progress(f"[kiln] verify: {spec.name}: " + ", ".join(f"{k} {v:.5g}" for k, v in shown.items())
             + f", batch invariance cosine {invariance['cosine_min']:.6f} (max abs diff {invariance['max_abs_diff']:.3g})")
    primary = ArtifactFile.of(target)
    entry = VariantEntry(
        name=spec.name, file=primary.file, format=spec.format, runtime=spec.runtime, precision=spec.precision,
        pruning=prune_report, quantization=result.quantization, bytes=primary.bytes, sha256=primary.sha256,
        **figures, parity_reference="eager fp32" if spec.pruning is None else f"eager fp32 after {spec.pruning} pruning",
        build={**result.build, "seconds": round(build_s, 2)},
        companions=[ArtifactFile.of(path).to_dict() for path in companions],
    )
    return entry, failures


def companion_of(target: Path, path: Path) -> Path:
    """A further file of the artifact at `target`, which must lie beside it as `<target's stem>.<anything>`: so a
    variant that is left out takes all its files with it (`variant_files`)."""
    path = Path(path)
    if path.parent != target.parent or not path.name.startswith(f"{target.stem}.") or not path.is_file():
        raise ExportError(f"the emitter of {target.stem} named {str(path)!r} as a file of the artifact; an artifact's "
                          f"files are written beside it as {target.stem}.<suffix>: fix the emitter")
    return path


def variant_files(staging: Path, spec: VariantSpec) -> list[Path]:
    """Every file a variant's emitter wrote (`<name>.<suffix>`: the artifact and its companions)."""
    return [p for p in staging.iterdir() if p.is_file() and p.name.startswith(f"{spec.name}.")]


def release_memory() -> None:
    """Collect what the last variant left (its module copies, export graphs, runtime sessions) and hand the freed
    heap back to the system, so the export's peak is one variant's, not the sum of all of them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is still reused by the next variant
        pass


def worst_item_text(bundle: ModelBundle, index: int) -> str:
    """The input a cosine miss was worst on, so a user sees whether real sentences or an odd string lost it."""
    texts = bundle.evaluation_texts
    if not texts or not 0 <= index < len(texts):
        return ""
    text = texts[index]
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f" (worst item #{index}: {shown!r})"


def droppable(spec: VariantSpec) -> bool:
    """Whether a recommended variant may be left out when it fails: not a format's unpruned fp32 baseline, which is
    the reference every other variant of the format is compared with (its failure means the format itself fails)."""
    return not (spec.precision == "fp32" and spec.pruning is None)


def recovery_hint(spec: VariantSpec, bundle: ModelBundle) -> str:
    """What would bring a dropped INT8 variant back: data like the user's, or a budget chosen for this model."""
    if spec.precision != "int8":
        return ""
    data = ("--data with your own texts (it was judged on built-in varied ones), or "
            if "hf_folder" in bundle.source and not bundle.source.get("data") else "")
    return (f"; to keep it: {data}a --recipe naming it with a budget chosen for this model "
            "([tolerances] int8_cosine_min)")


def leave_out(skipped: list[dict[str, str]], spec: VariantSpec, reason: str, staging: Path,
              progress: Progress) -> None:
    """Drop a recommended variant: its files go, and the manifest and report carry one line saying why."""
    for path in variant_files(staging, spec):
        path.unlink(missing_ok=True)
    progress(f"[kiln] left out: {spec.name}: {reason}")
    skipped.append({"variant": spec.name, "reason": reason})


def run_export(bundle: ModelBundle, recipe: Recipe, out: str | Path, force: bool = False,
               progress: Progress = to_stderr) -> Manifest:
    import torch

    out = Path(out).absolute()
    started = time.perf_counter()
    check_model_name(bundle.name, UsageError)  # it becomes routes, folders and file names downstream
    with staging_folder(out, force) as staging:
        try:
            torch.manual_seed(recipe.seed)
            (staging / ".scratch").mkdir()
            references: dict[str | None, np.ndarray] = {None: verify.eager_outputs(bundle.module, bundle)}
            labels = bundle.evaluation.labels if bundle.task == "classification" else None
            accuracy = verify.compare(references[None], references[None], labels, bundle.task).get("accuracy")
            if accuracy is not None:
                progress(f"[kiln] {bundle.name}: eager fp32 accuracy {accuracy * 100:.2f}% "
                         f"on {len(bundle.evaluation)} held-out items")
            flops = flops_record(bundle.module, bundle.examples(2), bundle.signature.input_names,
                                 bundle.preprocessing.get("kind") == "text")
            sources = prune.prepare_sources(bundle, recipe.pruning_needed, recipe.prune.amount,
                                            recipe.prune.fine_tune_epochs, references[None], example_inputs(bundle),
                                            progress)
            entries: list[VariantEntry] = []
            failures: list[str] = []
            skipped: list[dict[str, str]] = []
            shared: dict[str, Any] = {}
            for spec in recipe.specs:
                optional = spec.name in recipe.optional_variants
                try:
                    entry, failed = build_variant(spec, bundle, recipe, sources, staging, shared, references,
                                                  accuracy, progress)
                except ToolchainMissing as exc:  # collected: the variants that need no such tool still export
                    if optional:
                        leave_out(skipped, spec, one_line(exc), staging, progress)
                    else:
                        failures.append(f"{spec.name}: {one_line(exc)}")
                    continue
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # a proposed variant that cannot be built is left out, not fatal
                    if not (optional and droppable(spec)):
                        raise
                    leave_out(skipped, spec, f"could not be built: {one_line(exc, 300)}", staging, progress)
                    continue
                finally:  # this variant's graphs, sessions and compiled modules go before the next is built
                    release_memory()
                if failed and optional and droppable(spec):
                    leave_out(skipped, spec, "failed verification: " + "; ".join(failed)
                              + recovery_hint(spec, bundle), staging, progress)
                    continue
                entries.append(entry)
                failures += failed
            if failures:
                raise VerificationError(failures)
            if not entries:
                raise ExportError("every variant was left out (" + "; ".join(
                    f"{s['variant']}: {s['reason']}" for s in skipped) + ")")
            shutil.rmtree(staging / ".scratch")
            files = []
            for target, source in bundle.extra_files.items():
                # Regular files only, never through a symlink (the model source checked they lie in its folder).
                source = regular_file(Path(source).parent, Path(source).name, "file to copy", ExportError)
                shutil.copyfile(source, staging / target, follow_symlinks=False)
                files.append({"file": target, "sha256": sha256_file(staging / target)})
            reference: dict[str, Any] = {"variant": "eager-fp32", "items": len(bundle.evaluation)}
            if accuracy is not None:
                reference["accuracy"] = accuracy
            if bundle.data_note:
                reference["note"] = bundle.data_note
            manifest = Manifest(
                folder=staging, model=bundle.name, task=bundle.task, signature=bundle.signature,
                preprocessing=bundle.preprocessing, variants=entries,
                default_variant=fp32_default(entries) or entries[0].name, source=bundle.source,
                reference=reference, files=files, versions=library_versions(), recipe=recipe.to_dict(),
                created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                export_seconds=round(time.perf_counter() - started, 1), skipped=skipped, flops=flops,
            )
            manifest.save()
            publish(staging, out, force)
        except (KilnError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ExportError(f"export of {bundle.name!r} failed: {type(exc).__name__}: {one_line(exc, 300)}; "
                              "re-run with --verbose for the traceback") from exc
    manifest.folder = out
    return manifest
