"""The `kiln` command: one parser tree for every subcommand, and the one error handler.

Each subcommand's handler calls into its room (kiln.export, kiln.bench, kiln.serve) and imports it only when
run, so `kiln --help` and a usage error answer without loading torch. Errors follow one contract: a single line
`ErrorName: what happened; what to do`, exit 2 for usage, 3 for verification failures, 1 for the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXAMPLE = """examples:
  kiln export digits --out artifacts/digits
  kiln bench artifacts/digits --batch-sizes 1,16,64
  kiln serve artifacts/digits --port 8000
  kiln loadtest http://127.0.0.1:8000 --concurrency 1,8,32 --requests 2000
  kiln deploy triton artifacts/digits --out model_repository

Run `kiln SUBCOMMAND --help` for each subcommand's options and examples.
"""

EXPORT_EXAMPLE = """examples:
  kiln export digits --out artifacts/digits
  kiln export minilm --out artifacts/minilm --variants onnx-fp32,onnx-int8,torchscript-bf16
  kiln export mypkg.nets:build --checkpoint net.pt --input x:float32[batch,3,32,32] \\
      --output logits --data data.npz --out artifacts/net
  kiln export ./my-hf-classifier --data reviews.jsonl --out artifacts/classifier
  kiln export digits --out artifacts/digits --recipe recipe.toml --force
  kiln export digits --out artifacts/digits --force --select --max-accuracy-drop 0.5
"""

BENCH_EXAMPLE = """examples:
  kiln bench artifacts/digits --batch-sizes 1,16,64 --threads 2
  kiln bench artifacts/minilm --batch-sizes 1,16 --seq-len 128
  kiln bench artifacts/digits --select --max-accuracy-drop 0.5
  kiln bench artifacts/minilm --select --min-cosine 0.99 --select-batch-size 16
  kiln bench artifacts/digits --variants onnx-fp32,onnx-int8 --max-seconds 0.5

--select exits 4 (UnstableMeasurement, nothing chosen) when the rounds disagree past --max-spread: run it again on a
quieter machine, with more --rounds, or with --accept-unstable.
"""

SERVE_EXAMPLE = """examples:
  kiln serve artifacts/digits
  kiln serve artifacts/minilm --variant torchscript-bf16 --max-batch-size 16 --threads 2
  KILN_API_KEY=$(openssl rand -hex 16) kiln serve artifacts/digits --api-key-env KILN_API_KEY
  kiln serve artifacts/digits artifacts/minilm --workers digits=2,minilm=1
  kiln serve artifacts/            # a repository: every artifact folder inside it

In a repository every folder needs a distinct model name: export a second copy of a model with --name.
"""

LOADTEST_EXAMPLE = """examples:
  kiln loadtest http://127.0.0.1:8000 --concurrency 1,8,32 --requests 2000
  kiln loadtest http://127.0.0.1:8000 --protocol predict --duration 20 --ceiling artifacts/minilm --threads 2
  kiln loadtest http://127.0.0.1:8000 --protocol v2-binary --items 32 --concurrency 8 --ceiling artifacts/digits

With --ceiling DIR, loadtest.json and loadtest.png go into DIR, where `kiln deploy kserve DIR` reads them.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown from the parser itself (argparse's
    ArgumentDefaultsHelpFormatter, less the noise): an option whose default is a value and whose help does not
    already say its default gets ` (default: VALUE)`, so `--help` and the README's CLI reference, generated from
    the same parser (tests/test_readme.py), cannot drift from the code."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow kiln's one-line `ErrorName: message` contract."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"UsageError: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _subparser(subparsers: Any, name: str, help: str, description: str, epilog: str,
               handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=_HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def add_select_budget(parser: argparse.ArgumentParser) -> None:
    """The --select budget, the same flags and defaults on `kiln export` and `kiln bench` (kiln.bench.select)."""
    from kiln.bench import select

    parser.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                        help=f"budget for --select on classifiers, percentage points below eager fp32 "
                             f"(default {select.DEFAULT_MAX_ACCURACY_DROP})")
    parser.add_argument("--min-cosine", type=float,
                        help=f"budget for --select: minimum cosine to eager fp32 (embeddings; default "
                             f"{select.DEFAULT_MIN_COSINE}); on a classifier it is an extra condition")
    parser.add_argument("--min-batch-invariance", type=float, metavar="COSINE",
                        help=f"budget for --select: worst cosine between an item's answer alone and inside a batch, "
                             f"as the export measured it (default {select.DEFAULT_MIN_BATCH_INVARIANCE})")


# --- kiln export ------------------------------------------------------------------------------------------------


