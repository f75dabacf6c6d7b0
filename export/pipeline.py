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
from kiln.core.manifest import Manifest, VariantEntry, fp32_default, library_versions, sha256_file
from kiln.core.paths import check_model_name, regular_file
from kiln.core.runtime import RuntimeOptions, open_artifact, runtime_spec
from kiln.export import prune, verify
from kiln.export.emitter import EmitJob, emitter_for, example_inputs
from kiln.export.flops import flops_record
from kiln.export.publish import publish, staging_folder
from kiln.export.recipe import Recipe
from kiln.export.variants import VariantSpec
from kiln.models.base import ModelBundle


def build_variant(spec: VariantSpec, bundle: ModelBundle, recipe: Recipe, sources: prune.Sources,
                  staging: Path, shared: dict[str, Any], references: dict[str | None, np.ndarray],
                  reference_accuracy: float | None, progress: Progress) -> tuple[VariantEntry, list[str]]:
    """Emit one variant into `staging`, verify it, and return its manifest entry and its failures."""
    module, prune_report = sources[spec.pruning]
    if spec.pruning not in references:
        references[spec.pruning] = verify.eager_outputs(module, bundle)
    target = staging / f"{spec.name}{runtime_spec(spec.runtime).suffix}"
    progress(f"[kiln] emit: {spec.name}")
    started = time.perf_counter()
    result = emitter_for(spec).emit(EmitJob(spec, module, bundle, recipe, target, staging / ".scratch", shared))
    build_s = time.perf_counter() - started
    runtime = open_artifact(target, spec.runtime, bundle.signature, spec.name, RuntimeOptions())
    figures = verify.measure(runtime, bundle, references[spec.pruning], references[None])
    failures = verify.check(spec.name, spec.precision, figures, reference_accuracy,
                            recipe.tolerances, bundle.task)
    shown = {k: v for k, v in figures.items() if isinstance(v, float)}
    invariance = figures["batch_invariance"]
    progress(f"[kiln] verify: {spec.name}: " + ", ".join(f"{k} {v:.5g}" for k, v in shown.items())
             + f", batch invariance cosine {invariance['cosine_min']:.6f} (max abs diff {invariance['max_abs_diff']:.3g})")
    entry = VariantEntry(
        name=spec.name, file=target.name, format=spec.format, runtime=spec.runtime, precision=spec.precision,
        pruning=prune_report, quantization=result.quantization, bytes=target.stat().st_size,
        sha256=sha256_file(target), **figures,
        parity_reference="eager fp32" if spec.pruning is None else f"eager fp32 after {spec.pruning} pruning",
        build={**result.build, "seconds": round(build_s, 2)},
    )
    return entry, failures


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
            entries, failures, skipped, shared = [], [], [], {}
            for spec in recipe.specs:
                try:
                    entry, failed = build_variant(spec, bundle, recipe, sources, staging, shared, references,
                                                  accuracy, progress)
                except ToolchainMissing as exc:  # collected: the variants that need no such tool still export
                    if spec.name in recipe.optional_variants:
                        progress(f"[kiln] skip: {spec.name}: {exc}")
                        skipped.append({"variant": spec.name, "reason": one_line(exc)})
                    else:
                        failures.append(f"{spec.name}: {one_line(exc)}")
                    continue
                entries.append(entry)
                failures += failed
            if failures:
                raise VerificationError(failures)
            if not entries:
                raise ExportError("every variant was skipped (" + "; ".join(s["reason"] for s in skipped) + ")")
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
