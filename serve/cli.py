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
    from kiln.export.cli import add_export_parser

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
    try:
        from kiln.export.cli import add_bench_parser

        add_bench_parser(subparsers)
    except ImportError:
        pass
    for name in ("add_serve_parser", "add_loadtest_parser"):
        adder = globals().get(name)
        if adder:
            adder(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kiln.export.cli import main_guard

    args = build_parser().parse_args(argv)
    return main_guard(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