def add_export_parser(subparsers: Any) -> None:
    from kiln.export.recipe import PruneConfig, Recipe
    from kiln.export.variants import VARIANTS

    parser = _subparser(subparsers, "export", "prune, quantize and emit verified TorchScript, ONNX and .pt2 (AOTInductor) artifacts",
                        "Export a model to a folder of verified artifacts with a manifest.json.", EXPORT_EXAMPLE,
                        run_export_command)
    parser.add_argument("model", help="zoo name (digits, minilm), a Hugging Face model folder (a path), or "
                                      "package.module:factory")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--checkpoint", help="state_dict file for a factory model (loaded with weights_only=True)")
    parser.add_argument("--input", action="append", dest="inputs", metavar="NAME:DTYPE[DIMS]",
                        help="input signature of a factory model, e.g. x:float32[batch,3,32,32]; repeat per input")
    parser.add_argument("--output", action="append", dest="outputs", metavar="NAME",
                        help="output name(s) of a factory model (default: output)")
    parser.add_argument("--data", type=Path,
                        help="real data to verify on: .npz with one array per input (+ optional 'labels') for a "
                             "tensor model; .txt (one text a line) or .jsonl ({\"text\", \"label\"}) for a text "
                             "model; without it parity is checked on generated inputs and accuracy is not measured")
    parser.add_argument("--task", choices=("classification", "embedding", "token-classification"),
                        help="a model folder's task, when the one read from the folder is not the one you want")
    parser.add_argument("--name", help="model name used in server routes (default: zoo name or module name)")
    parser.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: the model's set)")
    parser.add_argument("--prune", metavar="METHOD:AMOUNT", help="e.g. structured:0.5 (for pruned-* variants)")
    parser.add_argument("--fine-tune-epochs", type=int,
                        help=f"epochs of fine-tuning after structured pruning (default {PruneConfig.fine_tune_epochs})")
    parser.add_argument("--recipe", type=Path, help="TOML recipe; flags given on the command line override it")
    parser.add_argument("--opset", type=int, help=f"ONNX opset (default {Recipe.opset})")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--select", action="store_true", default=None,
                        help="measure as `kiln bench --select` does and exit 4 (nothing chosen) when the measurement "
                             "is too noisy (see --accept-unstable); without it the export still ends with a bounded "
                             "selection whose failure keeps the fp32 default")
    choose.add_argument("--no-select", dest="select", action="store_false", default=None,
                        help="skip the selection that ends the export: the fp32 variant stays the default")
    add_select_budget(parser)
    parser.add_argument("--accept-unstable", action="store_true",
                        help="let --select choose from measurements flagged unstable (otherwise exit 4; or "
                             "choose later with `kiln bench DIR --select --rounds 5`)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run_export_command(args: argparse.Namespace) -> int:
    import logging

    import kiln
    from kiln.export.report import format_report

    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice at WARNING
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    manifest = kiln.export_model(
        args.model, args.out, variants=variants, recipe=args.recipe, checkpoint=args.checkpoint, task=args.task,
        inputs=args.inputs, outputs=args.outputs, data=args.data, name=args.name, select=args.select,
        force=args.force, opset=args.opset, prune=args.prune, fine_tune_epochs=args.fine_tune_epochs,
        max_accuracy_drop=args.max_accuracy_drop, min_cosine=args.min_cosine,
        min_batch_invariance=args.min_batch_invariance, accept_unstable=args.accept_unstable)
    print(format_report(manifest))
    return 0


# --- kiln bench -------------------------------------------------------------------------------------------------


def add_bench_parser(subparsers: Any) -> None:
    from kiln.bench import select
    from kiln.bench.driver import DEFAULT_BATCH_SIZES, DEFAULT_SEQ_LEN, SEQ_COST_LENGTHS, BenchSettings

    parser = _subparser(
        subparsers, "bench",
        "measure latency of eager fp32 and every artifact; optionally make the fastest within budget the default",
        "Benchmark the eager PyTorch fp32 baseline and every variant of an artifact folder on the same inputs, "
        "each in a fresh process; write bench.json, bench.csv and bench.png into the folder.",
        BENCH_EXAMPLE, run_bench_command)
    parser.add_argument("folder", metavar="ARTIFACT_DIR", help="a folder written by `kiln export`")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), metavar="N,N,...",
                        help="comma-separated positive batch sizes")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="sequence length for text models, inputs padded to it")
    parser.add_argument("--seq-costs", default=",".join(map(str, SEQ_COST_LENGTHS)), metavar="N,N,...",
                        help="text models: also the cost of one item at these sequence lengths, at the largest batch "
                             "size (what kiln serve's --max-batch-tokens is set from; '' for none)")
    parser.add_argument("--threads", type=int,
                        help="torch and ONNX Runtime intra-op threads (default: the cores this process may use)")
    parser.add_argument("--variants", help="comma-separated variants to measure (default: all in the manifest); "
                                           "eager fp32 is always measured")
    parser.add_argument("--warmup", type=int, default=BenchSettings.warmup,
                        help="untimed calls per cell before timing")
    parser.add_argument("--min-iters", type=int, default=BenchSettings.min_iters,
                        help="timed calls per cell at least")
    parser.add_argument("--max-iters", type=int, default=BenchSettings.max_iters,
                        help="timed calls per cell at most")
    parser.add_argument("--max-seconds", type=float, default=BenchSettings.max_seconds,
                        help="timed seconds per cell and round, once --min-iters is reached")
    parser.add_argument("--rounds", type=int, default=BenchSettings.rounds,
                        help="interleaved rounds; each cell's figure is the median of its rounds")
    parser.add_argument("--max-spread", type=float, default=BenchSettings.max_spread, metavar="FRACTION",
                        help="a cell whose per-round p50s differ by more than this fraction of their median is "
                             "unstable")
    parser.add_argument("--select", action="store_true",
                        help="make the fastest variant within the budget the manifest's default (kiln serve loads it)")
    parser.add_argument("--accept-unstable", action="store_true",
                        help="let --select choose from cells flagged unstable (otherwise it refuses, exit 4, and "
                             "the manifest is untouched; more --rounds or a quieter machine steady the cells)")
    add_select_budget(parser)
    parser.add_argument("--select-batch-size", type=int,
                        help=f"batch size at which --select compares speed, added to the sweep if absent "
                             f"(default {select.DEFAULT_SELECT_BATCH_SIZE})")


