"""Jobs, and the main job's two-phase driver.

Phase 1 materializes every unpartitioned asset (data, base model, training stages). Phase 2 evaluates
each stage's final checkpoint on the embedded benchmark through ``benchmark_scores`` partitions (a job
run per partition: the CLI's ``--select '*'`` cannot mix partitioned and unpartitioned assets). The
rest of the checkpoints are for backfills.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import dagster as dg

from assets import STAGE_ASSETS, benchmark_scores
from assets.common import COMPUTE_SECONDS
from assets.data import TOY_BENCHMARK
from npr_pipelines.eval.report import report_markdown

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


def run_main(defs: dg.Definitions, instance: dg.DagsterInstance, home: Path, log=print) -> dict[str, Any]:
    """Materialize the graph, evaluate every stage's final checkpoint, write ``home/summary.json`` and
    ``home/report.md`` (the tables of every stage), and print the report."""
    start = time.perf_counter()
    COMPUTE_SECONDS.clear()
    log("phase 1: materializing the stage assets")
    result = defs.resolve_job_def("main").execute_in_process(
        instance=instance, raise_on_error=True, run_config=QUIET
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
            instance=instance, partition_key=key, raise_on_error=True, run_config=QUIET
        )
        scores = res.output_for_node("benchmark_scores")
        all_scores.append(scores)
        stages[stage] = stage_summary(scores)
        eval_meta = scores["eval"]
        log(f"  {stage:<9} {json.dumps(stages[stage])}")
    wall = time.perf_counter() - start
    compute = sum(COMPUTE_SECONDS)
    summary = {
        "wall_time_s": wall,
        # Time inside the Ray task bodies (training, sampling, evaluation) vs everything else: Dagster,
        # Ray scheduling and worker start-up, MLflow logging, storage publishing and fetching.
        "timing": {
            "compute_s": round(compute, 1),
            "orchestration_s": round(wall - compute, 1),
            "orchestration_share": round((wall - compute) / wall, 3) if wall else None,
            "ray_tasks": len(COMPUTE_SECONDS),
        },
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
    (home / "summary.json").write_text(json.dumps(summary, indent=2))
    report = report_markdown(all_scores, by="stage", title=f"Final checkpoints on {TOY_BENCHMARK}")
    (home / "report.md").write_text(report)
    log(report)
    t = summary["timing"]
    log(
        f"wall {wall:.0f} s: compute {t['compute_s']:.0f} s in {t['ray_tasks']} Ray tasks, orchestration "
        f"(Dagster, Ray, MLflow, storage) {t['orchestration_s']:.0f} s ({t['orchestration_share']:.0%})"
    )
    return summary
