"""The training stages as assets: NPR-Zero, self-distillation, NPR-Beta (parallel SFT), NPR (PAPO),
and the ablations SR-Beta (sequential SFT) and SR (sequential RL). Each is a thin call of a library
driver through ``run_training_stage`` (a Ray task, or a Ray Job through Pipes in the cluster profile;
MLflow run, resumable workdir, published checkpoints)."""

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.common import log_asset_inputs, run_key, run_on_ray
from assets.configs import stage_configs
from assets.data import frame_version
from assets.stage_runner import local_model_dir, problems_of, run_training_stage
from npr_pipelines.training.distill import RejectionConfig, build_corpus
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def npr_zero_policy(
    context: AssetExecutionContext,
    base_model: dict,
    train_problems: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Stage 1: DAPO RL with sequential rollouts and the format-gated accuracy reward."""
    return _rl_stage(context, "npr_zero", "npr_zero_policy", "npr_zero", "base_model", base_model, train_problems,
                     settings, storage, mlflow, ray)  # fmt: skip


def _rl_stage(context, stage: str, asset: str, driver: str, init_asset: str, init_ref: dict,
              train_problems: pd.DataFrame, settings, storage, mlflow, ray) -> dg.Output[dict]:  # fmt: skip
    config = stage_configs(settings.profile, settings.seed)[stage]
    problems_version = frame_version(train_problems)
    return run_training_stage(
        context, stage=stage, asset=asset, driver=driver, init=init_ref, data=train_problems, config=config,
        upstream=[init_ref], extra_versions=[problems_version],
        settings=settings, storage=storage, mlflow=mlflow, ray=ray,
        inputs={init_asset: (init_ref, init_ref["data_version"]), "train_problems": (train_problems, problems_version)},
    )  # fmt: skip


def _print_batch(progress: dict[str, Any]) -> None:
    """Progress of rejection sampling while it runs (Ray forwards worker stdout)."""
    print(f"rejection batch {progress['batch']}: attempts {progress['attempts']}, "
          f"accepted {progress['accepted_in_batch']}, open {progress['open']}", flush=True)  # fmt: skip


def _rejection_task(
    policy_dir: str, problems: list, config: RejectionConfig, workdir: str, threads: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr_pipelines.training.distill import run_rejection_sampling

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    result = run_rejection_sampling(model, tok, problems, config, Path(workdir), on_batch=_print_batch)
    return {
        "accepted": result.accepted,
        "attempts_path": str(result.attempts_path),
        "summary": result.summary,
    }


@dg.asset(group_name=GROUP, kinds={"pytorch", "ray", "parquet"}, code_version="1", pool="compute")
def cold_start_traces(
    context: AssetExecutionContext,
    npr_zero_policy: dict,
    train_problems: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[pd.DataFrame]:
    """Every rejection-sampling attempt (up to k per problem, stopping at the first accepted one), each
    with its verdict, V2 score and reasons."""
    configs = stage_configs(settings.profile, settings.seed)
    config: RejectionConfig = configs["rejection"]
    problems = problems_of(train_problems)[: configs["rejection_problems"]]
    key = run_key("rejection", json.loads(json.dumps(config.to_dict(), default=str)),
                  [npr_zero_policy["data_version"], str(len(problems))])  # fmt: skip
    workdir = settings.home_dir() / "work" / "rejection" / key
    policy = local_model_dir(settings, storage.get(), npr_zero_policy)
    with mlflow.tracker().stage_run(
        stage="rejection_sampling", run_key=key, dagster_run_id=context.run_id, asset_key="cold_start_traces",
        upstream_run_ids=[npr_zero_policy["mlflow_run_id"]] if npr_zero_policy.get("mlflow_run_id") else [],
    ) as run:  # fmt: skip
        context.log.info(f"rejection: run key {key}, workdir {workdir}, mlflow run {run.run_id}")
        run.log_params({"config": json.loads(json.dumps(config.to_dict(), default=str))})
        log_asset_inputs(run, {"npr_zero_policy": (npr_zero_policy, npr_zero_policy["data_version"]),
                               "train_problems": (train_problems, frame_version(train_problems))},
                         storage.get())  # fmt: skip
        ray.ensure()
        out = run_on_ray(_rejection_task, str(policy), problems, config, str(workdir), ray.training_cpus(),
                         num_cpus=ray.training_cpus(), label="rejection")  # fmt: skip
        summary = {k: v for k, v in out["summary"].items() if isinstance(v, int | float)}
        run.log_metrics(summary)
        run.log_artifact(out["attempts_path"])
    attempts = _with_problems(pd.read_json(out["attempts_path"], lines=True), problems)
    accepted = pd.DataFrame(out["accepted"])
    storage.get().write_bytes(f"corpus/{key}/accepted.json", json.dumps(out["accepted"]).encode())
    return dg.Output(
        attempts,
        data_version=dg.DataVersion(records_version(attempts)),
        metadata={
            "accepted": len(accepted),
            "problems_offered": len(problems),
            "acceptance_rate": len(accepted) / max(1, len(problems)),
            "attempts": len(attempts),
            "accepted_uri": dg.MetadataValue.path(storage.get().uri(f"corpus/{key}/accepted.json")),
            **{k: dg.MetadataValue.float(float(v)) for k, v in summary.items()},
        },
    )


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version="1")
def self_distilled_corpus(
    context: AssetExecutionContext, cold_start_traces: pd.DataFrame, benchmarks: pd.DataFrame
) -> dg.Output[pd.DataFrame]:
    """Accepted traces, de-duplicated and disjoint from every held-out benchmark (rule in metadata)."""
    accepted = _accepted_rows(cold_start_traces)
    rows, report = build_corpus(accepted, benchmarks[["id", "question"]].to_dict("records"))
    df = pd.DataFrame(rows, columns=list(CORPUS_FIELDS))
    return dg.Output(
        df,
        data_version=dg.DataVersion(frame_version(df)),
        metadata={"rows": len(df), "rule": report["rule"], "report": dg.MetadataValue.json(report)},
    )


#: A corpus row: the fields of ``RejectionResult.accepted`` (``tries`` counts the accepted try).
CORPUS_FIELDS = ("problem_id", "question", "answer", "source", "text", "tries", "seed", "format_score",
                 "response_tokens")  # fmt: skip


def records_version(df: pd.DataFrame) -> str:
    """A data version for a frame with list-valued columns (``frame_version`` hashes scalars only)."""
    return hashlib.sha256(df.to_json(orient="records", lines=True).encode()).hexdigest()[:24]


def _with_problems(attempts: pd.DataFrame, problems: list) -> pd.DataFrame:
    """Attempts with their problem's question, answer and source, and its position among the offered
    problems (``problem_index``), so the corpus can be built from this frame alone; in problem and try
    order, without the log's ``batch`` (when an attempt was written depends on how often the sampling
    was interrupted: a resumed run must give the same frame)."""
    if attempts.empty:
        return attempts
    info = pd.DataFrame(
        [{"problem_id": p.id, "problem_index": i, "question": p.question, "answer": p.answer, "source": p.source}
         for i, p in enumerate(problems)]
    )  # fmt: skip
    merged = attempts.drop(columns=["batch"], errors="ignore").merge(
        info, on="problem_id", how="left", validate="many_to_one"
    )
    return merged.sort_values(["problem_index", "try"], kind="stable").reset_index(drop=True)


def _accepted_rows(attempts: pd.DataFrame) -> list[dict[str, Any]]:
    """The accepted attempt of each problem (the first correct and format-perfect one), in the order the
    problems were offered, as corpus rows."""
    if attempts.empty:
        return []
    kept = attempts[attempts["accepted"].astype(bool)].sort_values(["problem_index", "try"])
    kept = kept.drop_duplicates("problem_id")
    return kept.assign(tries=kept["try"] + 1)[list(CORPUS_FIELDS)].to_dict("records")


def _sft_stage(context, stage: str, asset: str, base_model: dict, corpus: pd.DataFrame, settings, storage, mlflow,
               ray) -> dg.Output[dict]:  # fmt: skip
    config = stage_configs(settings.profile, settings.seed)[stage]
    corpus_version = frame_version(corpus)
    return run_training_stage(
        context, stage=stage, asset=asset, driver="sft", init=base_model, data=corpus, config=config,
        upstream=[base_model], extra_versions=[corpus_version],
        settings=settings, storage=storage, mlflow=mlflow, ray=ray, plot_keys=("loss",),
        inputs={"base_model": (base_model, base_model["data_version"]),
                "self_distilled_corpus": (corpus, corpus_version)},
    )  # fmt: skip


@dg.asset(group_name=GROUP, kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def npr_beta_checkpoint(
    context: AssetExecutionContext,
    base_model: dict,
    self_distilled_corpus: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Stage 2: parallel SFT of the BASE model on the self-distilled corpus (tag tokens added)."""
    return _sft_stage(context, "npr_beta", "npr_beta_checkpoint", base_model, self_distilled_corpus, settings,
                      storage, mlflow, ray)  # fmt: skip