def run_bench_command(args: argparse.Namespace) -> int:
    from kiln.bench.driver import BenchSettings, bench, parse_batch_sizes, parse_names, summary
    from kiln.core.errors import UnstableMeasurement, UsageError

    settings = BenchSettings(
        batch_sizes=parse_batch_sizes(args.batch_sizes), seq_len=args.seq_len, threads=args.threads,
        warmup=args.warmup, min_iters=args.min_iters, max_iters=args.max_iters, max_seconds=args.max_seconds,
        variants=parse_names(args.variants), rounds=args.rounds, max_spread=args.max_spread,
        seq_costs=parse_batch_sizes(args.seq_costs, "--seq-costs") if args.seq_costs.strip() else (),
    )
    if args.accept_unstable and not args.select:
        raise UsageError("--accept-unstable only applies with --select; add --select")
    try:
        report = bench(args.folder, settings, select_default=args.select, max_accuracy_drop=args.max_accuracy_drop,
                       min_cosine=args.min_cosine, select_batch_size=args.select_batch_size,
                       verbose=getattr(args, "verbose", False), min_batch_invariance=args.min_batch_invariance,
                       accept_unstable=args.accept_unstable)
    except UnstableMeasurement as exc:
        if hasattr(exc, "report"):
            print(summary(exc.report))
        raise
    print(summary(report))
    return 0


