"""Runs an export in order: prune -> emit -> quantize -> verify -> write the folder atomically.

Everything is built in a temporary folder beside the target and renamed into place only when
every variant has passed verification, so a failed or killed export never leaves a folder that
looks complete. The manifest is written last, inside the temporary folder, before the rename.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.export import verify
from kiln.export.manifest import SCHEMA_VERSION, Manifest, fp32_default, library_versions, sha256_file
from kiln.export.recipe import Recipe
from kiln.models.base import ModelBundle
from kiln.models.errors import ExportError, KilnError, UsageError, VerificationError

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
def _folder_lock(out: Path):
    """Serializes the final swap when two exports target the same folder (a lock on the parent folder
    itself, so no lock file is left behind)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _publish(staging: Path, out: Path, force: bool) -> None:
    with _folder_lock(out):
        if out.exists():
            if not force and any(out.iterdir()):
                raise UsageError(f"--out {str(out)!r} appeared during the export; pass --force to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)


def _torch_inputs(bundle: ModelBundle, batch: int) -> tuple:
    import torch

    examples = bundle.examples(batch)
    return tuple(torch.from_numpy(np.ascontiguousarray(examples[n])) for n in bundle.signature.input_names)


def _eager_outputs(module, bundle: ModelBundle) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for batch in bundle.evaluation.batches(64):
            args = [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])) for n in bundle.signature.input_names]
            out = module(*args)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(out.float().numpy())
    return np.concatenate(outs)


