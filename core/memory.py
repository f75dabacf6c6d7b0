"""Resident memory that comes back after a burst.

A worker's allocators keep what a large batch took: ONNX Runtime's arena holds its high-water mark (MiniLM under
bursts of 64 x 128-token batches: 215 MB -> 1.3 GB, for good), and glibc's malloc keeps freed heap pages that
torch and the tokenizer used. A server sized from `kiln bench` peaks must not sit at its burst size forever.

MemoryKeeper checks the process's RSS after each batch (one read of /proc/self/statm, microseconds) and, only
when it is above the baseline by more than the slack, gives memory back: the runtime's own `release_memory` (ONNX
Runtime: a one-row run that shrinks the arena) and glibc's malloc_trim. The steady state pays nothing: shrinking
the arena after every run cost 9% of MiniLM's throughput at concurrency 32 (2-core EPYC), turning the arena off
12-25%. Where giving back does not bring RSS down, the memory is in use, and that becomes the baseline.
KILN_KEEP_MEMORY=0 in the environment turns the keeper off (to measure what it costs, benchmarks/arena_speed.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


@functools.cache
def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> None:
    """glibc's free pages back to the system (malloc keeps them otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class MemoryKeeper:
    """Gives memory back after a batch that left RSS more than `slack` (a fraction, plus `slack_bytes`) above
    the baseline taken at `start` (after the warm-up)."""

    def __init__(self, slack: float = 0.10, slack_bytes: int = 16 * 2**20) -> None:
        self.slack = slack
        self.slack_bytes = slack_bytes
        self.baseline = 0
        self.releases = 0

    @property
    def limit(self) -> int:
        return int(self.baseline * (1 + self.slack)) + self.slack_bytes

    def start(self) -> None:
        if os.environ.get("KILN_KEEP_MEMORY", "1") == "0":
            return  # baseline 0: after_batch does nothing
        trim_heap()
        self.baseline = rss_bytes()

    def after_batch(self, runtime: Any) -> bool:
        """Whether memory was given back."""
        if not self.baseline or rss_bytes() <= self.limit:
            return False
        release = getattr(runtime, "release_memory", None)
        if release is not None:
            release()
        trim_heap()
        self.releases += 1
        now = rss_bytes()
        if now > self.limit:  # what is left is in use (or cached by a library): measure from there on
            self.baseline = now
        return True