# --- kiln serve -------------------------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> None:
    from kiln.serve.server import ServeConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    parser = _subparser(subparsers, "serve", "serve artifact folders over HTTP (/predict, KServe V2, /metrics)",
                        "Serve one or more artifact folders with LitServe: adaptive batching, the V2 protocol "
                        "(JSON and binary tensors), metrics, auth.",
                        SERVE_EXAMPLE, run_serve_command)
    parser.add_argument("artifact_dirs", nargs="+", metavar="DIR",
                        help="artifact folder(s) written by `kiln export`, or a repository: a folder of them (each "
                             "model is served under its manifest's name)")
    parser.add_argument("--variant", action="append",
                        help="variant to serve (default: the manifest's default_variant, re-chosen as 'auto' does "
                             "where it was chosen on a CPU with other ISA flags; 'default' serves it anyway, with a "
                             "warning); 'auto' re-chooses on this "
                             "machine (a short bounded bench, cached beside the manifest per machine); NAME for "
                             "every model or model=NAME for one, comma-separated or repeated")
    parser.add_argument("--host", default=defaults["host"],
                        help="bind address (default %(default)s; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=defaults["port"], help="TCP port to listen on")
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"],
                        help="requests per batch at most (default %(default)s)")
    parser.add_argument("--max-batch-delay-ms", type=float, default=defaults["max_batch_delay_ms"],
                        help="under load, how long to wait for a fuller batch (an idle server never waits; "
                             "default %(default)s)")
    parser.add_argument("--workers", action="append",
                        help="inference worker processes per model, each loading it (default 1): N for every model "
                             "or model=N for one, comma-separated or repeated")
    parser.add_argument("--threads", action="append",
                        help="runtime threads per worker (default: all cores for one model; with several, the cores "
                             "shared equally among all workers): N for every model or model=N for one")
    parser.add_argument("--api-key-env", help="environment variable holding the API key; enables auth")
    parser.add_argument("--timeout", type=float, default=defaults["timeout_s"], dest="timeout_s",
                        help="seconds before a request is answered 504 (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults["max_body_bytes"],
                        help="request body bytes at most, after inflating a compressed body (then 413)")
    parser.add_argument("--max-items", type=int, default=defaults["max_items"],
                        help="items per request at most (default %(default)s)")
    parser.add_argument("--body-timeout", type=float, default=defaults["body_timeout_s"], dest="body_timeout_s",
                        help="seconds a request body may take to arrive (then 408)")
    parser.add_argument("--max-batch-items", type=int, default=defaults["max_batch_items"],
                        help="items per batch at most, all its requests together (default: 64 sequences for text "
                             "models, 1024 items for tensor models); a larger request is refused 413")
    parser.add_argument("--max-batch-tokens", type=int, default=defaults["max_batch_tokens"],
                        help="text models: positions per batch at most (rows x its longest text), batches cut from "
                             "requests of similar length, earliest deadline first (default: from the folder's "
                             "bench.json when it measured this variant here, else 4096; 0: requests only, in arrival "
                             "order)")
    parser.add_argument("--header-timeout", type=float, default=defaults["header_timeout_s"], dest="header_timeout_s",
                        help="seconds a connection has to send a request's line and headers, from opening or from "
                             "its last answer (default %(default)s; then 408, or closed if it sent nothing)")
    parser.add_argument("--max-header-bytes", type=int, default=defaults["max_header_bytes"],
                        help="bytes of request line and headers at most (default %(default)s; then 431)")
    parser.add_argument("--max-headers", type=int, default=defaults["max_headers"],
                        help="header fields per request at most (default %(default)s; then 431)")
    parser.add_argument("--max-connections", type=int, default=defaults["max_connections"],
                        help="requests handled at once, and open connections before idle ones are closed "
                             "(default %(default)s; beyond it 503, except health, readiness and metrics probes)")
    parser.add_argument("--metrics-open", action="store_true",
                        help="with --api-key-env, let /metrics answer without the key (it names every model and "
                             "variant, so by default it needs the key; for a Prometheus that cannot send one)")
    # issue 21 (model control, tracing)
    parser.add_argument("--poll", type=float, default=None, dest="poll_s", metavar="SECONDS",
                        help="look at the served repositories every SECONDS and load new model versions (NAME/N/) "
                             "and new models, as Triton's poll mode; a version that fails leaves the serving one "
                             "(default: off; POST /v2/repository/models/NAME/load loads on demand)")
    parser.add_argument("--otlp-endpoint", default=None, metavar="URL",
                        help="export OpenTelemetry traces of every request over OTLP/HTTP to URL (e.g. "
                             "http://127.0.0.1:4318; default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing); "
                             "needs pip install 'kiln[tracing]'")
    parser.add_argument("--log-level", default=defaults["log_level"],
                        choices=("critical", "error", "warning", "info", "debug", "trace"),
                        help="log level of the HTTP server (uvicorn)")
    # Issue 21 (part A): gRPC beside HTTP, and backpressure that says when to retry.
    parser.add_argument("--grpc-port", type=int, default=defaults["grpc_port"],
                        help="also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService, "
                             "tritonclient.grpc) on this port, same models, auth and limits (default: off)")
    parser.add_argument("--max-queued-requests", action="append",
                        help="requests a model may have waiting or running at once; past it a request is answered "
                             "429 at once (gRPC RESOURCE_EXHAUSTED) with Retry-After, rather than queueing toward "
                             "its deadline (default: no cap): N for every model or model=N for one")


def run_serve_command(args: argparse.Namespace) -> int:
    from kiln.serve.server import ServeConfig, serve

    names = {f.name for f in dataclasses.fields(ServeConfig)}
    options = {k: v for k, v in vars(args).items() if k in names and v is not None}
    serve(ServeConfig(**{**options, "artifact_dirs": tuple(args.artifact_dirs)}))
    return 0


# --- kiln loadtest ----------------------------------------------------------------------------------------------


