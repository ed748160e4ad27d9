"""``benchmark_scores``: every (checkpoint x benchmark) partition, in the checkpoint's mode(s).

base and npr_zero are sequential models (tags are text); npr_beta and npr are evaluated in parallel
mode AND in sequential mode (the format is learnt, not forced by the engine); the SR ablations are
sequential. Samples are kept in storage next to the summary so a person can see why an answer failed.
"""

import json
from typing import Any

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.common import CHECKPOINTS, numeric_metadata, read_checkpoint, run_key, run_on_ray
from assets.configs import profile_prompt
from assets.data import BENCHMARKS
from npr_pipelines.eval.benchmarks import get_benchmark
from npr_pipelines.toy.profiles import get_profile
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


def _evaluate(
    model_dir: str, problems: list[dict], modes: tuple[str, ...], eval_kwargs: dict, prompt, threads: int
) -> dict:
    """Ray task body: load the checkpoint and evaluate it in each mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr_pipelines.data import Problem
    from npr_pipelines.eval.runner import EvalConfig, evaluate_problems, summarize

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    probs = [Problem(p["id"], p["question"], p["answer"], p["source"]) for p in problems]
    out: dict[str, Any] = {}
    for mode in modes:
        cfg = EvalConfig(mode=mode, **eval_kwargs)
        records, wall = evaluate_problems(model, tokenizer, probs, cfg, prompt)
        summary = summarize(records)
        summary["wall_time_s"] = wall
        summary["tokens_per_s"] = sum(r.total_tokens for r in records) / wall if wall else None
        out[mode] = {"summary": summary, "records": [r.to_dict() for r in records]}
    return out


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "ray"},
    partitions_def=EVAL_PARTITIONS,
    code_version="1",
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
    """Accuracy, format validity, trigger rate and structure of one checkpoint on one benchmark."""
    keys = context.partition_key.keys_by_dimension
    ckpt, bench = keys["checkpoint"], keys["benchmark"]
    store = storage.get()
    ref = read_checkpoint(store, ckpt)
    modes = STAGE_MODES[ref["stage"]]
    profile = get_profile(settings.profile)
    ev = profile.eval
    eval_kwargs = dict(
        n_samples=ev.n_samples, temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
        seed=ev.seed, answer_type=get_benchmark(bench).answer_type,
    )  # fmt: skip
    rows = benchmarks[benchmarks.benchmark == bench]
    if rows.empty:
        raise ValueError(f"benchmark {bench!r} has no problems in the benchmarks asset")
    problems = rows[["id", "question", "answer", "source"]].to_dict("records")
    model_dir = settings.home_dir() / "cache" / "checkpoints" / ckpt
    if not (model_dir / "MANIFEST.json").exists():
        store.fetch_dir(ref["uri"], model_dir, overwrite=True)
    ray.ensure()
    result = run_on_ray(
        _evaluate,
        str(model_dir),
        problems,
        modes,
        eval_kwargs,
        profile_prompt(profile),
        ray.training_cpus(),
        num_cpus=ray.training_cpus(),
    )
    primary = result[modes[0]]["summary"]
    summary: dict[str, Any] = {
        "checkpoint": ckpt, "stage": ref["stage"], "step": ref["step"], "benchmark": bench, "mode": modes[0],
        "eval": {**eval_kwargs, "benchmark": bench, "n_problems": len(problems)},
        "modes": {m: result[m]["summary"] for m in modes},
        **primary,
    }  # fmt: skip
    samples_uri = store.uri("reports", "samples", f"{ckpt}__{bench}.jsonl")
    lines = [json.dumps({"mode": m, **r}) for m in modes for r in result[m]["records"]]
    store.write_bytes(samples_uri, ("\n".join(lines) + "\n").encode())
    tracker = mlflow.tracker()
    key = run_key("eval", {"benchmark": bench, **eval_kwargs}, [ref["data_version"]])
    with tracker.stage_run(
        stage=f"eval:{ckpt}:{bench}", run_key=key, dagster_run_id=context.run_id, asset_key="benchmark_scores",
        partition_key=context.partition_key, upstream_run_ids=[ref["mlflow_run_id"]] if ref["mlflow_run_id"] else [],
    ) as run:  # fmt: skip
        for mode in modes:
            run.log_metrics(
                {f"{mode}/{k}": v for k, v in result[mode]["summary"].items() if isinstance(v, float)}
            )
        run.log_dict(summary, "summary.json")
    if ref["mlflow_run_id"]:
        tracker.client.log_metric(ref["mlflow_run_id"], f"eval/{bench}/accuracy", primary["accuracy"])
    metadata = {
        **numeric_metadata({k: v for k, v in primary.items() if isinstance(v, float)}),
        "samples": dg.MetadataValue.path(samples_uri),
        "mlflow_run_id": run.run_id,
        "modes": dg.MetadataValue.json(summary["modes"]),
    }
    return dg.Output(summary, metadata=metadata)


def eval_partition_key(checkpoint: str, benchmark: str) -> str:
    """The multi-partition key string (dimensions sorted by name: benchmark|checkpoint)."""
    return dg.MultiPartitionKey({"checkpoint": checkpoint, "benchmark": benchmark})
