"""Dagster assets, one module per stage, thin over ``npr_pipelines``."""

from assets.base import base_model
from assets.data import benchmarks, train_problems
from assets.evaluation import benchmark_scores
from assets.training import (
    cold_start_traces,
    npr_beta_checkpoint,
    npr_policy,
    npr_zero_policy,
    self_distilled_corpus,
    sr_beta_checkpoint,
    sr_policy,
)

#: Unpartitioned assets, in pipeline order (what the main job's first phase materializes).
STAGE_ASSETS = [
    train_problems,
    benchmarks,
    base_model,
    npr_zero_policy,
    cold_start_traces,
    self_distilled_corpus,
    npr_beta_checkpoint,
    npr_policy,
    sr_beta_checkpoint,
    sr_policy,
]
ALL_ASSETS = [*STAGE_ASSETS, benchmark_scores]
#: Assets whose value references a published checkpoint.
CHECKPOINT_ASSETS = [
    base_model,
    npr_zero_policy,
    npr_beta_checkpoint,
    npr_policy,
    sr_beta_checkpoint,
    sr_policy,
]

__all__ = [
    "ALL_ASSETS",
    "CHECKPOINT_ASSETS",
    "STAGE_ASSETS",
    "base_model",
    "benchmark_scores",
    "benchmarks",
    "train_problems",
]
