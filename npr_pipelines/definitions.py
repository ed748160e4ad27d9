"""The Dagster code location (``workspace.yaml`` names this module; nothing in the library imports it).

Resources default to the embedded profile: local Ray on 127.0.0.1, storage and MLflow under
``$NPR_HOME`` (``.npr``). ``NPR_PROFILE`` picks the stage configs (``default``, ``small``, or ``paper``
for a real model: ``NPR_BASE_MODEL_URI``, ``NPR_TRAIN_PROBLEMS`` and ``NPR_BENCHMARK_DIR`` name its inputs).
``NPR_RAY_JOBS_ADDRESS`` (a Ray dashboard URL) selects the cluster profile for training stages: each is
submitted as a Ray Job through dagster-ray Pipes (``resources/ray.py``); ``NPR_COMPUTE=cluster`` spreads
each job over the cluster (DeepSpeed ranks for SFT, engine replicas for RL rollouts) and
``NPR_RAY_ADDRESS`` (the cluster's GCS address) runs rejection sampling and evaluation there too.
``NPR_STORAGE_URI`` (e.g. ``s3://bucket/prefix``) and ``MLFLOW_TRACKING_URI`` point artifacts and
lineage at shared services (``docker/compose.yaml`` sets both).
"""

from __future__ import annotations

import os

import dagster as dg

from assets import ALL_ASSETS, CHECKPOINT_ASSETS
from assets.automation import (
    checkpoint_sensor,
    mlflow_parent_closers,
    retrain_schedule,
    train_problems_changed,
)
from assets.checks import checkpoint_checks
from assets.io_manager import NprIOManager
from assets.jobs import EVAL_JOB, MAIN_JOB
from assets.training import corpus_recheck
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource


def build_definitions(profile: str | None = None, *, ray: RayResource | None = None) -> dg.Definitions:
    """The code location; ``ray`` replaces the Ray resource the environment describes (tests)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=[*checkpoint_checks(CHECKPOINT_ASSETS), corpus_recheck],
        jobs=[MAIN_JOB, EVAL_JOB],
        schedules=[retrain_schedule],
        sensors=[checkpoint_sensor, train_problems_changed, *mlflow_parent_closers],
        resources={
            "settings": PipelineSettings(
                profile=profile or os.environ.get("NPR_PROFILE", "default"),
                benchmark_root=os.environ.get("NPR_BENCHMARK_DIR", ""),
                base_model_uri=os.environ.get("NPR_BASE_MODEL_URI", ""),
                train_problems_uri=os.environ.get("NPR_TRAIN_PROBLEMS", ""),
            ),
            "storage": StorageResource(base_uri=os.environ.get("NPR_STORAGE_URI", "")),
            "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
            "ray": ray
            or RayResource(
                address=os.environ.get("NPR_RAY_ADDRESS", ""),
                job_submission_address=os.environ.get("NPR_RAY_JOBS_ADDRESS", ""),
                compute=os.environ.get("NPR_COMPUTE", "embedded"),
            ),
            "io_manager": NprIOManager(),
        },
    )


defs = build_definitions()
