"""``benchmark_scores``: every (checkpoint x benchmark) partition, in the checkpoint's mode(s).

base and npr_zero are sequential models (tags are text); npr_beta and npr are evaluated in parallel
mode AND in sequential mode (the format is learnt, not forced by the engine); the SR ablations are
sequential. Samples are kept in storage next to the summary so a person can see why an answer failed.

In the cluster profile (``RayResource.compute = "cluster"``) the sampled evaluation is dispatched over
a pool of engine replicas (Ray actors, ``npr_pipelines.compute.engine_pool``); the materialization's
``engine_pool`` metadata says which replicas, on which nodes, decoded how many requests.

Two-mode checkpoints also get the speedups of DESIGN.md (throughput: all prompts in flight; latency:
the first ``latency_problems`` problems one at a time). A partition is resumable: its graded chunks are
saved under ``$NPR_HOME/work/eval/<run key>`` (key: checkpoint data version, eval config, problem set)
and a re-run after a crash decodes only the rest. Each materialization saves its scores under
``reports/scores`` and attaches the report over every stored score (the paper's Tables 1-3, this
checkpoint in bold) and a plot across checkpoints, also logged to its MLflow run.
"""

import hashlib
import json
from typing import Any

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.common import CHECKPOINTS, numeric_metadata, png_markdown, read_checkpoint, run_key, run_on_ray
from assets.configs import profile_prompt
from assets.data import BENCHMARKS
from assets.stage_runner import local_model_dir
from npr_pipelines.eval.benchmarks import get_benchmark
from npr_pipelines.eval.report import headline_metrics, report_figure, report_markdown
from npr_pipelines.eval.speedup import mode_speedups
from npr_pipelines.profiles import get_profile
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

EVAL_PARTITIONS = dg.MultiPartitionsDefinition({"checkpoint": CHECKPOINTS, "benchmark": BENCHMARKS})

#: Modes each stage is evaluated in; the first is its primary mode.
STAGE_MODES: dict[str, tuple[str, ...]] = {
    "base": ("sequential",),
    "npr_zero": ("sequential",),
    "npr_beta": ("parallel", "sequential"),
    "npr": ("parallel", "sequential"),
    "sr_beta": ("sequential",),
    "sr": ("sequential",),
}


#: Problems per engine call (all their samples in flight); also the unit saved for resuming.
EVAL_CHUNK = 64
#: Where benchmark_scores keeps each partition's scores (without samples) for the reports.
SCORES_PREFIX = "reports/scores"


