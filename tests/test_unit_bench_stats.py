"""The statistics behind `kiln bench`, on injected timings: round combination, the instability rule, warm-up,
the load figures, the roofline, and the speed-flag comparison behind the selection-machine warning."""

import pytest

from kiln.bench import stats
from kiln.bench.driver import roofline
from kiln.core.machine import fingerprint, speed_mismatch


def _round(p50: float, calls: int = 50) -> dict:
    return stats.summarize_calls([p50] * calls, 8)


def test_rounds_combine_to_the_median_with_their_spread():
    rounds = [_round(10.0), _round(12.0), _round(11.0)]
    cell = stats.combine_rounds(rounds, 8)
    assert cell["p50_ms"] == 11.0 and cell["rounds"] == 3 and cell["iterations"] == 150
    assert (cell["p50_min_ms"], cell["p50_max_ms"]) == (10.0, 12.0)
    assert cell["spread"] == pytest.approx(2.0 / 11.0)
    assert cell["cv"] == pytest.approx((2.0 / 3.0) ** 0.5 / 11.0)
    assert cell["items_per_s"] == pytest.approx(8 * 1000 / 11.0)


def test_summarize_calls_percentiles_and_throughput():
    cell = stats.summarize_calls([1.0] * 90 + [10.0] * 10, 4)
    assert cell["p50_ms"] == 1.0 and cell["p99_ms"] == pytest.approx(10.0) and cell["iterations"] == 100
    assert cell["items_per_s"] == pytest.approx(4 * 100 / 0.19)


def test_agreeing_rounds_are_stable_and_disagreeing_ones_are_not():
    calm = [_round(10.0), _round(10.5), _round(10.2)]
    assert stats.unstable_reasons(stats.combine_rounds(calm, 8), calm, 0.2) == []
    hogged = [_round(10.0), _round(21.0), _round(10.2)]
    reasons = stats.unstable_reasons(stats.combine_rounds(hogged, 8), hogged, 0.2)
    assert len(reasons) == 1 and "differ by" in reasons[0] and "drift" in reasons[0]
    busy = stats.load_summary((2.5, 2.0, 1.0), (3.0, 2.0, 1.0), 2, 2, other_cores=0.9)
    named = stats.unstable_reasons(stats.combine_rounds(hogged, 8), hogged, 0.2, busy)
    assert "another process was using the cores" in named[0] and "0.90 cores" in named[0]
    # One round cannot disagree with itself; too few calls is its own reason.
    one = [_round(10.0, calls=3)]
    reasons = stats.unstable_reasons(stats.combine_rounds(one, 8), one, 0.2)
    assert reasons == ["only 3 timed call(s) in a round: too few calls; raise --max-seconds"]


def test_the_threshold_is_the_users():
    rounds = [_round(10.0), _round(13.0)]
    cell = stats.combine_rounds(rounds, 8)
    assert stats.unstable_reasons(cell, rounds, 0.2)
    assert not stats.unstable_reasons(cell, rounds, 0.5)


def test_load_summary_prefers_the_measured_cpu_time_to_the_load_average():
    assert stats.load_summary((5.0, 1, 1), (5.0, 1, 1), 2, 2, other_cores=0.1)["busy"] is False
    assert stats.load_summary((1.0, 1, 1), (1.0, 1, 1), 2, 2, other_cores=0.8)["busy"] is True
    assert stats.load_summary((3.5, 1, 1), (1.0, 1, 1), 2, 2)["busy"] is True  # no /proc: the load average
    assert stats.load_summary((2.2, 1, 1), (1.0, 1, 1), 2, 2)["busy"] is False


def test_proc_parsers():
    line = "cpu  100 0 50 800 50 0 0 10 0 0\ncpu0 1 2 3\n"
    assert stats.machine_busy_seconds(line, 100.0) == pytest.approx((1010 - 850 - 10) / 100.0)
    stat = "1234 (python -m kiln (x)) S 1 2 3 4 5 6 7 8 9 10 200 100 30 20 0 0"
    assert stats.process_cpu_seconds(stat, 100.0) == pytest.approx(3.5)


def test_warm_up_settles_when_the_latency_stops_moving():
    assert not stats.settled([5.0] * 9)
    assert not stats.settled([9.0, 7.0, 6.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])  # 6 -> 5 ms: still moving
    assert stats.settled([9.0, 7.0, 6.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    assert not stats.settled([20.0, 18.0, 16.0, 14.0, 12.0, 10.0, 8.0, 6.0, 5.0, 4.0])


def test_roofline_and_emulation_label():
    amx = {"isa": {"avx512_bf16": True, "amx_bf16": True}}
    avx2 = {"isa": {"avx2": True}}
    cell = roofline(1e9, 8, 100.0, "fp32", {"fp32": 200.0}, amx)  # 8 GFLOP in 0.1 s = 80 GFLOP/s
    assert cell["gflops_per_s"] == pytest.approx(80.0) and cell["pct_of_peak"] == pytest.approx(40.0)
    assert cell["emulated"] is False
    assert roofline(1e9, 8, 100.0, "bf16", {"bf16": 1000.0}, avx2)["emulated"] is True
    assert roofline(None, 8, 100.0, "fp32", {}, amx) == {"gflops_per_s": None, "pct_of_peak": None,
                                                          "emulated": False}


def test_selection_machine_warning_names_both_machines_and_what_it_means():
    amx = {"cpu_model": "Xeon AMX", "isa": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True},
           "usable_cpus": 2}
    avx2 = {"cpu_model": "EPYC", "isa": {"avx2": True}, "usable_cpus": 2}
    warning = speed_mismatch(amx, avx2)
    assert warning and "Xeon AMX" in warning and "EPYC" in warning and "emulated" in warning
    assert speed_mismatch(amx, amx) is None and speed_mismatch(None, avx2) is None
    assert fingerprint(amx) != fingerprint(avx2) and fingerprint(amx) == fingerprint(dict(amx))