def add_loadtest_parser(subparsers: Any) -> None:
    parser = _subparser(subparsers, "loadtest", "concurrency sweep against a running kiln server",
                        "Send real requests at several concurrency levels and report latency, throughput, errors.",
                        LOADTEST_EXAMPLE, run_loadtest_command)
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32", metavar="N,N,...", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=1000, help="requests per level")
    parser.add_argument("--duration", type=float, help="seconds per level (then --requests is an upper bound)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="hard time bound per level")
    parser.add_argument("--protocol", choices=("v2", "v2-binary", "predict"), default="v2",
                        help="v2 (JSON), v2-binary (the binary tensor extension, in and out, as tritonclient sends "
                             "by default) or predict (default %(default)s)")
    parser.add_argument("--items", type=int, default=1, help="items per request (default %(default)s)")
    parser.add_argument("--model", help="model name (default: the one the server reports)")
    parser.add_argument("--texts", metavar="FILE",
                        help="texts to send to a text model, one a line (default: kiln's built-in varied set)")
    parser.add_argument("--mix", choices=("short", "retrieval"),
                        help="a built-in text workload instead: short (kiln's 40-70 character sentences) or retrieval "
                             "(those as queries, with --passage-share of the requests a passage of 80-220 words)")
    parser.add_argument("--passage-share", type=float, default=0.25,
                        help="with --mix retrieval, the share of requests that are passages (default %(default)s)")
    parser.add_argument("--ceiling", metavar="ARTIFACT_DIR", help="also measure the served variant in-process")
    parser.add_argument("--variant", help="variant for --ceiling (default: the manifest's default)")
    parser.add_argument("--threads", type=int, help="runtime threads for --ceiling (match the server's)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes for --ceiling, run side by side (match the server's --workers)")
    parser.add_argument("--rounds", type=int,
                        help="rounds per level; with --ceiling each round is followed by its ceiling run and the "
                             "ratio is the median over rounds (default 3 with --ceiling, else 1)")
    parser.add_argument("--api-key-env", help="environment variable holding the server's API key")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for loadtest.json and loadtest.png (default: the --ceiling artifact folder, "
                             "where `kiln deploy kserve` reads it; without --ceiling, ./loadtest)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")


def run_loadtest_command(args: argparse.Namespace) -> int:
    from kiln.bench.loadtest import run_loadtest_command as run

    return run(args)


# --- kiln deploy ------------------------------------------------------------------------------------------------

DEPLOY_EXAMPLE = """examples:
  kiln deploy triton artifacts/digits --out model_repository --threads 2
  kiln deploy kserve artifacts/digits --image registry.example.com/kiln:0.1.0 \\
      --storage-uri s3://models/digits --out deploy/digits --threads 2 --max-replicas 4
  kiln deploy ray artifacts/digits artifacts/minilm --out ray --threads 1 --max-replicas 4
"""

TRITON_EXAMPLE = """examples:
  kiln deploy triton artifacts/digits --out model_repository
  kiln deploy triton artifacts/digits --out model_repository --variant onnx-int8 --instances 2 --threads 1
  kiln deploy triton artifacts/minilm --out model_repository --variant onnx-fp32   (token ids only: see its README.md)

Writes REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (or model.pt), the artifact byte for byte.
"""

KSERVE_EXAMPLE = """examples:
  kiln deploy kserve artifacts/digits --image registry.example.com/kiln:0.1.0 --storage-uri s3://models/digits \\
      --out deploy/digits
  kiln deploy kserve artifacts/minilm --image registry.example.com/kiln:0.1.0 --storage-uri gs://models/minilm \\
      --variant onnx-int8 --threads 2 --min-replicas 1 --max-replicas 8 --api-key-secret kiln-api-key --out deploy/minilm

Writes DIR/servingruntime.yaml and DIR/inferenceservice.yaml; `kubectl apply -f DIR` after uploading the artifact
folder to --storage-uri.
"""


RAY_EXAMPLE = """examples:
  kiln deploy ray artifacts/digits --out ray
  kiln deploy ray artifacts/digits artifacts/minilm --out ray --variant minilm=onnx-int8 --threads 2 \\
      --min-replicas 1 --max-replicas 8 --api-key-env KILN_API_KEY --host 0.0.0.0

Writes DIR/serve.yaml; on a Ray cluster whose Python has pip install 'kiln[ray]': serve deploy DIR/serve.yaml
"""


def add_scaling_flags(parser: argparse.ArgumentParser, target: str, threads: str) -> None:
    """The flags of kiln.deploy.common.ScalingOptions, for every target that scales replicas (read back by
    `scaling_options`); `target` and `threads` say what the concurrency target and the threads are on that stack."""
    from kiln.deploy import common

    parser.add_argument("--min-replicas", default=str(common.DEFAULT_MIN_REPLICAS), metavar="N",
                        help="default %(default)s (0 scales to zero)")
    parser.add_argument("--max-replicas", default=str(common.DEFAULT_MAX_REPLICAS), metavar="M",
                        help="default %(default)s")
    parser.add_argument("--target-concurrency", metavar="C",
                        help=f"{target} (default: from loadtest.json, else {common.DEFAULT_TARGET_CONCURRENCY})")
    parser.add_argument("--loadtest", metavar="FILE",
                        help="a `kiln loadtest` result (default: loadtest.json in the artifact folder, if there)")
    parser.add_argument("--p99-budget-ms", default=f"{common.DEFAULT_P99_BUDGET_MS:g}", metavar="MS",
                        help="the target is the highest loadtest concurrency with p99 within this (default "
                             "%(default)s)")
    parser.add_argument("--threads", metavar="N",
                        help=f"{threads} (default: bench.json's, else {common.DEFAULT_THREADS})")


def scaling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ScalingOptions fields from `add_scaling_flags`' flags (text, checked: one UsageError line each)."""
    from kiln.deploy.common import parse_float, parse_int

    return {"min_replicas": parse_int("--min-replicas", args.min_replicas, minimum=0),
            "max_replicas": parse_int("--max-replicas", args.max_replicas, example=3),
            "target_concurrency": (parse_int("--target-concurrency", args.target_concurrency, example=8)
                                   if args.target_concurrency is not None else None),
            "p99_budget_ms": parse_float("--p99-budget-ms", args.p99_budget_ms, example=100),
            "loadtest": Path(args.loadtest) if args.loadtest else None,
            "threads": parse_int("--threads", args.threads, example=2) if args.threads is not None else None}


def add_deploy_ray_parser(targets: Any) -> None:
    from kiln.deploy import ray

    rp = _subparser(targets, "ray", "a Ray Serve config running kiln's Ray application",
                    "Write DIR/serve.yaml: one Ray Serve application (kiln's routes as the ingress, one autoscaled "
                    "deployment per model) for `serve deploy` on a Ray cluster.", RAY_EXAMPLE, run_deploy_ray)
    rp.add_argument("artifact_dirs", nargs="+", metavar="ARTIFACT_DIR",
                    help="folders written by `kiln export` (or repositories of them); every node must see them "
                         "at the same absolute path")
    rp.add_argument("--out", required=True, metavar="DIR", help="folder for serve.yaml (written atomically)")
    rp.add_argument("--variant", action="append", metavar="[NAME=]VARIANT",
                    help="variant to serve, for every model or per model (default: each manifest's default_variant)")
    add_scaling_flags(rp, "target_ongoing_requests per replica", "inference threads per replica, and its num_cpus")
    rp.add_argument("--api-key-env", metavar="VAR",
                    help="the replicas read the API key from this environment variable (set it where `ray start` runs)")
    rp.add_argument("--max-ongoing-requests", metavar="N",
                    help="requests one model replica holds at once (default: --max-batch-size or the target)")
    rp.add_argument("--max-batch-size", default=str(ray.RayOptions.max_batch_size), metavar="N",
                    help="requests a replica batches: the default max_ongoing_requests (default %(default)s)")
    rp.add_argument("--max-batch-delay-ms", default=f"{ray.RayOptions.max_batch_delay_ms:g}", metavar="MS",
                    help="how long a replica waits to fill a batch (default %(default)s)")
    rp.add_argument("--max-batch-tokens", metavar="N",
                    help="text models: positions per batch at most, as kiln serve's (default: measured on each "
                         "replica's node from the folder's bench.json, else 4096; 0: requests in arrival order)")
    rp.add_argument("--host", default=ray.DEFAULT_HOST, help="the HTTP proxy's address (default %(default)s)")
    rp.add_argument("--port", default=str(ray.DEFAULT_PORT), metavar="PORT", help="default %(default)s")
    rp.add_argument("--proxy-location", default="EveryNode", choices=ray.PROXY_LOCATIONS,
                    help="where Ray runs HTTP proxies (default %(default)s; HeadOnly for several nodes on one machine)")
    rp.add_argument("--batching", default="kiln", choices=ray.BATCHERS,
                    help="a replica batches as kiln serve does (default), or with Ray's @serve.batch")
    rp.add_argument("--max-replicas-per-node", metavar="N",
                    help="at most N replicas of a model on one node (default: Ray's placement alone)")
    rp.add_argument("--upscale-delay-s", metavar="S", help="autoscaling upscale_delay_s (default: Ray's)")
    rp.add_argument("--downscale-delay-s", metavar="S", help="autoscaling downscale_delay_s (default: Ray's)")
    rp.add_argument("--force", action="store_true", help="replace DIR if it exists")


def add_deploy_parser(subparsers: Any) -> None:
    from kiln.deploy import kserve, triton

    parser = _subparser(subparsers, "deploy", "write a Triton model repository, KServe manifests or a Ray Serve config",
                        "Write the files another serving stack needs for an artifact folder, from its manifest "
                        "(and bench.json/loadtest.json when present).", DEPLOY_EXAMPLE, run_deploy_help)
    targets = parser.add_subparsers(dest="target", metavar="TARGET", parser_class=_Parser)
    # Numbers are read as text and checked by kiln.deploy, so a bad value is one `UsageError:` line.
    tri = _subparser(targets, "triton", "a Triton model repository entry (config.pbtxt + the model file)",
                     "Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (or model.pt) for one variant.",
                     TRITON_EXAMPLE, run_deploy_triton)
    tri.add_argument("artifact_dir", metavar="ARTIFACT_DIR", help="a folder written by `kiln export`")
    tri.add_argument("--out", required=True, metavar="REPO", help="model repository folder (other models are kept)")
    tri.add_argument("--variant", help="variant to deploy (default: the manifest's default_variant)")
    tri.add_argument("--name", help="Triton model name (default: the manifest's model name)")
    tri.add_argument("--instances", default="1", metavar="N", help="model instances (KIND_CPU)")
    tri.add_argument("--max-batch-size", default=str(triton.DEFAULT_MAX_BATCH_SIZE), metavar="N",
                     help="max_batch_size (default %(default)s, kiln serve's)")
    tri.add_argument("--max-batch-delay-ms", default=f"{triton.DEFAULT_MAX_BATCH_DELAY_MS:g}", metavar="MS",
                     help="dynamic batching queue delay (default %(default)s, kiln serve's)")
    tri.add_argument("--threads", metavar="N", help="intra-op threads per instance (default: the backend's)")
    tri.add_argument("--force", action="store_true", help="replace REPO/NAME if it exists")

    ks = _subparser(targets, "kserve", "a KServe ServingRuntime + InferenceService running `kiln serve`",
                    "Write a ServingRuntime (the kiln image running `kiln serve /mnt/models`) and an "
                    "InferenceService for an artifact folder uploaded to --storage-uri.", KSERVE_EXAMPLE,
                    run_deploy_kserve)
    ks.add_argument("artifact_dir", metavar="ARTIFACT_DIR", help="a folder written by `kiln export`")
    ks.add_argument("--image", required=True, help="the kiln serving image, e.g. registry.example.com/kiln:0.1.0")
    ks.add_argument("--storage-uri", required=True, metavar="URI",
                    help="where the artifact folder is uploaded (s3://, gs://, pvc://, https://, ...)")
    ks.add_argument("--out", required=True, metavar="DIR", help="folder for the two YAML files (written atomically)")
    ks.add_argument("--name", help="InferenceService name (default: the model name)")
    ks.add_argument("--variant", help="variant to serve (default: the manifest's default_variant)")
    add_scaling_flags(ks, "requests in flight per replica before scaling out (scaleTarget)",
                      "inference threads: kiln serve --threads and the CPU request")
    ks.add_argument("--api-key-secret", metavar="NAME",
                    help=f"Kubernetes Secret holding the API key: passed as ${kserve.API_KEY_ENV} and --api-key-env")
    ks.add_argument("--api-key-secret-key", default="api-key", metavar="KEY",
                    help="the key inside that Secret (default %(default)s)")
    ks.add_argument("--force", action="store_true", help="replace DIR if it exists")
    add_deploy_ray_parser(targets)


def run_deploy_help(args: argparse.Namespace) -> int:
    from kiln.core.errors import UsageError

    raise UsageError("name a target: `kiln deploy triton ...`, `kiln deploy kserve ...` or `kiln deploy ray ...`; "
                     "see `kiln deploy --help`")


def run_deploy_triton(args: argparse.Namespace) -> int:
    from kiln.deploy.common import parse_float, parse_int
    from kiln.deploy.triton import TritonOptions, write_triton

    options = TritonOptions(
        out=Path(args.out), variant=args.variant, name=args.name,
        instances=parse_int("--instances", args.instances),
        max_batch_size=parse_int("--max-batch-size", args.max_batch_size, example=32),
        max_batch_delay_ms=parse_float("--max-batch-delay-ms", args.max_batch_delay_ms, example=2.0,
                                       allow_zero=True),
        threads=parse_int("--threads", args.threads, example=2) if args.threads is not None else None,
        force=args.force)
    plan = write_triton(args.artifact_dir, options)
    target = Path(args.out) / plan.name
    print(f"wrote {target / 'config.pbtxt'} and {target / '1' / plan.platform.file} ({plan.entry.name}, sha256 "
          f"{plan.entry.sha256[:12]}..., the artifact byte for byte)"
          + (f" and {target / 'README.md'} (NOT a complete deployment: no tokenizer step)" if plan.readme else ""))
    return 0


def run_deploy_kserve(args: argparse.Namespace) -> int:
    from kiln.deploy.kserve import INFERENCESERVICE_FILE, SERVINGRUNTIME_FILE, KServeOptions, write_kserve

    options = KServeOptions(
        out=Path(args.out), image=args.image, storage_uri=args.storage_uri, name=args.name, variant=args.variant,
        **scaling_options(args), api_key_secret=args.api_key_secret, api_key_secret_key=args.api_key_secret_key, force=args.force)
    plan = write_kserve(args.artifact_dir, options)
    out = Path(args.out)
    print(f"wrote {out / SERVINGRUNTIME_FILE} ({plan.runtime_name}) and {out / INFERENCESERVICE_FILE} ({plan.name}: "
          f"{plan.entry.name}, {plan.threads} thread(s), {plan.memory_mib}Mi, scaleTarget {plan.scale_target}); "
          f"upload {args.artifact_dir} to {args.storage_uri}, then kubectl apply -f {out}")
    return 0


def run_deploy_ray(args: argparse.Namespace) -> int:
    from kiln.deploy.common import parse_float, parse_int
    from kiln.deploy.ray import CONFIG_FILE, RayOptions, write_ray

    def optional_int(flag: str, value: str | None, example: int) -> int | None:
        return parse_int(flag, value, example=example) if value is not None else None

    def optional_seconds(flag: str, value: str | None) -> float | None:
        return parse_float(flag, value, example=30, allow_zero=True) if value is not None else None

    options = RayOptions(
        out=Path(args.out), variant=args.variant, **scaling_options(args), api_key_env=args.api_key_env,
        max_ongoing_requests=optional_int("--max-ongoing-requests", args.max_ongoing_requests, 32),
        max_batch_size=parse_int("--max-batch-size", args.max_batch_size, example=32),
        max_batch_delay_ms=parse_float("--max-batch-delay-ms", args.max_batch_delay_ms, example=2.0, allow_zero=True),
        max_batch_tokens=(parse_int("--max-batch-tokens", args.max_batch_tokens, minimum=0, example=4096)
                          if args.max_batch_tokens is not None else None),
        host=args.host, port=parse_int("--port", args.port, minimum=1024, example=8000),
        proxy_location=args.proxy_location, batching=args.batching,
        max_replicas_per_node=optional_int("--max-replicas-per-node", args.max_replicas_per_node, 1),
        upscale_delay_s=optional_seconds("--upscale-delay-s", args.upscale_delay_s),
        downscale_delay_s=optional_seconds("--downscale-delay-s", args.downscale_delay_s), force=args.force)
    plan = write_ray(args.artifact_dirs, options)
    out = Path(args.out)
    models = ", ".join(f"{m.name} ({m.entry.name}, {m.threads} CPU(s), target_ongoing_requests "
                       f"{m.target_ongoing_requests})" for m in plan.models)
    print(f"wrote {out / CONFIG_FILE}: {models}; on the Ray cluster: serve deploy {out / CONFIG_FILE}")
    return 0


# --- what a serve-only install lacks ----------------------------------------------------------------------------

# `pip install kiln` serves ONNX and OpenVINO variants and writes deploy files; the rest needs the export extra. Checked before a
# subcommand starts, so it fails with the install line, not an ImportError halfway through.
EXPORT_EXTRA_NEEDS = {
    "export": ("torch", "onnx", "onnxscript", "sklearn", "torch_pruning", "nncf"),
    "bench": ("torch", "matplotlib"),
    "loadtest": ("matplotlib",),
}


def require_extras(args: argparse.Namespace) -> None:
    """RuntimeUnavailable naming `pip install 'kiln[export]'` when a serve-only install runs what needs more."""
    from kiln.core.errors import RuntimeUnavailable
    from kiln.core.runtime import module_installed

    command = str(getattr(args, "command", "") or "")
    missing = [m for m in EXPORT_EXTRA_NEEDS.get(command, ()) if not module_installed(m)]
    if missing:
        raise RuntimeUnavailable(f"`kiln {command}` needs {', '.join(missing)}, which this install lacks (the "
                                 "serve-only base install serves ONNX and OpenVINO variants and writes deploy files); "
                                 "pip install 'kiln[export]'")


# --- the command ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kiln", description="From a trained PyTorch model to a fast, verified HTTP endpoint.",
                     epilog=EXAMPLE, formatter_class=_HelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for add in (add_export_parser, add_bench_parser, add_serve_parser, add_loadtest_parser, add_deploy_parser):
        add(subparsers)
    return parser


def main_guard(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; print `ErrorName: message` and return its exit code on a KilnError."""
    from kiln.core.errors import KilnError, format_error

    try:
        require_extras(args)
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


def main(argv: list[str] | None = None) -> int:
    import logging

    # torchao, imported by transformers when installed, registers enums that torch warns about at every start.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    return main_guard(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
