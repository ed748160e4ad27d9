"""Running a training stage from an asset: identity, MLflow run, Ray task, checkpoint publishing.

The Ray task runs the library driver (``run_rl``, ``run_sft``, ...) in a working directory keyed by the
stage's run key, so a new Dagster run after a crash resumes from the last checkpoint there. Each
checkpoint is published to storage and indexed as it is written (from inside the task), which is what
the checkpoint sensor turns into ``benchmark_scores`` partitions; the asset also registers them itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets.common import (
    checkpoint_key,
    checkpoint_metadata,
    checkpoint_ref,
    curve_plot,
    numeric_metadata,
    publish_checkpoint,
    record_checkpoint,
    register_checkpoints,
    run_key,
    run_on_ray,
)
from npr_pipelines.data import Problem
from npr_pipelines.storage import Storage
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource


def problems_of(df: pd.DataFrame) -> list[Problem]:
    return [Problem(str(r.id), str(r.question), str(r.answer), str(r.source)) for r in df.itertuples()]


def local_model_dir(settings: PipelineSettings, storage: Storage, ref: Mapping[str, Any]) -> Path:
    """A verified local copy of a published checkpoint (fetched once, reused after)."""
    path = settings.home_dir() / "cache" / "checkpoints" / ref["partition"]
    if not (path / "MANIFEST.json").exists():
        storage.fetch_dir(ref["uri"], path, overwrite=True)
    return path


def _stage_task(driver: Callable[..., Any], args: tuple, kwargs: dict, workdir: str, storage_uri: str, stage: str,
                key: str, run_id: str, threads: int) -> dict[str, Any]:  # fmt: skip
    """Ray task body: run the driver, publishing each checkpoint as soon as it is written."""
    import torch

    torch.set_num_threads(threads)
    storage = Storage(storage_uri)

    def on_checkpoint(step: int, path: Path) -> None:
        uri, version = publish_checkpoint(storage, stage, key, step, Path(path))
        record_checkpoint(storage, checkpoint_ref(stage=stage, step=step, uri=uri, data_version=version,
                                                  run_id=run_id))  # fmt: skip

    result = driver(*args, workdir=Path(workdir), on_checkpoint=on_checkpoint, **kwargs)
    for step, path in result.checkpoints:  # a resumed run may hold checkpoints written before a crash
        on_checkpoint(step, path)
    return {
        "final_step": result.final_step,
        "final_dir": str(result.final_dir),
        "steps": [s for s, _ in result.checkpoints],
        "history": result.history,
        "metrics": result.metrics,
    }


def run_training_stage(
    context: dg.AssetExecutionContext,
    *,
    stage: str,
    asset: str,
    driver: Callable[..., Any],
    driver_args: Sequence[Any],
    config: Any,
    driver_kwargs: Mapping[str, Any] | None = None,
    upstream: Sequence[Mapping[str, Any]],
    extra_versions: Sequence[str] = (),
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
    plot_keys: Sequence[str] = ("reward_mean", "accuracy", "loss"),
) -> dg.Output[dict]:
    """Run ``driver(*driver_args, workdir=..., on_checkpoint=..., **driver_kwargs)`` as a Ray task under
    an MLflow stage run and return the reference to its final checkpoint."""
    cfg = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    versions = [u["data_version"] for u in upstream] + list(extra_versions)
    key = run_key(stage, cfg, versions)
    workdir = settings.home_dir() / "work" / stage / key
    store = storage.get()
    tracker = mlflow.tracker()
    with tracker.stage_run(
        stage=stage, run_key=key, dagster_run_id=context.run_id, asset_key=asset, code_version="1",
        upstream_run_ids=[u["mlflow_run_id"] for u in upstream if u.get("mlflow_run_id")],
    ) as run:  # fmt: skip
        run.log_params({"config": cfg})
        context.log.info(f"{stage}: run key {key}, workdir {workdir}, mlflow run {run.run_id}")
        ray.ensure()
        out = run_on_ray(
            _stage_task, driver, tuple(driver_args), dict(driver_kwargs or {}), str(workdir), store.base_uri,
            stage, key, run.run_id,
            ray.training_cpus(), num_cpus=ray.training_cpus(),
        )  # fmt: skip
        for i, record in enumerate(out["history"]):
            run.log_metrics({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"},
                            step=int(record.get("step", i)))  # fmt: skip
        run.log_metrics({k: v for k, v in out["metrics"].items() if isinstance(v, int | float)})
        final = store.read_json(f"checkpoints/index/{checkpoint_key(stage, out['final_step'])}.json")
        run.register_checkpoint(f"npr-{stage.replace('_', '-')}", final["uri"], alias="final")
    keys = [checkpoint_key(stage, s) for s in out["steps"]]
    register_checkpoints(context.instance, keys)
    ref = {**final, "metrics": out["metrics"]}
    metadata: dict[str, Any] = {
        **checkpoint_metadata(ref, run.url),
        **numeric_metadata(out["metrics"]),
        "checkpoints": dg.MetadataValue.json(keys),
        "run_key": key,
    }
    plot = curve_plot(out["history"], plot_keys, f"{stage} training")
    if plot is not None:
        metadata["curves"] = plot
    return dg.Output(ref, data_version=dg.DataVersion(final["data_version"]), metadata=metadata)