def _evaluate(model_dir: str, problems: list[dict], modes: tuple[str, ...], eval_kwargs: dict, prompt,
              threads: int, workdir: str, latency_problems: int, pool: dict | None = None) -> dict:  # fmt: skip
    """Ray task body: load the checkpoint and evaluate it in each mode, every prompt in flight (chunks
    saved under ``workdir`` as they finish, reused by a re-run), then time the first
    ``latency_problems`` problems one request at a time.

    With ``pool`` (``EnginePool`` keyword arguments: the cluster profile) the sampled evaluation is
    dispatched over engine replicas (Ray actors) and ``engine_pool`` in the result describes them; the
    latencies are still measured on one engine in this task, one request at a time."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr_pipelines.data import Problem
    from npr_pipelines.eval.resume import evaluate_resumable, latency_resumable
    from npr_pipelines.eval.runner import EvalConfig, build_engine, mode_summary

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    probs = [Problem(p["id"], p["question"], p["answer"], p["source"]) for p in problems]
    replicas = _engine_pool(model, tokenizer, EvalConfig(**eval_kwargs), pool) if pool else None
    out: dict[str, Any] = {}
    try:
        for mode in modes:
            cfg = EvalConfig(mode=mode, **eval_kwargs)
            engine = build_engine(model, tokenizer, cfg)
            records, wall, reused = evaluate_resumable(
                model, tokenizer, probs, cfg, prompt, Path(workdir), EVAL_CHUNK, replicas or engine, log=print
            )
            latencies = latency_resumable(
                model, tokenizer, probs[:latency_problems], cfg, prompt, Path(workdir), engine
            )
            summary = mode_summary(records, wall, latencies, pass_ks=(1,))
            out[mode] = {
                "summary": summary,
                "records": [r.to_dict() for r in records],
                "reused_chunks": reused,
            }
        if replicas is not None:
            out["engine_pool"] = replicas.describe()
    finally:
        if replicas is not None:
            replicas.shutdown()
    return out


def _engine_pool(model, tokenizer, config, pool: dict):
    """Engine replicas over ``model`` (both modes: the mode is per request)."""
    from npr_pipelines.compute.engine_pool import EnginePool
    from npr_pipelines.eval.runner import engine_parts

    return EnginePool(model, *engine_parts(tokenizer, config), **pool)


def _pool_kwargs(compute: dict | None) -> dict | None:
    """``EnginePool`` keyword arguments of the cluster layout (``RayResource.cluster_compute``), if any."""
    if not compute or not compute["engine_replicas"]:
        return None
    return {
        "replicas": compute["engine_replicas"], "cpus": compute["engine_cpus"], "gpus": compute["engine_gpus"],
        "placement_strategy": compute["engine_placement_strategy"], "threads": max(1, int(compute["engine_cpus"])),
    }  # fmt: skip


def problems_digest(problems: list[dict]) -> str:
    """A digest of the problem set (ids, questions, answers, in order): part of the evaluation's identity."""
    rows = [[p["id"], p["question"], p["answer"]] for p in problems]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def stored_scores(store) -> list[dict]:
    """Every partition's scores saved under ``SCORES_PREFIX`` (none yet: an empty list)."""
    if not store.exists(SCORES_PREFIX):
        return []
    return [store.read_json(u) for u in store.ls(SCORES_PREFIX) if u.endswith(".json")]


def _report_metadata(store, ckpt: str, run) -> dict[str, Any]:
    """The report over every stored score (this checkpoint in bold) and the plot across checkpoints, as
    Dagster metadata and as artifacts of the evaluation's MLflow run."""
    scores = stored_scores(store)
    md = report_markdown(scores, by="checkpoint", title=f"Evaluation ({ckpt} and the other checkpoints)",
                         highlight=ckpt)  # fmt: skip
    run.client.log_text(run.run_id, md, "report.md")
    out: dict[str, Any] = {"report": dg.MetadataValue.md(md)}
    fig = report_figure(scores)
    if fig is not None:
        import matplotlib.pyplot as plt

        run.client.log_figure(run.run_id, fig, "report.png")
        out["plot"] = png_markdown(fig)
        plt.close(fig)
    return out


