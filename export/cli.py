"""`kiln export` (and `kiln bench`): argument parsing and the one-line error contract.

The top-level `kiln` command lives in kiln.serve.cli, which adds these subcommands to its own,
so that imports keep pointing one way (models <- export <- serve).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_EXAMPLE = """examples:
  kiln export digits --out artifacts/digits
  kiln export minilm --out artifacts/minilm --variants onnx-fp32,onnx-int8,torchscript-bf16
  kiln export mypkg.nets:build --checkpoint net.pt --input x:float32[batch,3,32,32] \\
      --output logits --data data.npz --out artifacts/net
  kiln export digits --out artifacts/digits --recipe recipe.toml --force
"""


def add_export_parser(subparsers) -> None:
    from kiln.export.recipe import VARIANTS

    parser = subparsers.add_parser(
        "export",
        help="prune, quantize and emit verified TorchScript/ONNX artifacts",
        description="Export a model to a folder of verified artifacts with a manifest.json.",
        epilog=EXPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="zoo name (digits, minilm) or package.module:factory")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--checkpoint", help="state_dict file for a factory model (loaded with weights_only=True)")
    parser.add_argument("--input", action="append", dest="inputs", metavar="NAME:DTYPE[DIMS]",
                        help="input signature of a factory model, e.g. x:float32[batch,3,32,32]; repeat per input")
    parser.add_argument("--output", action="append", dest="outputs", metavar="NAME",
                        help="output name(s) of a factory model (default: output)")
    parser.add_argument("--data", type=Path, help=".npz with one array per input (+ optional 'labels') for a factory model")
    parser.add_argument("--name", help="model name used in server routes (default: zoo name or module name)")
    parser.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: the model's set)")
    parser.add_argument("--prune", metavar="METHOD:AMOUNT", help="e.g. structured:0.5 (for pruned-* variants)")
    parser.add_argument("--fine-tune-epochs", type=int, help="epochs of fine-tuning after structured pruning")
    parser.add_argument("--recipe", type=Path, help="TOML recipe; flags given on the command line override it")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    parser.add_argument("--select", action="store_true",
                        help="benchmark the variants and make the fastest within budget the default")
    parser.add_argument("--max-accuracy-drop", type=float, help="budget for --select, percentage points (classifiers)")
    parser.add_argument("--min-cosine", type=float, help="budget for --select, minimum cosine (embeddings)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.set_defaults(handler=run_export_command)


BENCH_EXAMPLE = """examples:
  kiln bench artifacts/digits --batch-sizes 1,16,64 --threads 2
  kiln bench artifacts/minilm --batch-sizes 1,16 --seq-len 128
  kiln bench artifacts/digits --select --max-accuracy-drop 0.5
  kiln bench artifacts/minilm --select --min-cosine 0.99 --select-batch-size 16
  kiln bench artifacts/digits --variants onnx-fp32,onnx-int8 --max-seconds 0.5
