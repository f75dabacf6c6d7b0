"""How kiln talks to a terminal: progress lines on stderr and aligned tables, the same in every command."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

Progress = Callable[[str], None]


def to_stderr(message: str) -> None:
    """The default progress sink: stderr, flushed, so stdout stays the command's result."""
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """A progress sink that drops everything (tests, library use)."""


def format_table(rows: Sequence[Sequence[str]], left_columns: int = 1) -> str:
    """Columns padded to their widest cell; the first `left_columns` left-aligned (names), the rest right (figures)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < left_columns else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)
