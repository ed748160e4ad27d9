"""Speedups as DESIGN.md defines them: throughput = tokens/s parallel over sequential; latency = median
per-request seconds at concurrency 1, sequential over parallel."""

from __future__ import annotations

import pytest

from npr_pipelines.eval.speedup import (
    latency_speedup,
    median_latency,
    mode_speedups,
    throughput_speedup,
    tokens_per_second,
)


def test_throughput_is_all_tokens_over_wall_clock_parallel_over_sequential() -> None:
    assert tokens_per_second(3000, 1.5) == pytest.approx(2000.0)
    assert tokens_per_second(0, 1.0) is None and tokens_per_second(10, 0.0) is None
    # parallel 2980 tok/s vs sequential 647 tok/s: the paper's AIME25 row, 4.6x
    assert throughput_speedup(2979.8, 646.8) == pytest.approx(4.607, abs=1e-3)
    assert throughput_speedup(500.0, 1000.0) == pytest.approx(0.5)  # not clamped: slower is < 1
    assert throughput_speedup(None, 10.0) is None and throughput_speedup(10.0, 0.0) is None


def test_latency_is_median_sequential_over_median_parallel() -> None:
    assert median_latency([3.0, 1.0, 2.0]) == 2.0 and median_latency([]) is None
    # medians 2.0 (sequential) and 0.5 (parallel): 4x; one outlier does not move a median
    assert latency_speedup([1.0, 2.0, 100.0], [0.5, 0.4, 0.6]) == pytest.approx(4.0)
    assert latency_speedup([1.0, 3.0], [1.0, 1.0]) == pytest.approx(2.0)  # even count: mean of the middle two
    assert latency_speedup([], [1.0]) is None and latency_speedup([1.0], [0.0]) is None


def test_mode_speedups_need_both_modes() -> None:
    modes = {
        "parallel": {"tokens_per_s": 300.0, "latencies_s": [0.2, 0.3, 0.4]},
        "sequential": {"tokens_per_s": 100.0, "latencies_s": [0.6, 0.9, 1.2]},
    }
    assert mode_speedups(modes) == pytest.approx({"throughput_speedup": 3.0, "latency_speedup": 3.0})
    none = {"throughput_speedup": None, "latency_speedup": None}
    assert mode_speedups({"sequential": modes["sequential"]}) == none
    assert mode_speedups({**modes, "parallel": {"tokens_per_s": None, "latencies_s": []}}) == none
