"""Per-trace structure metrics: rounds, plans per guideline, total and critical-path tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from npr_pipelines.structure.layout import ParallelLayout
from npr_pipelines.structure.parser import SpanTable


@dataclass(frozen=True)
class TraceMetrics:
    rounds: int
    plans_per_guideline: tuple[int, ...]
    total_tokens: int  # every response token, all branches (the flattened length)
    critical_path_tokens: int  # response tokens on the longest path (what latency pays for)

    @property
    def critical_path_ratio(self) -> float:
        return self.total_tokens / self.critical_path_tokens if self.critical_path_tokens else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "critical_path_ratio": self.critical_path_ratio}


def trace_metrics(table: SpanTable, layout: ParallelLayout, prompt_len: int = 0) -> TraceMetrics:
    """Metrics of a laid-out trace; positions of the prompt are not counted."""
    total = layout.length - prompt_len
    critical = (max(layout.position_ids) + 1 - prompt_len) if total > 0 else 0
    return TraceMetrics(
        rounds=len(table.blocks),
        plans_per_guideline=tuple(len(b.plans) for b in table.blocks),
        total_tokens=total,
        critical_path_tokens=critical,
    )
