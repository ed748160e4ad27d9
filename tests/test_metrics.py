"""pass@k against the closed form, avg@k and the run-to-run spreads."""

from __future__ import annotations

import math
import statistics

import pytest

from npr_pipelines.eval.metrics import (
    avg_at_k,
    counts_from_matrix,
    inter_run_std,
    intra_problem_std,
    mean_avg_at_k,
    mean_pass_at_k,
    pass_at_k,
)


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 30, 64, 100])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 3, 6) == 1.0  # k > n - c: every draw has a correct sample
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_stable_for_large_n():
    # math.comb is exact; the float ratio of huge binomials is where naive code overflows.
    n, c, k = 2000, 3, 1000
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    assert 0.0 <= pass_at_k(100_000, 1, 50_000) <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_ints():
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pass_at_k(4, 2, True)  # type: ignore[arg-type]


def test_avg_at_k_and_means():
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([1, 0]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])
    counts = [(8, 0), (8, 4), (8, 8)]
    assert mean_avg_at_k(counts) == pytest.approx(0.5)
    assert mean_pass_at_k(counts, 8) == pytest.approx(2 / 3)
    expected = sum(closed_form(8, c, 2) for _, c in counts) / 3
    assert mean_pass_at_k(counts, 2) == pytest.approx(expected)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_matrix_helpers():
    # 4 runs (samples) x 3 problems
    m = [
        [1, 0, 1],
        [1, 1, 0],
        [1, 0, 0],
        [1, 0, 1],
    ]
    assert counts_from_matrix(m) == [(4, 4), (4, 1), (4, 2)]
    run_acc = [2 / 3, 2 / 3, 1 / 3, 2 / 3]
    assert inter_run_std(m) == pytest.approx(statistics.pstdev(run_acc))
    assert inter_run_std(m, ddof=1) == pytest.approx(statistics.stdev(run_acc))
    per_problem = [statistics.pstdev([row[j] for row in m]) for j in range(3)]
    assert intra_problem_std(m) == pytest.approx(sum(per_problem) / 3)
    # avg@k from the matrix equals the mean over runs of run accuracy
    assert mean_avg_at_k(counts_from_matrix(m)) == pytest.approx(sum(run_acc) / 4)


def test_matrix_validation():
    with pytest.raises(ValueError, match="ragged"):
        counts_from_matrix([[1, 0], [1]])
    with pytest.raises(ValueError):
        inter_run_std([])
    with pytest.raises(ValueError):
        inter_run_std([[1, 0]], ddof=1)
