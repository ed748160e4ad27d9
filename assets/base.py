"""The base model: the toy world's bootstrapped instruct-like model, or, under a real-model profile,
a real checkpoint (e.g. Qwen3-4B-Instruct-2507) from a local directory or an ``s3://`` prefix.

Toy: bootstrapped in a Ray task, cached by config hash. Real: the directory named by
``PipelineSettings.base_model_uri`` / ``NPR_BASE_MODEL_URI`` is checked (safetensors only, a
transformers-native ``model_type``, a tokenizer with a chat template) and verified (an ``s3://`` source
must carry a ``MANIFEST.json``; a plain local directory is hashed), see
``npr_pipelines.storage.model_source``. Either way the model is published atomically into the artifact
store and registered as the ``base`` checkpoint."""

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
from npr_pipelines.profiles import BASE_MODEL, PaperProfile, get_profile, resolve
from npr_pipelines.storage.model_source import open_model_dir, publish_base_model
from npr_pipelines.toy.bootstrap import BootstrapConfig, bootstrap_base_model, bootstrap_manifest
from npr_pipelines.toy.cache import to_json
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
    """The toy base model (cached by a hash of its config, so re-materializing does not retrain), or
    the real-model profile's checkpoint (published once per content)."""
    profile = get_profile(settings.profile, seed=settings.seed)
    if isinstance(profile, PaperProfile):
        return _real_base_model(context, profile, settings, storage, mlflow)
    config = replace(profile.bootstrap, cache_dir=str(settings.home_dir() / "cache"))
    ray.ensure()
    local = Path(run_on_ray(_bootstrap, config, num_cpus=ray.training_cpus(), label="base"))
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


def _real_base_model(
    context: AssetExecutionContext,
    profile: PaperProfile,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[dict]:
    """A real checkpoint from ``base_model_uri`` (local or ``s3://``), checked, verified and published."""
    source = resolve(BASE_MODEL, settings.base_model_uri)
    cache = settings.home_dir() / "cache"
    model = open_model_dir(source, cache / "base_models")
    context.log.info(f"base model {source}: {model.info} ({model.verified}, digest {model.digest})")
    store = storage.get()
    tracker = mlflow.tracker()
    with tracker.stage_run(
        stage="base", run_key=model.digest, dagster_run_id=context.run_id, asset_key="base_model",
        code_version="1",
    ) as run:  # fmt: skip
        run.log_params({"profile": profile.name, "paper_model": profile.model, "source": source,
                        "verified": model.verified, "model": model.info})  # fmt: skip
        uri, version = publish_base_model(store, model, cache / "staging")
        run.register_checkpoint("npr-base", uri, alias="final")
    ref = checkpoint_ref(stage="base", step=0, uri=uri, data_version=version, run_id=run.run_id)
    record_checkpoint(store, ref)
    register_checkpoints(context.instance, [checkpoint_key("base", None)])
    return dg.Output(
        ref,
        data_version=dg.DataVersion(version),
        metadata={
            **checkpoint_metadata(ref, run.url),
            "source": dg.MetadataValue.text(source),
            "verified": dg.MetadataValue.text(model.verified),
            "model": dg.MetadataValue.json(model.info),
        },
    )
