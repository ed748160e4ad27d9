"""Jobs, and the main job's two-phase driver.

Phase 1 materializes every unpartitioned asset (data, base model, training stages). Phase 2 evaluates
each stage's final checkpoint on the embedded benchmark through ``benchmark_scores`` partitions (a job
run per partition: the CLI's ``--select '*'`` cannot mix partitioned and unpartitioned assets). The
rest of the checkpoints are for backfills.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from assets import STAGE_ASSETS, benchmark_scores
from assets.common import COMPUTE_SECONDS
from assets.data import TOY_BENCHMARK
from npr_pipelines.eval.report import report_markdown
from npr_pipelines.machine import machine_info
from npr_pipelines.storage import Storage
from npr_pipelines.tracking import Tracker

MAIN_JOB = dg.define_asset_job("main", selection=dg.AssetSelection.assets(*STAGE_ASSETS))
EVAL_JOB = dg.define_asset_job("evaluate", selection=dg.AssetSelection.assets(benchmark_scores))

#: Stage name -> the asset whose output references its final checkpoint.
STAGE_OUTPUTS: dict[str, str] = {
    "base": "base_model",
    "npr_zero": "npr_zero_policy",
    "npr_beta": "npr_beta_checkpoint",
    "npr": "npr_policy",
    "sr_beta": "sr_beta_checkpoint",
    "sr": "sr_policy",
}

#: Tags of the runs `run_main` executes in process. They have no run worker for Dagster to monitor, so
#: when their process dies they stay STARTED and keep their ``compute`` pool slot (the restart's steps
#: would wait for it forever); the next `run_main` in the same home fails them and frees their slots.
RUN_TAGS = {"npr/launcher": "npr-run"}
UNFINISHED = (
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
)  # fmt: skip

#: Console logging at INFO: progress stays visible without Dagster's per-event DEBUG lines.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

SUMMARY_FIELDS = (
    "mode", "accuracy", "format_valid_rate", "format_score_mean", "trigger_rate", "mean_critical_path_ratio",
    "sequential_mode_accuracy", "sequential_mode_format_valid_rate", "throughput_speedup", "latency_speedup",
)  # fmt: skip


def stage_summary(scores: dict[str, Any]) -> dict[str, Any]:
    """One stage's entry of ``summary.json`` from its ``benchmark_scores`` output."""
    modes = scores["modes"]
    primary = modes[scores["mode"]]
    seq = modes.get("sequential") if scores["mode"] != "sequential" else None
    entry = {
        "mode": scores["mode"],
        "accuracy": primary["accuracy"],
        "format_valid_rate": primary["format_valid_rate"],
        "format_score_mean": primary["format_score_mean"],
        "trigger_rate": primary["trigger_rate"] if scores["mode"] == "parallel" else None,
        "mean_critical_path_ratio": primary.get("mean_critical_path_ratio"),
        "sequential_mode_accuracy": seq["accuracy"] if seq else None,
        "sequential_mode_format_valid_rate": seq["format_valid_rate"] if seq else None,
        "throughput_speedup": scores.get("throughput_speedup"),
        "latency_speedup": scores.get("latency_speedup"),
    }
    return {k: entry[k] for k in SUMMARY_FIELDS}


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold ``home`` for one main job: an exclusive ``flock`` the OS releases when the process dies."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".npr-run.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{home} is in use by another `npr run` (it holds {f.name})") from None
        yield


