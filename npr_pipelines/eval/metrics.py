"""Benchmark metrics (``method.md`` §5.4): unbiased pass@k, avg@k, and spreads over repeated runs.

A benchmark's results are either per-problem counts ``(n, c)`` (n samples, c correct) or a
correctness matrix with one row per sample index ("run") and one column per problem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _check_counts(n: int, c: int) -> None:
    for name, v in (("n", n), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, 1 − C(n−c, k) / C(n, k), in the numerically stable product form
    1 − Π_{i=n−c+1}^{n} (1 − k/i). Requires 1 <= k <= n."""
    _check_counts(n, c)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"need an int 1 <= k <= n={n}, got k={k!r}")
    if n - c < k:  # every size-k draw contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def avg_at_k(correct: Sequence[bool | int]) -> float:
    """avg@k of one problem: the mean accuracy over its k samples (= pass@1 with n = k)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(bool(x) for x in correct) / len(correct)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Benchmark pass@k: the mean over problems of pass_at_k(n, c, k)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return math.fsum(values) / len(values)


def mean_avg_at_k(counts: Iterable[tuple[int, int]]) -> float:
    """Benchmark avg@k (the paper's "avg@8" with n = 8): the mean over problems of c / n."""
    return mean_pass_at_k(counts, 1)


def _check_matrix(matrix: Sequence[Sequence[bool | int]]) -> tuple[int, int]:
    if len(matrix) == 0 or len(matrix[0]) == 0:
        raise ValueError("the correctness matrix must have at least one sample and one problem")
    width = len(matrix[0])
    for i, row in enumerate(matrix):
        if len(row) != width:
            raise ValueError(f"ragged correctness matrix: row {i} has {len(row)} problems, row 0 has {width}")
    return len(matrix), width


def counts_from_matrix(matrix: Sequence[Sequence[bool | int]]) -> list[tuple[int, int]]:
    """Per-problem (n, c) from a samples × problems correctness matrix."""
    n, width = _check_matrix(matrix)
    return [(n, sum(bool(row[j]) for row in matrix)) for j in range(width)]


def _std(values: Sequence[float], ddof: int) -> float:
    if len(values) - ddof <= 0:
        raise ValueError(f"std with ddof={ddof} needs more than {ddof} values, got {len(values)}")
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - ddof))


def inter_run_std(matrix: Sequence[Sequence[bool | int]], *, ddof: int = 0) -> float:
    """Standard deviation over runs (rows) of each run's accuracy over the problems."""
    _, width = _check_matrix(matrix)
    return _std([sum(bool(x) for x in row) / width for row in matrix], ddof)


def intra_problem_std(matrix: Sequence[Sequence[bool | int]], *, ddof: int = 0) -> float:
    """Mean over problems of the standard deviation of a problem's correctness across samples."""
    _, width = _check_matrix(matrix)
    stds = [_std([float(bool(row[j])) for row in matrix], ddof) for j in range(width)]
    return math.fsum(stds) / width