"""


def add_bench_parser(subparsers) -> None:
    """`kiln bench`: defaults live in kiln.export.bench so the CLI and the Python API agree."""
    from kiln.export import bench

    parser = subparsers.add_parser(
        "bench",
        help="measure latency of eager fp32 and every artifact; optionally make the fastest within budget the default",
        description="Benchmark the eager PyTorch fp32 baseline and every variant of an artifact folder on the same "
                    "inputs, each in a fresh process; write bench.json, bench.csv and bench.png into the folder.",
        epilog=BENCH_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", metavar="ARTIFACT_DIR", help="a folder written by `kiln export`")
    parser.add_argument("--batch-sizes", default=",".join(map(str, bench.DEFAULT_BATCH_SIZES)), metavar="N,N,...",
                        help="comma-separated positive batch sizes (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=bench.DEFAULT_SEQ_LEN,
                        help="sequence length for text models, inputs padded to it (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch and ONNX Runtime intra-op threads (default: the cores this process may use)")
    parser.add_argument("--variants", help="comma-separated variants to measure (default: all in the manifest); "
                                           "eager fp32 is always measured")
    parser.add_argument("--warmup", type=int, default=bench.BenchSettings.warmup,
                        help="untimed calls per cell before timing (default: %(default)s)")
    parser.add_argument("--min-iters", type=int, default=bench.BenchSettings.min_iters,
                        help="timed calls per cell at least (default: %(default)s)")
    parser.add_argument("--max-iters", type=int, default=bench.BenchSettings.max_iters,
                        help="timed calls per cell at most (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=bench.BenchSettings.max_seconds,
                        help="timed seconds per cell, once --min-iters is reached (default: %(default)s)")
    parser.add_argument("--select", action="store_true",
                        help="make the fastest variant within the budget the manifest's default (kiln serve loads it)")
    parser.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                        help=f"budget for --select on classifiers, percentage points below eager fp32 "
                             f"(default {bench.DEFAULT_MAX_ACCURACY_DROP})")
    parser.add_argument("--min-cosine", type=float,
                        help=f"budget for --select: minimum cosine to eager fp32 (embeddings; default "
                             f"{bench.DEFAULT_MIN_COSINE}); on a classifier it is an extra condition")
    parser.add_argument("--select-batch-size", type=int,
                        help=f"batch size at which --select compares speed, added to the sweep if absent "
                             f"(default {bench.DEFAULT_SELECT_BATCH_SIZE})")
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args) -> int:
    from kiln.export.bench import run_bench_command as run

    return run(args)


def build_recipe(args, bundle):
    from kiln.export.recipe import PruneConfig, Recipe
    from kiln.models.errors import RecipeError

    overrides: dict = {}
    if args.variants:
        overrides["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.opset is not None:
        overrides["opset"] = args.opset
    if args.select:
        overrides["select"] = True
    if args.max_accuracy_drop is not None:
        overrides["max_accuracy_drop"] = args.max_accuracy_drop
    if args.min_cosine is not None:
        overrides["min_cosine"] = args.min_cosine
    prune: dict = {}
    if args.prune:
        method, _, amount = args.prune.partition(":")
        try:
            prune = {"method": method, "amount": float(amount or 0.5)}
        except ValueError as exc:
            raise RecipeError(f"--prune {args.prune!r} is not METHOD:AMOUNT; e.g. structured:0.5") from exc
    if args.fine_tune_epochs is not None:
        prune["fine_tune_epochs"] = args.fine_tune_epochs
    if args.recipe:
        recipe = Recipe.from_toml(args.recipe)
        data = recipe.to_dict()
        data.update(overrides)
        if prune:
            data["prune"] = {**data["prune"], **prune}
        return Recipe.from_dict(data)
    data = {"variants": list(bundle.recommended_variants), **overrides}
    if prune:
        data["prune"] = {**PruneConfig().__dict__, **prune}
    return Recipe.from_dict(data)


def run_export_command(args) -> int:
    import logging

    from kiln.export.pipeline import run_export
    from kiln.models.registry import resolve

    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice at WARNING
    bundle = resolve(args.model, args.checkpoint, args.inputs, args.outputs, args.data, args.name)
    recipe = build_recipe(args, bundle)
    manifest = run_export(bundle, recipe, args.out, force=args.force)
    if recipe.select:
        from kiln.export.bench import select_default

        select_default(manifest.folder, max_accuracy_drop=recipe.max_accuracy_drop, min_cosine=recipe.min_cosine,
                       batch_size=recipe.select_batch_size)
        from kiln.export.manifest import read_manifest

        manifest = read_manifest(manifest.folder)
    print_report(manifest)
    return 0


def print_report(manifest) -> None:
    rows = [("variant", "format", "precision", "pruning", "MB", "accuracy", "cosine_min", "max_abs_err")]
    for v in manifest.data["variants"]:
        rows.append((
            v["name"] + (" *" if v["name"] == manifest.default_variant else ""),
            v["format"], v["precision"], (v["pruning"] or {}).get("method", "-"),
            f"{v['bytes'] / 1e6:.2f}",
            f"{v['accuracy'] * 100:.2f}%" if "accuracy" in v else "-",
            f"{v['cosine_min']:.5f}", f"{v['max_abs_error']:.3g}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{manifest.model} -> {manifest.folder}  (* = default variant)")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    reference = manifest.data.get("reference", {})
    if "accuracy" in reference:
        print(f"eager fp32 accuracy: {reference['accuracy'] * 100:.2f}% on {reference['items']} held-out items")
    for v in manifest.data["variants"]:
        note = (v.get("pruning") or {}).get("note")
        if note:
            print(f"note: {v['name']}: {note}")
    if any(v["precision"] == "bf16" for v in manifest.data["variants"]):
        from kiln.export.bench import machine_info

        isa = machine_info()["isa"]
        if not (isa.get("avx512_bf16") or isa.get("amx_bf16")):
            print("note: this CPU has neither AVX512-BF16 nor AMX: bf16 runs emulated here and is slower than fp32; "
                  "`kiln bench` measures how much")


def main_guard(handler, args) -> int:
    """Run a subcommand; print `ErrorName: message` and return its exit code on a KilnError."""
    from kiln.models.errors import KilnError, format_error

    try:
        return handler(args) or 0
    except KilnError as exc:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(format_error(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted: stopped by the user; nothing was published", file=sys.stderr)
        return 130
