"""Speedups of a checkpoint's parallel mode over its own sequential mode (DESIGN.md, "Speedups").

Evaluation decodes freely from the same prompts in both modes (the paper's measure, ``method.md`` §5.4):

- throughput speedup = all branches' tokens per wall-clock second with all prompts in flight,
  parallel / sequential (the paper's Table 3 TPS ratio);
- latency speedup = median per-request wall-clock at concurrency 1 (one request at a time),
  sequential / parallel, over a small fixed subset of the problems.

Both are None when either side is missing or degenerate (no tokens, no time), never a division error.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def tokens_per_second(total_tokens: int, wall_s: float) -> float | None:
    """Throughput in tokens/s: ``total_tokens`` (all branches, inserted tokens included) over the
    wall-clock seconds ``wall_s`` that decoded them; None without time or tokens."""
    if wall_s <= 0 or total_tokens <= 0:
        return None
    return total_tokens / wall_s


def throughput_speedup(parallel_tps: float | None, sequential_tps: float | None) -> float | None:
    """Parallel-mode tokens/s over sequential-mode tokens/s (dimensionless); None if either is missing."""
    if not parallel_tps or not sequential_tps or parallel_tps <= 0 or sequential_tps <= 0:
        return None
    return parallel_tps / sequential_tps


def median_latency(latencies_s: Sequence[float]) -> float | None:
    """The median of per-request wall-clock seconds; None for no requests."""
    return statistics.median(latencies_s) if latencies_s else None


def latency_speedup(sequential_s: Sequence[float], parallel_s: Sequence[float]) -> float | None:
    """Median sequential-mode request seconds over median parallel-mode request seconds (both measured
    at concurrency 1 on the same problems); None when either side has no requests or a zero median."""
    seq, par = median_latency(sequential_s), median_latency(parallel_s)
    if seq is None or par is None or seq <= 0 or par <= 0:
        return None
    return seq / par


def mode_speedups(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Both speedups from the per-mode summaries of one (checkpoint, benchmark) evaluation.

    ``modes[m]`` holds ``tokens_per_s`` (float) and ``latencies_s`` (list of seconds) for m in
    {"parallel", "sequential"}; a checkpoint evaluated in one mode only gets None for both.
    """
    par, seq = modes.get("parallel"), modes.get("sequential")
    if par is None or seq is None:
        return {"throughput_speedup": None, "latency_speedup": None}
    return {
        "throughput_speedup": throughput_speedup(par.get("tokens_per_s"), seq.get("tokens_per_s")),
        "latency_speedup": latency_speedup(seq.get("latencies_s") or [], par.get("latencies_s") or []),
    }