def recover_interrupted_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the main job's runs that a killed process left unfinished, and free their pool slots.

    Only safe under `home_lock`: a live `run_main` on this instance would hold the lock.
    """
    runs = instance.get_runs(dg.RunsFilter(tags=RUN_TAGS, statuses=list(UNFINISHED)))
    for run in runs:
        instance.report_run_failed(run, "interrupted: the process that executed this run died")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return [run.run_id for run in runs]


#: A finished Dagster run's status -> the status its MLflow parent run is closed with.
MLFLOW_STATUS = {
    dg.DagsterRunStatus.SUCCESS: "FINISHED",
    dg.DagsterRunStatus.FAILURE: "FAILED",
    dg.DagsterRunStatus.CANCELED: "KILLED",
}


def close_mlflow_parents(instance: dg.DagsterInstance, tracker: Tracker, since: float) -> int:
    """Close the MLflow parent runs (``Tracker.parent_run``) of this launcher's Dagster runs created
    after ``since`` (a timestamp) that have ended; returns how many Dagster runs were looked at. (Runs the
    daemon launches are closed by the ``close_mlflow_parent_on_*`` sensors instead.)"""
    ended = dg.RunsFilter(
        tags=RUN_TAGS, statuses=list(MLFLOW_STATUS), created_after=datetime.fromtimestamp(since, UTC)
    )
    runs = instance.get_runs(ended)
    for run in runs:
        tracker.close_parent(run.run_id, MLFLOW_STATUS[run.status])
    return len(runs)


def run_main(defs: dg.Definitions, instance: dg.DagsterInstance, home: Path, log=print) -> dict[str, Any]:
    """Materialize the graph, evaluate every stage's final checkpoint, write ``home/summary.json`` and
    ``home/report.md`` (the tables of every stage), and print the report.

    A run after a crash resumes: stages find their working directories by run key, and the runs the
    crashed process left unfinished are failed first (`recover_interrupted_runs`)."""
    with home_lock(home):
        started = time.time()
        recovered = recover_interrupted_runs(instance)
        if recovered:
            log(f"recovered {len(recovered)} interrupted run(s): {', '.join(recovered)}")
        tracker = defs.resources["mlflow"].tracker()
        try:
            return _run_main(defs, instance, home, log)
        finally:  # also on failure: MLflow then shows FAILED, not RUNNING forever
            try:
                for run_id in recovered:
                    tracker.close_parent(run_id, "FAILED")
                close_mlflow_parents(instance, tracker, since=started)
            except Exception as exc:  # never hide the run's own outcome behind a tracking error
                log(f"could not close the MLflow runs of this launch: {exc!r}")


def _run_main(defs: dg.Definitions, instance: dg.DagsterInstance, home: Path, log) -> dict[str, Any]:
    start = time.perf_counter()
    COMPUTE_SECONDS.clear()
    log("phase 1: materializing the stage assets")
    result = defs.resolve_job_def("main").execute_in_process(
        instance=instance, raise_on_error=True, run_config=QUIET, tags=RUN_TAGS
    )
    refs: dict[str, dict] = {}
    for stage, asset in STAGE_OUTPUTS.items():
        refs[stage] = result.output_for_node(asset)
    log(f"phase 2: evaluating {len(refs)} final checkpoints on {TOY_BENCHMARK}")
    eval_job = defs.resolve_job_def("evaluate")
    stages: dict[str, Any] = {}
    all_scores: list[dict[str, Any]] = []
    eval_meta: dict[str, Any] = {}
    for stage, ref in refs.items():
        key = dg.MultiPartitionKey({"checkpoint": ref["partition"], "benchmark": TOY_BENCHMARK})
        res = eval_job.execute_in_process(
            instance=instance, partition_key=key, raise_on_error=True, run_config=QUIET, tags=RUN_TAGS
        )
        scores = res.output_for_node("benchmark_scores")
        all_scores.append(scores)
        stages[stage] = stage_summary(scores)
        eval_meta = scores["eval"]
        log(f"  {stage:<9} {json.dumps(stages[stage])}")
    wall = time.perf_counter() - start
    by_label: dict[str, float] = {}
    for label, seconds in COMPUTE_SECONDS:
        by_label[label] = by_label.get(label, 0.0) + seconds
    tasks = {label: round(seconds, 1) for label, seconds in by_label.items()}
    compute = sum(by_label.values())
    summary = {
        "wall_time_s": wall,
        # Time inside the Ray task bodies (training, sampling, evaluation) vs everything else: Dagster,
        # Ray scheduling and worker start-up, MLflow logging, storage publishing and fetching.
        "timing": {
            "compute_s": round(compute, 1),
            "orchestration_s": round(wall - compute, 1),
            "orchestration_share": round((wall - compute) / wall, 3) if wall else None,
            "ray_tasks": len(COMPUTE_SECONDS),
            "tasks": tasks,  # compute seconds per Ray task, in the order they ran
        },
        # Timings and trained figures both depend on the machine (see ``npr_pipelines.machine``).
        "machine": machine_info(),
        "eval": {
            "benchmark": eval_meta.get("benchmark"),
            "n_problems": eval_meta.get("n_problems"),
            "n_samples": eval_meta.get("n_samples"),
            "temperature": eval_meta.get("temperature"),
            "top_p": eval_meta.get("top_p"),
            "seed": eval_meta.get("seed"),
        },
        "stages": stages,
    }
    home_files = Storage(str(home))  # atomic writes: a kill never leaves a truncated summary or report
    home_files.write_bytes("summary.json", json.dumps(summary, indent=2).encode())
    report = report_markdown(all_scores, by="stage", title=f"Final checkpoints on {TOY_BENCHMARK}")
    home_files.write_bytes("report.md", report.encode())
    log(report)
    t = summary["timing"]
    log(
        f"wall {wall:.0f} s: compute {t['compute_s']:.0f} s in {t['ray_tasks']} Ray tasks, orchestration "
        f"(Dagster, Ray, MLflow, storage) {t['orchestration_s']:.0f} s ({t['orchestration_share']:.0%})"
    )
    log("compute by task: " + ", ".join(f"{label} {seconds:.0f} s" for label, seconds in tasks.items()))
    m = summary["machine"]
    log(f"machine: {m['cpu']}, {m['usable_cpus']} cores, torch kernels {m['torch_cpu_capability']}")
    return summary
