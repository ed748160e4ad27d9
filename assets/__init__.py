"""Dagster assets, one module per stage, thin over ``npr_pipelines``."""

from assets.base import base_model
from assets.data import benchmarks, train_problems
from assets.evaluation import benchmark_scores

#: Unpartitioned assets, in pipeline order (what the main job's first phase materializes).
STAGE_ASSETS = [train_problems, benchmarks, base_model]
ALL_ASSETS = [*STAGE_ASSETS, benchmark_scores]
#: Assets whose value references a published checkpoint.
CHECKPOINT_ASSETS = [base_model]

__all__ = [
    "ALL_ASSETS",
    "CHECKPOINT_ASSETS",
    "STAGE_ASSETS",
    "base_model",
    "benchmark_scores",
    "benchmarks",
    "train_problems",
]
