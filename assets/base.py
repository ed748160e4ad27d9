"""The base model: the toy world's bootstrapped instruct-like model (a real model's directory on a
cluster). Bootstrapped in a Ray task, published atomically, registered as the ``base`` checkpoint."""

import json
from dataclasses import replace
from pathlib import Path

import dagster as dg
from dagster import AssetExecutionContext

from assets.common import (
    checkpoint_key,
    checkpoint_metadata,
    checkpoint_ref,
    numeric_metadata,
    publish_checkpoint,
    record_checkpoint,
    register_checkpoints,
    run_on_ray,
)
from npr_pipelines.toy.bootstrap import BootstrapConfig, bootstrap_base_model, bootstrap_manifest
from npr_pipelines.toy.cache import to_json
from npr_pipelines.toy.profiles import get_profile
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource


def _bootstrap(config: BootstrapConfig) -> str:
    return str(bootstrap_base_model(config))


@dg.asset(group_name="models", kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def base_model(
    context: AssetExecutionContext,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """The toy base model (cached by a hash of its config, so re-materializing does not retrain)."""
    profile = get_profile(settings.profile, seed=settings.seed)
    config = replace(profile.bootstrap, cache_dir=str(settings.home_dir() / "cache"))
    ray.ensure()
    local = Path(run_on_ray(_bootstrap, config, num_cpus=ray.training_cpus()))
    stats = bootstrap_manifest(local).get("stats", {})
    tracker = mlflow.tracker()
    with tracker.stage_run(
        stage="base", run_key=config.key, dagster_run_id=context.run_id, asset_key="base_model",
        code_version="1",
    ) as run:  # fmt: skip
        run.log_params({"bootstrap": to_json(config)})
        scalars = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        run.log_metrics(scalars)
        uri, version = publish_checkpoint(storage.get(), "base", config.key, 0, local)
        run.register_checkpoint("npr-base", uri, alias="final")
    ref = checkpoint_ref(
        stage="base", step=0, uri=uri, data_version=version, run_id=run.run_id, metrics=scalars
    )
    record_checkpoint(storage.get(), ref)
    register_checkpoints(context.instance, [checkpoint_key("base", None)])
    return dg.Output(
        ref,
        data_version=dg.DataVersion(version),
        metadata={
            **checkpoint_metadata(ref, run.url),
            "bootstrap": dg.MetadataValue.json(json.loads(json.dumps(to_json(config)))),
            **numeric_metadata(scalars),
        },
    )
