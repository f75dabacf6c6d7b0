"""The `kiln` command: export and bench (from kiln.export), serve and loadtest (from kiln.serve)."""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """examples:
  kiln export digits --out artifacts/digits
  kiln bench artifacts/digits --batch-sizes 1,16,64
  kiln serve artifacts/digits --port 8000
  kiln loadtest http://127.0.0.1:8000 --concurrency 1,8,32 --requests 2000

Run `kiln SUBCOMMAND --help` for each subcommand's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow kiln's one-line `ErrorName: message` contract."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"UsageError: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from kiln.export.cli import add_bench_parser, add_export_parser
    from kiln.serve.loadtest import add_loadtest_parser

    parser = _Parser(
        prog="kiln",
        description="From a trained PyTorch model to a fast, verified HTTP endpoint.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    add_export_parser(subparsers)
    add_bench_parser(subparsers)
    add_serve_parser(subparsers)
    add_loadtest_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kiln.export.cli import main_guard

    args = build_parser().parse_args(argv)
    return main_guard(args.handler, args)


SERVE_EXAMPLE = """examples:
  kiln serve artifacts/digits
  kiln serve artifacts/minilm --variant torchscript-bf16 --max-batch-size 16 --threads 2
  KILN_API_KEY=$(openssl rand -hex 16) kiln serve artifacts/digits --api-key-env KILN_API_KEY
"""


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an artifact folder over HTTP (/predict, KServe V2, /metrics)",
        description="Serve an artifact folder with LitServe: adaptive batching, V2 protocol, metrics, auth.",
        epilog=SERVE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact_dir", help="folder written by `kiln export`")
    parser.add_argument("--variant", help="variant to serve (default: the manifest's default_variant)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests per batch at most")
    parser.add_argument("--max-batch-delay-ms", type=float, default=2.0,
                        help="under load, how long to wait for a fuller batch (an idle server never waits)")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes (each loads the model)")
    parser.add_argument("--threads", type=int, help="runtime threads per worker (default: all cores)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key; enables auth")
    parser.add_argument("--timeout", type=float, default=30.0, dest="timeout_s",
                        help="seconds before a request is answered 504")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-items", type=int, default=64, help="items per request at most")
    parser.add_argument("--body-timeout", type=float, default=10.0, dest="body_timeout_s",
                        help="seconds a request body may take to arrive (then 408)")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=run_serve_command)


def run_serve_command(args) -> int:
    from kiln.serve.server import ServeConfig, serve

    config = ServeConfig(
        artifact_dir=args.artifact_dir, variant=args.variant, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms, workers=args.workers,
        threads=args.threads, api_key_env=args.api_key_env, timeout_s=args.timeout_s,
        max_body_bytes=args.max_body_bytes, max_items=args.max_items, body_timeout_s=args.body_timeout_s,
        log_level=args.log_level)
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
