"""MLflow lineage for stage runs, without Dagster: the Dagster resource and Ray jobs both use it.

One MLflow run per materialization, nested under one run per Dagster run, found again after a crash by
its ``npr.run_key`` tag (a hash of the stage config and its upstream data versions). Runs carry their
upstream runs' ids in ``npr.upstream_run_ids``, so lineage can be walked from ``npr`` down to ``base``.
Everything goes through ``MlflowClient`` with explicit run ids (no fluent global state), which is what
a Ray worker handed a run id needs too. Credentials (e.g. ``MLFLOW_TRACKING_TOKEN``) are read by MLflow
from the environment; nothing here logs them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG_RUN_KEY = "npr.run_key"
TAG_KIND = "npr.kind"
TAG_STAGE = "npr.stage"
TAG_UPSTREAM = "npr.upstream_run_ids"
TAG_CODE_VERSION = "npr.code_version"
TAG_DAGSTER_RUN = "dagster.run_id"
TAG_DAGSTER_ASSET = "dagster.asset_key"
TAG_DAGSTER_PARTITION = "dagster.partition_key"
TAG_PARENT = "mlflow.parentRunId"


def default_tracking_uri(home: str | os.PathLike | None = None) -> str:
    """``sqlite:///<NPR_HOME>/mlflow.db`` (NPR_HOME defaults to ``.npr``)."""
    root = Path(home or os.environ.get("NPR_HOME", ".npr")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _default_artifacts(tracking_uri: str) -> str | None:
    """Beside a sqlite store: ``<dir>/mlartifacts`` (MLflow's default would be ``./mlruns`` in the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass
class StageRun:
    """An open MLflow run for one stage materialization."""

    client: Any
    run_id: str
    experiment_id: str
    resumed: bool
    ui_url: str | None = None

    @property
    def url(self) -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run only the ones not logged yet (MLflow params are immutable)."""
        existing = self.client.get_run(self.run_id).data.params
        for key, value in _flatten(params).items():
            if key in existing:
                if existing[key] != str(value)[:6000]:
                    raise ValueError(
                        f"param {key!r} changed on resumed run {self.run_id}: {existing[key]!r} -> {value!r}"
                    )
                continue
            self.client.log_param(self.run_id, key, value)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_input(self, df, *, name: str, source: str, digest: str, context: str = "training") -> None:
        """Record an input dataset; ``digest`` is the Dagster data version of the upstream asset."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, [DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])])

    def register_checkpoint(
        self, name: str, uri: str, alias: str, tags: Mapping[str, str] | None = None
    ) -> str:
        """Register a checkpoint directory as a model version and point ``alias`` at it."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already registered
            self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, source=uri, run_id=self.run_id, tags=dict(tags or {})
        )
        self.client.set_registered_model_alias(name, alias, version.version)
        return version.version


def attach_stage_run(tracking_uri: str, run_id: str, ui_url: str | None = None) -> StageRun:
    """An open run created elsewhere, for a process handed its id (a stage's Ray job logging into its
    asset's run). The run must exist and be RUNNING: its owner opens and closes it."""
    client = _client(tracking_uri)
    info = client.get_run(run_id).info  # MlflowException for an unknown id
    if info.status != "RUNNING":
        raise ValueError(f"MLflow run {run_id} is {info.status}, not RUNNING: its owner has closed it")
    return StageRun(client, run_id, info.experiment_id, resumed=True, ui_url=ui_url)


class Tracker:
    """Creates, finds and closes stage runs in one experiment."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "npr-pipelines",
        ui_url: str | None = None,
        artifact_location: str | None = None,
    ):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.artifact_location = artifact_location or _default_artifacts(self.tracking_uri)
        self.ui_url = ui_url
        self.client = _client(self.tracking_uri)

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)

    def find_run_by(self, tags: Mapping[str, str]) -> Any | None:
        """The most recent run whose tags equal ``tags``."""
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=clauses,
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def parent_run(self, dagster_run_id: str, job_name: str = "") -> str:
        """The run standing for one Dagster run (created once)."""
        found = self.find_run_by({TAG_KIND: "dagster_run", TAG_DAGSTER_RUN: dagster_run_id})
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id(),
            run_name=f"dagster-{job_name or 'run'}-{dagster_run_id[:8]}",
            tags={TAG_KIND: "dagster_run", TAG_DAGSTER_RUN: dagster_run_id, "dagster.job": job_name},
        )
        return run.info.run_id

    def close_parent(self, dagster_run_id: str, status: str = "FINISHED") -> None:
        found = self.find_run_by({TAG_KIND: "dagster_run", TAG_DAGSTER_RUN: dagster_run_id})
        if found is not None:
            self.client.set_terminated(found.info.run_id, status)

    @contextmanager
    def stage_run(
        self,
        *,
        stage: str,
        run_key: str,
        dagster_run_id: str | None = None,
        asset_key: str | None = None,
        partition_key: str | None = None,
        upstream_run_ids: Sequence[str] = (),
        code_version: str | None = None,
    ) -> Iterator[StageRun]:
        """Open (or re-open, after a crash) the run of a stage keyed by ``run_key``.

        Closed FINISHED on success, FAILED on an exception (which propagates).
        """
        exp_id = self.experiment_id()
        found = self.find_run_by({TAG_RUN_KEY: run_key})
        tags = {TAG_STAGE: stage, TAG_KIND: "stage", TAG_RUN_KEY: run_key}
        if dagster_run_id:
            tags[TAG_DAGSTER_RUN] = dagster_run_id
            tags[TAG_PARENT] = self.parent_run(dagster_run_id)
        if asset_key:
            tags[TAG_DAGSTER_ASSET] = asset_key
        if partition_key:
            tags[TAG_DAGSTER_PARTITION] = partition_key
        if code_version:
            tags[TAG_CODE_VERSION] = code_version
        tags[TAG_UPSTREAM] = ",".join(upstream_run_ids)
        if found is None:
            run_id = self.client.create_run(exp_id, run_name=stage, tags=tags).info.run_id
            resumed = False
        else:
            run_id, resumed = found.info.run_id, True
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        run = StageRun(self.client, run_id, exp_id, resumed, self.ui_url)
        try:
            yield run
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def upstream_chain(self, run_id: str) -> list[str]:
        """Stage names from ``run_id`` down through ``npr.upstream_run_ids`` (depth-first, first parent)."""
        chain, current = [], run_id
        seen: set[str] = set()
        while current and current not in seen:
            seen.add(current)
            run = self.client.get_run(current)
            chain.append(run.data.tags.get(TAG_STAGE, "?"))
            ups = [u for u in run.data.tags.get(TAG_UPSTREAM, "").split(",") if u]
            current = ups[0] if ups else ""
        return chain


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
