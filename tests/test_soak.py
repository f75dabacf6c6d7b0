"""The short soak: benchmarks/soak.py at concurrency 32 for 3,000 requests, with the script's own pass criteria."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("kiln_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_has_no_errors_and_flat_memory(digits_artifacts):
    soak = load_soak()
    report = soak.soak(digits_artifacts, requests=3_000, concurrency=32, warmup=500, interval=0.1,
                       server_args=("--threads", "1"))
    print(f"short soak: {report['requests']} requests, {report['requests_per_s']} req/s, errors {report['errors']}, "
          f"RSS {report['rss_first_quarter_mib']} -> {report['rss_last_quarter_mib']} MiB "
          f"({report['rss_growth_pct']:+.2f}%)")
    assert report["requests"] == 3_000 and report["ok"] == 3_000
    assert report["error_count"] == 0, report["errors"]
    assert report["rss_growth_pct"] < soak.MAX_GROWTH * 100, report["quarters"]
    assert report["ready_after"]
    assert report["passed"]
