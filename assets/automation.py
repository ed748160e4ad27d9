"""Automation: a re-training schedule (off by default), a sensor that re-trains when the training
problems' source changes version, and a sensor that turns newly published checkpoints into
``benchmark_scores`` partitions and requests their evaluation (cursor-based, idempotent)."""

import hashlib
import json
import os

import dagster as dg

from assets.common import CHECKPOINTS
from assets.data import BENCHMARKS
from assets.jobs import EVAL_JOB, MAIN_JOB
from npr_pipelines.storage import Storage

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
    known: set[str], published: list[str], benchmarks: list[str]
) -> tuple[list[str], list]:
    """The checkpoints not seen yet and one evaluation request per (checkpoint, benchmark)."""
    new = sorted(set(published) - known)
    requests = [
        dg.RunRequest(
            run_key=f"eval-{ckpt}-{bench}",
            partition_key=dg.MultiPartitionKey({"checkpoint": ckpt, "benchmark": bench}),
        )
        for ckpt in new
        for bench in benchmarks
    ]
    return new, requests


@dg.sensor(job=EVAL_JOB, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def checkpoint_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Register every newly published checkpoint as a partition and request its evaluation."""
    storage = _storage()
    index = "checkpoints/index"
    published = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in storage.ls(index)] if storage.exists(
        index
    ) else []  # fmt: skip
    known = set(json.loads(context.cursor)) if context.cursor else set()
    new, requests = new_checkpoint_requests(known, published, profile_benchmarks())
    if not new:
        return dg.SkipReason(f"no new checkpoints ({len(known)} known)")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[CHECKPOINTS.build_add_request(new)],
        cursor=json.dumps(sorted(known | set(new))),
    )