@dg.asset(group_name="ablations", kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def sr_beta_checkpoint(
    context: AssetExecutionContext,
    base_model: dict,
    self_distilled_corpus: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Ablation: the same corpus with sequential (causal) SFT."""
    return _sft_stage(context, "sr_beta", "sr_beta_checkpoint", base_model, self_distilled_corpus, settings,
                      storage, mlflow, ray)  # fmt: skip


@dg.asset(group_name=GROUP, kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def npr_policy(
    context: AssetExecutionContext,
    npr_beta_checkpoint: dict,
    train_problems: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Stage 3: PAPO with parallel rollouts in the NPR engine."""
    return _rl_stage(context, "npr", "npr_policy", "papo", "npr_beta_checkpoint", npr_beta_checkpoint,
                     train_problems, settings, storage, mlflow, ray)  # fmt: skip


@dg.asset(group_name="ablations", kinds={"pytorch", "ray"}, code_version="1", pool="compute")
def sr_policy(
    context: AssetExecutionContext,
    sr_beta_checkpoint: dict,
    train_problems: pd.DataFrame,
    settings: PipelineSettings,
    storage: StorageResource,
    mlflow: MlflowResource,
    ray: RayResource,
) -> dg.Output[dict]:
    """Ablation: PAPO's objective with sequential rollouts, from SR-Beta."""
    return _rl_stage(context, "sr", "sr_policy", "sr", "sr_beta_checkpoint", sr_beta_checkpoint, train_problems,
                     settings, storage, mlflow, ray)  # fmt: skip


@dg.asset_check(
    asset=self_distilled_corpus,
    name="independent_recheck",
    blocking=True,
    additional_ins={"base_model": dg.AssetIn("base_model")},
    description="Non-empty, and every row passes the token-level re-check (parse, layout, grade).",
)
def corpus_recheck(
    self_distilled_corpus: pd.DataFrame,
    base_model: dict,
    settings: PipelineSettings,
    storage: StorageResource,
) -> dg.AssetCheckResult:
    from transformers import AutoTokenizer

    from npr_pipelines.tokenization import add_tag_tokens
    from npr_pipelines.training.distill import recheck_corpus

    if self_distilled_corpus.empty:
        return dg.AssetCheckResult(
            passed=False, metadata={"reason": "the corpus is empty: no trace was accepted"}
        )
    tok = AutoTokenizer.from_pretrained(local_model_dir(settings, storage.get(), base_model))
    add_tag_tokens(tok)
    config = stage_configs(settings.profile, settings.seed)["npr_beta"]
    failures = recheck_corpus(self_distilled_corpus.to_dict("records"), tok, prompt=config.prompt)
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={
            "rows": len(self_distilled_corpus),
            "failures": len(failures),
            "examples": dg.MetadataValue.json(failures[:5]),
        },
    )