def run_export(bundle: ModelBundle, recipe: Recipe, out: str | Path, force: bool = False,
               progress: Progress = _stderr) -> Manifest:
    import torch

    from kiln.export import emit_onnx, emit_torchscript, prune, quantize
    from kiln.export.runtime import open_artifact, run_batched

    out = Path(out).absolute()
    check_output_folder(out, force)
    torch.manual_seed(recipe.seed)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    scratch = staging / ".scratch"
    scratch.mkdir()
    started = time.perf_counter()
    try:
        labels = bundle.evaluation.labels if bundle.task == "classification" else None
        reference = _eager_outputs(bundle.module, bundle)
        reference_figures = verify.compare(reference, reference, labels, bundle.task)
        reference_accuracy = reference_figures.get("accuracy")
        if reference_accuracy is not None:
            progress(f"[kiln] {bundle.name}: eager fp32 accuracy {reference_accuracy * 100:.2f}% "
                     f"on {len(bundle.evaluation)} held-out items")

        sources: dict[str | None, tuple[object, dict | None]] = {None: (bundle.module, None)}
        example = _torch_inputs(bundle, 2)
        if "structured" in recipe.pruning_needed:
            progress(f"[kiln] prune: structured, {recipe.prune.amount:.0%} of channels")
            pruned, report = prune.prune_structured(bundle.module, example, recipe.prune.amount)
            report["accuracy_before_fine_tune"] = verify.compare(
                reference, _eager_outputs(pruned, bundle), labels, bundle.task).get("accuracy")
            if recipe.prune.fine_tune_epochs:
                if bundle.fine_tune is None:
                    raise UsageError(
                        f"structured pruning of {bundle.name!r} needs fine-tuning data, which this model lacks; "
                        "set prune.fine_tune_epochs = 0 or drop the pruned variants"
                    )
                progress(f"[kiln] fine-tune: {recipe.prune.fine_tune_epochs} epoch(s) to recover accuracy")
                bundle.fine_tune(pruned, recipe.prune.fine_tune_epochs)
            report["fine_tune_epochs"] = recipe.prune.fine_tune_epochs
            pruned.eval()
            sources["structured"] = (pruned, report)
            progress(f"[kiln] prune: params {report['params_before']:,} -> {report['params_after']:,}, "
                     f"MACs {report['macs_before']:,} -> {report['macs_after']:,}")
        if "unstructured" in recipe.pruning_needed:
            import copy

            sparse = copy.deepcopy(bundle.module)
            report = prune.prune_unstructured_(sparse, recipe.prune.amount)
            sparse.eval()
            sources["unstructured"] = (sparse, report)
            progress(f"[kiln] prune: unstructured, sparsity {report['sparsity']:.1%} ({prune.UNSTRUCTURED_NOTE})")

        onnx_base: dict[str | None, tuple[Path, dict]] = {}
        source_outputs: dict[str | None, np.ndarray] = {None: reference}

        def onnx_fp32(pruning: str | None) -> tuple[Path, dict]:
            if pruning in onnx_base:
                return onnx_base[pruning]
            module = sources[pruning][0]
            if pruning is None and bundle.onnx_module_factory is not None:
                module = bundle.onnx_module_factory()
            raw = scratch / f"{pruning or 'base'}.raw.onnx"
            optimized = scratch / f"{pruning or 'base'}.opt.onnx"
            try:
                info = emit_onnx.export_onnx(module, _torch_inputs(bundle, 2), raw, bundle.signature, recipe.opset)
                info.update(emit_onnx.optimize_onnx(raw, optimized, bundle.onnx_optimizer or None))
            except Exception as exc:
                raise ExportError(f"ONNX export of {bundle.name!r} failed: {exc}; "
                                  "check that the model is traceable, or export only TorchScript variants") from exc
            onnx_base[pruning] = (optimized, info)
            return onnx_base[pruning]

        entries, failures = [], []
        for name in recipe.variants:
            fmt, precision, quantization, pruning = recipe.spec(name)
            if quantization == "auto":
                quantization = bundle.int8_mode
            if pruning not in sources:
                raise ExportError(f"no pruned model for {name}")  # pragma: no cover - guarded by the recipe
            module, prune_report = sources[pruning]
            if pruning not in source_outputs:
                source_outputs[pruning] = _eager_outputs(module, bundle)
            progress(f"[kiln] emit: {name}")
            t0 = time.perf_counter()
            quant_info = None
            if fmt == "torchscript":
                file_name = f"{name}.pt"
                try:
                    info = emit_torchscript.emit_torchscript(module, _torch_inputs(bundle, 2),
                                                             staging / file_name, precision)
                except Exception as exc:
                    raise ExportError(f"TorchScript export of {name} failed: {' '.join(str(exc).split())[:300]}; "
                                      "make the model traceable or drop TorchScript variants") from exc
                runtime_name = "torchscript"
            else:
                file_name = f"{name}.onnx"
                base, info = onnx_fp32(pruning)
                info = dict(info)
                try:
                    if quantization == "static":
                        quant_info = quantize.quantize_static_(base, staging / file_name, bundle.calibration,
                                                              bundle.signature.input_names)
                    elif quantization == "dynamic":
                        quant_info = quantize.quantize_dynamic_(base, staging / file_name,
                                                               keep_fp32=bundle.int8_keep_fp32)
                    else:
                        shutil.copyfile(base, staging / file_name)
                except Exception as exc:
                    raise ExportError(f"quantization of {name} failed: {' '.join(str(exc).split())[:300]}; "
                                      "drop the INT8 variant or try onnx-int8-dynamic") from exc
                if quant_info is not None:
                    quant_info["int8_nodes"] = quantize.int8_node_counts(staging / file_name)
                runtime_name = "onnxruntime"
            build_s = time.perf_counter() - t0
            runtime = open_artifact(staging / file_name, runtime_name, bundle.signature, name, threads=None)
            outputs = run_batched(runtime, bundle.evaluation.inputs)[bundle.signature.output_names[0]]
            # Parity: against the eager module this artifact was made from (the pruned one, for pruned variants).
            # Task figures: against the original eager fp32 model, so every variant is judged on the same scale.
            parity = verify.compare(source_outputs[pruning], outputs, labels, bundle.task)
            task = verify.compare(reference, outputs, labels, bundle.task)
            figures = {
                "max_abs_error": parity["max_abs_error"],
                "max_rel_error": parity["max_rel_error"],
                "parity_cosine_min": parity["cosine_min"],
                "cosine_min": task["cosine_min"],
            }
            if "top1_agreement" in parity:
                figures["top1_agreement"] = parity["top1_agreement"]
            if "accuracy" in task:
                figures["accuracy"] = task["accuracy"]
            failures += verify.check(name, precision, figures, reference_accuracy, recipe.tolerances, bundle.task)
            summary = ", ".join(f"{k} {v:.5g}" for k, v in figures.items())
            progress(f"[kiln] verify: {name}: {summary}")
            path = staging / file_name
            entries.append({
                "name": name,
                "file": file_name,
                "format": fmt,
                "runtime": runtime_name,
                "precision": precision,
                "pruning": prune_report,
                "quantization": quant_info,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                **figures,
                "parity_reference": "eager fp32" if pruning is None else f"eager fp32 after {pruning} pruning",
                "evaluation_items": parity["items"],
                "build": {**info, "seconds": round(build_s, 2)},
            })
        if failures:
            raise VerificationError(failures)

        shutil.rmtree(scratch)
        files = []
        for target, source in bundle.extra_files.items():
            shutil.copyfile(source, staging / target)
            files.append({"file": target, "sha256": sha256_file(staging / target)})
        default = fp32_default(entries) or entries[0]["name"]
        data = {
            "schema_version": SCHEMA_VERSION,
            "model": bundle.name,
            "task": bundle.task,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "signature": bundle.signature.to_dict(),
            "preprocessing": bundle.preprocessing,
            "source": bundle.source,
            "reference": {"variant": "eager-fp32", **{k: v for k, v in reference_figures.items()
                                                    if k in ("accuracy", "items")}},
            "variants": entries,
            "default_variant": default,
            "files": files,
            "versions": library_versions(),
            "recipe": recipe.to_dict(),
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        manifest = Manifest(staging, data)
        manifest.save()
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
        _publish(staging, out, force)
        return Manifest(out, data)
    except KilnError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise ExportError(f"export of {bundle.name!r} failed: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}; re-run with --verbose for the traceback") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
