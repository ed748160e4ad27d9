"""Running a training stage from an asset: identity, MLflow run, compute, checkpoint publishing.

The stage's driver is named in the library's registry (``npr_pipelines.compute.stage_job.DRIVERS``)
and runs in a working directory keyed by the stage's run key, so a new Dagster run after a crash
resumes from the last checkpoint there. Each checkpoint is published to storage and indexed as it is
written (from inside the compute), which is what the checkpoint sensor turns into ``benchmark_scores``
partitions; the asset also registers them itself.

Where it runs depends on the Ray resource:

- embedded profile: a Ray task on the local (or ``address``) cluster, fed the local copy of the
  initial checkpoint and the records; the asset logs the history into its MLflow run afterwards;
- cluster profile (``job_submission_address`` set): a Ray Job submitted through dagster-ray's
  ``PipesRayJobClient``. The initial checkpoint and the records go through storage (the records are
  published under ``inputs/<stage>/<run key>``); the job gets URIs and the asset's MLflow run id as
  Pipes extras, logs into that run itself, and reports the final checkpoint back through Pipes. With
  ``RayResource.compute = "cluster"`` the job also gets the cluster layout (``compute.cluster``):
  SFT trains with DeepSpeed on Ray actors across the nodes, RL rolls out on engine replicas; the layout
  is part of the run key.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets.common import (
    checkpoint_key,
    checkpoint_metadata,
    curve_plot,
    log_asset_inputs,
    numeric_metadata,
    register_checkpoints,
    run_key,
    run_on_ray,
)
from npr_pipelines.compute.cluster import owner_replicas, owner_rollouts
from npr_pipelines.compute.stage_job import (
    PIPES_EXTRA,
    StageSpec,
    config_json,
    get_driver,
    publish_stage_checkpoint,
    publish_stage_inputs,
)
from npr_pipelines.data import Problem
from npr_pipelines.storage import Storage
from npr_pipelines.storage.checkpoints import index_uri
from npr_pipelines.tracking import StageRun, Tracker
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource


def problems_of(df: pd.DataFrame) -> list[Problem]:
    return [Problem(str(r.id), str(r.question), str(r.answer), str(r.source)) for r in df.itertuples()]


def checkpoint_cache_dir(home: Path, ref: Mapping[str, Any]) -> Path:
    """Where the local copy of the checkpoint ``ref`` lives: named by its partition AND its URI, since a
    re-trained stage publishes the same partition name (``npr_beta-000400``) under a new run key; a
    cache keyed by the partition alone would hand evaluation the old weights."""
    digest = hashlib.sha256(str(ref["uri"]).encode()).hexdigest()[:12]
    return home / "cache" / "checkpoints" / f"{ref['partition']}-{digest}"


def local_model_dir(settings: PipelineSettings, storage: Storage, ref: Mapping[str, Any]) -> Path:
    """A verified local copy of a published checkpoint (fetched once, reused after)."""
    path = checkpoint_cache_dir(settings.home_dir(), ref)
    if not (path / "MANIFEST.json").exists():
        storage.fetch_dir(ref["uri"], path, overwrite=True)
    return path


#: Record fields shown in the per-step progress line of a stage.
PROGRESS_KEYS = (
    "loss",
    "reward_mean",
    "accuracy",
    "format_valid_rate",
    "trigger_rate",
    "rollout_s",
    "train_s",
)


def _stage_task(driver: str, init_dir: str, records: list[dict[str, Any]], config: Any, workdir: str,
                storage_uri: str, stage: str, key: str, run_id: str, threads: int,
                rollout_replicas: int = 0) -> dict[str, Any]:  # fmt: skip
    """Ray task body: run the driver (an RL driver on ``rollout_replicas`` engine replicas sharing this
    task's CPUs, ``compute.cluster.owner_rollouts``), publishing each checkpoint as soon as it is written."""
    import torch

    torch.set_num_threads(threads)
    storage = Storage(storage_uri)

    def on_checkpoint(step: int, path: Path) -> None:
        publish_stage_checkpoint(storage, stage, key, step, Path(path), run_id)

    def on_log(record: dict[str, Any]) -> None:  # progress while it runs (Ray forwards worker stdout)
        shown = [f"{k} {record[k]:.4g}" for k in PROGRESS_KEYS if isinstance(record.get(k), int | float)]
        print(f"{stage} step {record.get('step')}: " + ", ".join(shown), flush=True)

    stage_driver = get_driver(driver)
    with owner_rollouts(stage_driver.compute, rollout_replicas) as extra:
        result = stage_driver.run(
            init_dir, records, config, workdir, on_checkpoint=on_checkpoint, on_log=on_log, extra=extra
        )
    for step, path in result.checkpoints:  # a resumed run may hold checkpoints written before a crash
        on_checkpoint(step, path)
    return {
        "final_step": result.final_step,
        "final_dir": str(result.final_dir),
        "steps": [s for s, _ in result.checkpoints],
        "history": result.history,
        "metrics": result.metrics,
    }


def _rollout_replicas(driver: str, config: Any, ray: RayResource) -> int:
    """Engine replicas an embedded stage rolls out on (``compute.cluster.owner_replicas``)."""
    return owner_replicas(get_driver(driver).compute, config, ray.embedded_rollout_replicas())


def _run_local(context: dg.AssetExecutionContext, run: StageRun, *, stage: str, key: str, driver: str,
               init: Mapping[str, Any], records: list[dict[str, Any]], config: Any,
               settings: PipelineSettings, store: Storage, ray: RayResource,
               rollout_replicas: int) -> dict[str, Any]:  # fmt: skip
    """The embedded path: a Ray task on the attached cluster; the asset logs the history after."""
    workdir = settings.home_dir() / "work" / stage / key
    context.log.info(f"{stage}: run key {key}, workdir {workdir}, mlflow run {run.run_id}")
    init_dir = local_model_dir(settings, store, init)
    ray.ensure()
    out = run_on_ray(
        _stage_task, driver, str(init_dir), records, config, str(workdir), store.base_uri, stage, key,
        run.run_id, ray.training_cpus(), rollout_replicas, num_cpus=ray.training_cpus(), label=stage,
    )  # fmt: skip
    for i, record in enumerate(out["history"]):
        run.log_metrics({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"},
                        step=int(record.get("step", i)))  # fmt: skip
    run.log_metrics({k: v for k, v in out["metrics"].items() if isinstance(v, int | float)})
    return out


def _run_ray_job(context: dg.AssetExecutionContext, run: StageRun, *, stage: str, key: str, driver: str,
                 init: Mapping[str, Any], records: list[dict[str, Any]], cfg: dict[str, Any],
                 tracking_uri: str, store: Storage, ray: RayResource,
                 compute: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The cluster path: a Ray Job through dagster-ray Pipes; the job logs into ``run`` itself (and with
    ``compute``, spreads the stage over the cluster: DeepSpeed ranks, engine replicas)."""
    # The job logs through the spec's run id; the variables make fluent ``mlflow`` calls land there too.
    mlflow_env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run.run_id}
    params = ray.submit_job_params(name=stage.replace("_", "-"), env_vars=mlflow_env)
    spec = StageSpec(
        stage=stage, driver=driver, run_key=key, config=cfg, init_uri=init["uri"],
        data_uri=publish_stage_inputs(store, stage, key, records), storage_uri=store.base_uri,
        tracking_uri=tracking_uri, mlflow_run_id=run.run_id, work_root=ray.job_work_dir,
        threads=ray.job_cpus(), ray_job_id=params["submission_id"], compute=compute,
    )  # fmt: skip
    context.log.info(f"{stage}: run key {key}, Ray job {spec.ray_job_id} at {ray.job_submission_address}, "
                     f"mlflow run {run.run_id}")  # fmt: skip
    invocation = ray.pipes_client().run(
        context=context, submit_job_params=params, extras={PIPES_EXTRA: spec.to_extras()}
    )
    reported = invocation.get_materialize_result(implicit_materialization=False).metadata or {}
    values = {k: getattr(v, "value", v) for k, v in reported.items()}
    missing = {"checkpoint_uri", "mlflow_run_id", "result_uri"} - set(values)
    if missing:
        raise dg.Failure(f"{stage}: the Ray job reported no {sorted(missing)}")
    if values["mlflow_run_id"] != run.run_id:
        raise dg.Failure(
            f"{stage}: the Ray job logged into MLflow run {values['mlflow_run_id']}, not {run.run_id}"
        )
    out = store.read_json(values["result_uri"])
    if out["checkpoint_uri"] != values["checkpoint_uri"]:
        raise dg.Failure(f"{stage}: the job's result and its report disagree on the final checkpoint")
    return {**out, "ray_job_id": values.get("Ray Job ID", spec.ray_job_id)}


def run_training_stage(
    context: dg.AssetExecutionContext,
    *,
    stage: str,
    asset: str,
    driver: str,
    init: Mapping[str, Any],
    data: pd.DataFrame,
    config: Any,
    upstream: Sequence[Mapping[str, Any]],
    extra_versions: Sequence[str] = (),
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
    plot_keys: Sequence[str] = ("reward_mean", "accuracy", "loss"),
    inputs: Mapping[str, tuple[Any, str]] | None = None,
) -> dg.Output[dict]:
    """Train ``config`` with the registered ``driver`` from the checkpoint ``init`` on ``data`` (problems
    or corpus rows) under an MLflow stage run, as a Ray task or a Ray Job (see the module docstring), and
    return the reference to its final checkpoint."""
    get_driver(driver)
    cfg = config_json(config)
    versions = [u["data_version"] for u in upstream] + list(extra_versions)
    compute = ray.cluster_compute()  # None: the embedded layout
    if compute is not None:  # DeepSpeed ranks and engine replicas train differently: another identity
        versions.append("compute:" + json.dumps(compute, sort_keys=True))
    rollout_replicas = 0 if ray.uses_ray_jobs() else _rollout_replicas(driver, config, ray)
    if rollout_replicas:  # embedded replicas batch differently from one engine, as above
        versions.append(f"rollout_replicas:{rollout_replicas}")
    key = run_key(stage, cfg, versions)
    store = storage.get()
    records = data.to_dict("records")
    tracker: Tracker = mlflow.tracker()
    with tracker.stage_run(
        stage=stage, run_key=key, dagster_run_id=context.run_id, asset_key=asset, code_version="1",
        upstream_run_ids=[u["mlflow_run_id"] for u in upstream if u.get("mlflow_run_id")],
    ) as run:  # fmt: skip
        run.log_params({"config": cfg})
        log_asset_inputs(run, inputs or {}, store)  # upstream asset -> (value, Dagster data version)
        if ray.uses_ray_jobs():
            out = _run_ray_job(context, run, stage=stage, key=key, driver=driver, init=init, records=records,
                               cfg=cfg, tracking_uri=tracker.tracking_uri, store=store, ray=ray,
                               compute=compute)  # fmt: skip
        else:
            out = _run_local(context, run, stage=stage, key=key, driver=driver, init=init, records=records,
                             config=config, settings=settings, store=store, ray=ray,
                             rollout_replicas=rollout_replicas)  # fmt: skip
        final = store.read_json(index_uri(checkpoint_key(stage, out["final_step"])))
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
    if out.get("ray_job_id"):
        metadata["ray_job_id"] = dg.MetadataValue.text(out["ray_job_id"])
    plot = curve_plot(out["history"], plot_keys, f"{stage} training")
    if plot is not None:
        metadata["curves"] = plot
    return dg.Output(ref, data_version=dg.DataVersion(final["data_version"]), metadata=metadata)
