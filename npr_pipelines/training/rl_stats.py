"""Paired comparison of two checkpoints on the same problems (the RL acceptance statistic).

Per-problem mean correctness over n samples, then a paired bootstrap over problems: resampling
problems (not samples) keeps each problem's pair together, so the interval reflects how much the gain
depends on which problems were drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BootstrapResult:
    """``diff`` = mean(b) - mean(a); ``[low, high]`` its percentile interval at ``level``."""

    diff: float
    low: float
    high: float
    level: float
    n_problems: int
    n_resamples: int

    def to_dict(self) -> dict[str, float]:
        return {
            "diff": self.diff,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "n_problems": self.n_problems,
            "n_resamples": self.n_resamples,
        }


def per_problem_means(records: Iterable, key: str = "correct") -> dict[str, float]:
    """``problem_id -> mean of record.<key>`` over an evaluation's sample records."""
    sums: dict[str, list[float]] = {}
    for r in records:
        sums.setdefault(r.problem_id, []).append(float(getattr(r, key)))
    return {pid: sum(v) / len(v) for pid, v in sums.items()}


def paired_means(a: Iterable, b: Iterable) -> tuple[list[float], list[float]]:
    """Per-problem mean correctness of two evaluations on the same problems, aligned by problem id."""
    ma, mb = per_problem_means(a), per_problem_means(b)
    if set(ma) != set(mb):
        raise ValueError("the two evaluations cover different problems")
    ids = sorted(ma)
    return [ma[i] for i in ids], [mb[i] for i in ids]


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n: int = 10_000, *, level: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Percentile bootstrap interval of ``mean(b) - mean(a)`` over paired per-problem values.

    Args:
        a: per-problem mean correctness of the baseline, ``[P]``.
        b: the same problems, same order, for the candidate, ``[P]``.
        n: bootstrap resamples.
        level: coverage of the two-sided interval.
        seed: resampling seed.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty sequences, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    p = len(diffs)
    rng = random.Random(seed)
    stats = sorted(sum(diffs[rng.randrange(p)] for _ in range(p)) / p for _ in range(n))
    tail = (1 - level) / 2
    low = stats[min(n - 1, max(0, int(tail * n)))]
    high = stats[min(n - 1, max(0, int((1 - tail) * n) - 1))]
    return BootstrapResult(sum(diffs) / p, low, high, level, p, n)
