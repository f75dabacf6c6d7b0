"""kiln: from a trained PyTorch model to a fast, verified HTTP endpoint.

The Python API is the command line's, without the parsing:

    import kiln, numpy as np
    manifest = kiln.export_model("digits", "artifacts/digits")
    runtime = kiln.load("artifacts/digits", threads=2)       # the manifest's default variant, hash-checked
    outputs = runtime.run({"image": np.zeros((4, 1, 8, 8), np.float32)})   # checked against the signature
    report = kiln.bench("artifacts/digits", batch_sizes=(1, 16))

Heavy libraries (torch, ONNX Runtime) are imported by the functions that need them, so `import kiln` is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.core.errors import (
    BenchmarkError,
    DataError,
    ExportError,
    IntegrityError,
    InvalidInput,
    KilnError,
    ManifestError,
    ModelSourceError,
    RecipeError,
    RuntimeUnavailable,
    UsageError,
    VerificationError,
)

if TYPE_CHECKING:
    from kiln.core.console import Progress
    from kiln.core.manifest import Manifest
    from kiln.core.runtime import Runtime


def export_model(model: str, out: str | Path, *, variants: list[str] | None = None,
                 recipe: str | Path | None = None, checkpoint: str | Path | None = None,
                 inputs: list[str] | None = None, outputs: list[str] | None = None, data: str | Path | None = None,
                 name: str | None = None, task: str | None = None, select: bool | None = None, force: bool = False,
                 progress: "Progress | None" = None, **options: Any) -> "Manifest":
    """`kiln export`: a zoo name, a Hugging Face model folder or `package.module:factory` to a verified artifact
    folder; returns its manifest.

    `options` are the recipe's other flags (`opset`, `prune="structured:0.5"`, `fine_tune_epochs`,
    `max_accuracy_drop`, `min_cosine`, `min_batch_invariance`, `accept_unstable`). The export ends by making the
    fastest variant within budget on this machine the default: by default a bounded measurement (a few seconds per
    variant) whose failure or instability keeps the fp32 default and says so, never failing the export;
    `select=True` measures as `kiln bench --select` does and fails (UnstableMeasurement) when the rounds disagree;
    `select=False` keeps the fp32 default unmeasured.
    """
    from kiln.core.console import to_stderr
    from kiln.core.manifest import read_manifest
    from kiln.export.pipeline import run_export
    from kiln.export.recipe import build_recipe
    from kiln.models.registry import resolve

    progress = progress or to_stderr
    bundle = resolve(model, checkpoint, inputs, outputs, data, name, task)
    built = build_recipe(bundle.hints.recommended_variants, recipe, variants=variants, select=select is not False,
                         model_defaults=bundle.hints.recipe_defaults, **options)
    manifest = run_export(bundle, built, out, force=force, progress=progress)
    if built.select and len(manifest.variants) > 1:
        select_at_export(manifest.folder, built, progress, strict=select is True)
        manifest = read_manifest(manifest.folder)
    return manifest


# The bounded selection that ends every export: timed seconds per variant and round (3 rounds), against the
# second `kiln bench` gives each; MiniLM's 7 variants plus eager took 53 s in all on 2 (busy) cores.
EXPORT_SELECT_SECONDS = 0.4


def select_at_export(folder: Path, recipe: Any, progress: "Progress", strict: bool) -> None:
    """Make the fastest variant within the recipe's budget the default (kiln.bench.driver.select_default, the one
    policy); unless `strict`, a failed or unstable measurement keeps the fp32 default, records why and the machine
    in the manifest, and the export still succeeds."""
    select_default = _bench_driver().select_default
    budget = dict(max_accuracy_drop=recipe.max_accuracy_drop, min_cosine=recipe.min_cosine,
                  batch_size=recipe.select_batch_size, progress=progress,
                  min_batch_invariance=recipe.min_batch_invariance, accept_unstable=recipe.accept_unstable)
    if strict:
        select_default(folder, **budget)
        return
    from kiln.core.errors import UnstableMeasurement, one_line

    for attempt in (1, 2):  # a second measurement where the first was unstable (a neighbour's burst), no more
        try:
            select_default(folder, **budget, max_seconds=EXPORT_SELECT_SECONDS)
            return
        except KeyboardInterrupt:
            raise
        except UnstableMeasurement as exc:
            if attempt == 2:
                keep_fp32_default(folder, f"{type(exc).__name__} twice: {one_line(exc, 300)}", progress)
            else:
                progress("[kiln] select: the measurement was unstable; measuring once more")
        except Exception as exc:  # never fails the export: the fp32 default stays, and the manifest says why
            keep_fp32_default(folder, f"{type(exc).__name__}: {one_line(exc, 300)}", progress)
            return


def keep_fp32_default(folder: Path, why: str, progress: "Progress") -> None:
    import datetime as dt

    from kiln.core.machine import fingerprint, machine_info
    from kiln.core.manifest import fp32_default, read_manifest

    manifest = read_manifest(folder)
    manifest.default_variant = fp32_default(manifest.variants) or manifest.default_variant
    machine = machine_info()
    reason = (f"the selection at export did not choose ({why}); kept the fp32 default {manifest.default_variant}: "
              "choose later with `kiln bench DIR --select`, or serve with --variant auto")
    manifest.selection = {
        "chosen": None, "default_variant": manifest.default_variant, "reason": reason, "stable": False,
        "machine": {"cpu_model": machine["cpu_model"], "isa": machine["isa"], "usable_cpus": machine["usable_cpus"],
                    "fingerprint": fingerprint(machine)},
        "selected_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    manifest.save()
    progress(f"[kiln] select: {reason}")


def load(folder: str | Path, variant: str | None = None, *, threads: int | None = None,
         device: str = "cpu") -> "Runtime":
    """A ready runtime for one variant of an artifact folder (default: the manifest's), its sha256 checked.

    Where the default was chosen (`--select`) on a machine whose speed-deciding CPU flags differ from this one's,
    a warning on the `kiln` logger names both machines: the chosen variant may be slow here (bf16 emulated).
    Its `run` checks the inputs against the signature (names, dtypes, shapes) and raises InvalidInput naming
    what it needs, where a runtime would cast or fail in its own words. `variant="auto"` re-chooses on this machine (kiln.core.autoselect), with a cached choice when there is one.
    """
    import logging

    from kiln.core.autoselect import served_variant
    from kiln.core.manifest import read_manifest
    from kiln.core.runtime import CheckedRuntime, RuntimeOptions, open_variant

    manifest = read_manifest(folder)
    choice = served_variant(folder, manifest, variant, threads)
    if choice.auto is not None:
        logging.getLogger("kiln").info("%s: --variant auto: %s (%s): %s", folder, choice.entry.name, choice.how,
                                       choice.reason)
    if choice.warning:
        logging.getLogger("kiln").warning("%s: %s", folder, choice.warning)
    return CheckedRuntime(open_variant(manifest, choice.entry.name, RuntimeOptions(threads, device)))


def bench(folder: str | Path, *, select: bool = False, max_accuracy_drop: float | None = None,
          min_cosine: float | None = None, select_batch_size: int | None = None,
          min_batch_invariance: float | None = None, accept_unstable: bool = False,
          progress: "Progress | None" = None, **settings: Any) -> dict[str, Any]:
    """`kiln bench`: measure eager fp32 and every variant, write bench.json/csv/png; returns the report.

    `settings` are `kiln.bench.driver.BenchSettings` fields: `batch_sizes`, `seq_len`, `threads`, `variants`,
    `warmup`, `min_iters`, `max_iters`, `max_seconds`, `rounds`, `max_spread`.
    """
    from kiln.core.console import to_stderr

    driver = _bench_driver()
    BenchSettings, run_bench = driver.BenchSettings, driver.bench

    if "batch_sizes" in settings:
        settings["batch_sizes"] = tuple(settings["batch_sizes"])
    if settings.get("variants") is not None:
        settings["variants"] = tuple(settings["variants"])
    return run_bench(folder, BenchSettings(**settings), select_default=select, max_accuracy_drop=max_accuracy_drop,
                     min_cosine=min_cosine, select_batch_size=select_batch_size, progress=progress or to_stderr,
                     min_batch_invariance=min_batch_invariance, accept_unstable=accept_unstable)


_bench_function = bench


def _bench_driver() -> Any:
    """kiln.bench.driver, leaving `kiln.bench` the function above. The room kiln.bench shares its name with it, and
    the first import of a module of that room sets the package as this module's attribute `bench`: the README calls
    `kiln.bench(...)` after `kiln.export_model(...)`, whose selection imports the driver. Imported here, lazily, so
    that `import kiln` (and every room below it) does not load kiln.bench."""
    import importlib

    driver = importlib.import_module("kiln.bench.driver")
    globals()["bench"] = _bench_function
    return driver


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        return "0+unknown"


__version__ = _version()

__all__ = [
    "BenchmarkError", "DataError", "ExportError", "IntegrityError", "InvalidInput", "KilnError", "ManifestError",
    "ModelSourceError", "RecipeError", "RuntimeUnavailable", "UsageError", "VerificationError",
    "__version__", "bench", "export_model", "load",
]