def _log_to_checkpoint(tracker, ref: dict, bench: str, metrics: dict[str, float]) -> None:
    """The numbers as metrics on the checkpoint's run (step = the checkpoint's step) and as tags on its
    registered model version, when it has one (final checkpoints)."""
    run_id = ref.get("mlflow_run_id")
    if not run_id:
        return
    client = tracker.client
    for k, v in metrics.items():
        client.log_metric(run_id, f"eval/{bench}/{k}", v, step=int(ref.get("step") or 0))
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.source == ref["uri"]:
            for k, v in metrics.items():
                client.set_model_version_tag(version.name, version.version, f"eval/{bench}/{k}", f"{v:.6g}")


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "ray"},
    partitions_def=EVAL_PARTITIONS,
    code_version="2",
    pool="compute",
)
def benchmark_scores(
    context: AssetExecutionContext,
    benchmarks: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Accuracy, pass@k, format validity, trigger rate, structure and speedups of one checkpoint on one
    benchmark, with the report across checkpoints."""
    keys = context.partition_key.keys_by_dimension
    ckpt, bench = keys["checkpoint"], keys["benchmark"]
    store = storage.get()
    ref = read_checkpoint(store, ckpt)
    modes = STAGE_MODES[ref["stage"]]
    profile = get_profile(settings.profile)
    ev = profile.eval
    eval_kwargs = ev.sampling(answer_type=get_benchmark(bench).answer_type)
    rows = benchmarks[benchmarks.benchmark == bench]
    if rows.empty:
        raise ValueError(f"benchmark {bench!r} has no problems in the benchmarks asset")
    problems = rows[["id", "question", "answer", "source"]].to_dict("records")
    latency_problems = min(ev.latency_problems, len(problems))
    identity = {"benchmark": bench, **eval_kwargs, "modes": list(modes), "chunk": EVAL_CHUNK,
                "latency_problems": latency_problems, "problems": problems_digest(problems)}  # fmt: skip
    pool = _pool_kwargs(ray.cluster_compute())
    if pool:  # decoded by engine replicas (batches differ from one engine's): its own identity
        identity["engine_pool"] = pool
    key = run_key("eval", identity, [ref["data_version"]])
    workdir = settings.home_dir() / "work" / "eval" / key
    context.log.info(f"eval {ckpt} on {bench}: run key {key}, workdir {workdir}")
    model_dir = local_model_dir(settings, store, ref)
    ray.ensure()
    result = run_on_ray(
        _evaluate, str(model_dir), problems, modes, eval_kwargs, profile_prompt(profile), ray.training_cpus(),
        str(workdir), latency_problems, pool, num_cpus=ray.training_cpus(), label=f"eval {ckpt} {bench}",
    )  # fmt: skip
    reused = {m: result[m]["reused_chunks"] for m in modes}
    if any(reused.values()):
        context.log.info(f"resumed: chunks of {EVAL_CHUNK} problems reused from {workdir}: {reused}")
    primary = result[modes[0]]["summary"]
    mode_summaries = {m: result[m]["summary"] for m in modes}
    summary: dict[str, Any] = {
        "checkpoint": ckpt, "stage": ref["stage"], "step": ref["step"], "benchmark": bench, "mode": modes[0],
        "eval": {**eval_kwargs, "benchmark": bench, "n_problems": len(problems),
                 "latency_problems": latency_problems},
        "modes": mode_summaries,
        **primary,
        **mode_speedups(mode_summaries),
    }  # fmt: skip
    samples_uri = store.uri("reports", "samples", f"{ckpt}__{bench}.jsonl")
    lines = [json.dumps({"mode": m, **r}) for m in modes for r in result[m]["records"]]
    store.write_bytes(samples_uri, ("\n".join(lines) + "\n").encode())
    store.write_json(f"{SCORES_PREFIX}/{ckpt}__{bench}.json", summary)
    headline = headline_metrics(summary)
    tracker = mlflow.tracker()
    with tracker.stage_run(
        stage=f"eval:{ckpt}:{bench}", run_key=key, dagster_run_id=context.run_id, asset_key="benchmark_scores",
        partition_key=context.partition_key, upstream_run_ids=[ref["mlflow_run_id"]] if ref["mlflow_run_id"] else [],
    ) as run:  # fmt: skip
        for mode in modes:
            run.log_metrics(
                {f"{mode}/{k}": v for k, v in result[mode]["summary"].items() if isinstance(v, float)}
            )
        run.log_metrics(headline)
        run.log_dict(summary, "summary.json")
        report = _report_metadata(store, ckpt, run)
    _log_to_checkpoint(tracker, ref, bench, headline)
    metadata = {
        **numeric_metadata({k: v for k, v in primary.items() if isinstance(v, float)}),
        **numeric_metadata(headline),
        "samples": dg.MetadataValue.path(samples_uri),
        "mlflow_run_id": run.run_id,
        "modes": dg.MetadataValue.json(summary["modes"]),
        **report,
    }
    if "engine_pool" in result:
        metadata["engine_pool"] = dg.MetadataValue.json(result["engine_pool"])
    return dg.Output(summary, metadata=metadata)


def eval_partition_key(checkpoint: str, benchmark: str) -> str:
    """The multi-partition key string (dimensions sorted by name: benchmark|checkpoint)."""
    return dg.MultiPartitionKey({"checkpoint": checkpoint, "benchmark": benchmark})
