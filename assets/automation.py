"""Automation: a re-training schedule (off by default), a sensor that re-trains when the training
problems' source changes version, a sensor that turns newly published checkpoints into
``benchmark_scores`` partitions and requests their evaluation (cursor-based, idempotent), and run
status sensors that close a Dagster run's MLflow parent run when the Dagster run ends."""

import hashlib
import json
import os

import dagster as dg

from assets.common import CHECKPOINTS
from assets.data import BENCHMARKS
from assets.jobs import EVAL_JOB, MAIN_JOB, MLFLOW_STATUS
from npr_pipelines.storage import Storage
from npr_pipelines.storage.checkpoints import INDEX_PREFIX, read_checkpoint
from resources import MlflowResource

retrain_schedule = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=MAIN_JOB,
    cron_schedule="0 3 * * 0",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-train the whole pipeline weekly (off by default: training is expensive).",
)


def _storage() -> Storage:
    """The artifact store the assets publish to: ``NPR_STORAGE_URI``, else ``$NPR_HOME/artifacts``."""
    return Storage(
        os.environ.get("NPR_STORAGE_URI") or os.path.join(os.environ.get("NPR_HOME", ".npr"), "artifacts")
    )


def profile_benchmarks() -> list[str]:
    """The benchmarks new checkpoints are evaluated on: every registered one, or under a real-model
    profile (``NPR_PROFILE``) the file benchmarks (it has no toy splits)."""
    from npr_pipelines.eval.benchmarks import REGISTRY
    from npr_pipelines.profiles import PaperProfile, get_profile

    keys = BENCHMARKS.get_partition_keys()
    if isinstance(get_profile(os.environ.get("NPR_PROFILE", "default")), PaperProfile):
        return [k for k in keys if REGISTRY[k].file is not None]
    return keys


def train_source_version() -> str:
    """Version of the training problems' source: the file's bytes when ``NPR_TRAIN_PROBLEMS`` names one,
    else the toy profile's problem settings (a real-model profile needs the file)."""
    from npr_pipelines.profiles import TRAIN_PROBLEMS, PaperProfile, get_profile, resolve

    uri = os.environ.get("NPR_TRAIN_PROBLEMS", "")
    profile = None if uri else get_profile(os.environ.get("NPR_PROFILE", "default"))
    if isinstance(profile, PaperProfile):
        uri = resolve(TRAIN_PROBLEMS)  # raises, naming the variable
    if uri:
        import fsspec

        with fsspec.open(uri, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:24]
    from npr_pipelines.toy.cache import to_json

    payload = json.dumps([to_json(profile.bootstrap.problems), profile.train_problems], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dg.sensor(job=MAIN_JOB, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED)
def train_problems_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Re-train when the training problems' source changes (the first evaluation only records it)."""
    version = train_source_version()
    if context.cursor is None:
        return dg.SensorResult(cursor=version, skip_reason="recorded the current source version")
    if version == context.cursor:
        return dg.SkipReason(f"train problems unchanged ({version})")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"retrain-{version}")], cursor=version)


def new_checkpoint_requests(
    known: dict[str, str], published: dict[str, str], benchmarks: list[str]
) -> tuple[list[str], list]:
    """The checkpoints not seen yet, or re-published under a new data version (a re-trained stage keeps
    its partition names), and one evaluation request per (checkpoint, benchmark), keyed by the version.

    ``known`` and ``published`` map partition -> checkpoint data version."""
    changed = sorted(name for name, version in published.items() if known.get(name) != version)
    requests = [
        dg.RunRequest(
            run_key=f"eval-{ckpt}-{bench}-{published[ckpt]}",
            partition_key=dg.MultiPartitionKey({"checkpoint": ckpt, "benchmark": bench}),
        )
        for ckpt in changed
        for bench in benchmarks
    ]
    return changed, requests


def _known_checkpoints(cursor: str | None, published: dict[str, str]) -> dict[str, str]:
    """The cursor as partition -> data version. A cursor of the earlier shape (a list of names) adopts
    the published versions of those names, rather than re-evaluating every checkpoint once."""
    if not cursor:
        return {}
    loaded = json.loads(cursor)
    if isinstance(loaded, list):
        return {name: published.get(name, "") for name in loaded}
    return dict(loaded)


@dg.sensor(job=EVAL_JOB, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def checkpoint_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Register every newly published checkpoint as a partition and request its evaluation; a
    checkpoint re-published under the same partition name with a new data version is evaluated again."""
    storage = _storage()
    paths = storage.ls(INDEX_PREFIX) if storage.exists(INDEX_PREFIX) else []
    published = {}
    for path in paths:
        file = path.rsplit("/", 1)[-1]
        if file.startswith(".") or not file.endswith(".json"):  # staging files of an atomic write
            continue
        name = file.removesuffix(".json")
        published[name] = str(read_checkpoint(storage, name).get("data_version", ""))
    known = _known_checkpoints(context.cursor, published)
    changed, requests = new_checkpoint_requests(known, published, profile_benchmarks())
    if not changed:
        return dg.SkipReason(f"no new checkpoints ({len(known)} known)")
    new = [name for name in changed if name not in known]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[CHECKPOINTS.build_add_request(new)] if new else [],
        cursor=json.dumps({**known, **{name: published[name] for name in changed}}, sort_keys=True),
    )


def _mlflow_parent_closer(run_status: dg.DagsterRunStatus) -> dg.RunStatusSensorDefinition:
    """A sensor closing the MLflow run that stands for a Dagster run (``Tracker.parent_run``, which the
    stage runs nest under) when the Dagster run ends, so MLflow does not show it RUNNING forever."""

    @dg.run_status_sensor(
        run_status=run_status,
        name=f"close_mlflow_parent_on_{run_status.value.lower()}",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def close_parent(context: dg.RunStatusSensorContext, mlflow: MlflowResource) -> None:
        mlflow.tracker().close_parent(context.dagster_run.run_id, MLFLOW_STATUS[run_status])

    return close_parent


mlflow_parent_closers = [_mlflow_parent_closer(status) for status in MLFLOW_STATUS]
