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


def load_memory_burst():
    spec = importlib.util.spec_from_file_location("kiln_memory_burst", SCRIPT.parent / "memory_burst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_memory_returns_after_bursts_of_max_size_requests(minilm_artifacts):
    """Three bursts of max-size requests (64 texts of 20,000 characters each) at MiniLM onnx-fp32 with --timeout 5.
    Before: ONNX Runtime's arena kept the bursts' high-water mark, the worker 215 MB -> 1.3 GB for good; now
    (core.memory.MemoryKeeper) its RSS is back within 25% of its size before the bursts."""
    burst = load_memory_burst()
    report = burst.measure(minilm_artifacts, count=3, concurrency=8, items=64, settle_s=10.0,
                           server_args=("--timeout", "5", "--variant", "onnx-fp32", "--threads", "2"))
    print(f"memory bursts: worker RSS {report['worker_rss_before_mib']} -> peaks {report['peaks_mib']} -> "
          f"{report['worker_rss_after_mib']} MiB ({report['growth_pct']:+.1f}%), answers {report['statuses']}")
    assert max(report["peaks_mib"]) > 1.5 * report["worker_rss_before_mib"], "the bursts never grew the worker"
    assert report["ready_after"]
    assert report["worker_rss_after_mib"] <= (1 + burst.MAX_GROWTH) * report["worker_rss_before_mib"], report
