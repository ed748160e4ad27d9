"""The whole pipeline, end to end, on the ``small`` profile: one run shared by the session
(``pipeline_fixtures.small_pipeline``), then what it must have produced: the ``summary.json`` contract,
a corpus of strictly accepted traces, MLflow lineage that matches Dagster's data versions, a backfill of
``benchmark_scores`` through the daemon's backfill machinery, and the artifact store on ``s3://``."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from npr_pipelines.structure import format_score_v2, last_boxed, parse_text, validate
from npr_pipelines.toy.profiles import SMALL

pytestmark = pytest.mark.usefixtures("release_ray")

#: DESIGN.md, "Contracts": the stages of summary.json and every field of a stage entry.
DESIGN_STAGES = {"base", "npr_zero", "npr_beta", "npr", "sr_beta", "sr"}
DESIGN_STAGE_FIELDS = {
    "mode", "accuracy", "format_valid_rate", "format_score_mean", "trigger_rate", "mean_critical_path_ratio",
    "sequential_mode_accuracy", "sequential_mode_format_valid_rate", "throughput_speedup", "latency_speedup",
}  # fmt: skip
DESIGN_EVAL_FIELDS = {"benchmark", "n_problems", "n_samples", "temperature", "top_p", "seed"}
#: DESIGN.md, "Decisions / Modes": base and npr_zero (and the SR ablations) are sequential models.
PARALLEL_STAGES = {"npr_beta", "npr"}
#: Stage -> the asset whose materialization published its final checkpoint.
STAGE_ASSETS = {
    "base": "base_model", "npr_zero": "npr_zero_policy", "npr_beta": "npr_beta_checkpoint",
    "npr": "npr_policy", "sr_beta": "sr_beta_checkpoint", "sr": "sr_policy",
}  # fmt: skip


def solve(question: str) -> str:
    """The answer of a toy question, computed from its text alone (independent of the toy package)."""
    if m := re.fullmatch(r"Compute ([\d*+]+)\.", question):
        return str(sum(int(a) * int(b) for a, b in re.findall(r"(\d+)\*(\d+)", m.group(1))))
    if m := re.fullmatch(r"Find x in \{([\d,]+)\} with (\d+)\*x\+(\d+)=(\d+)\.", question):
        a, b, t = int(m.group(2)), int(m.group(3)), int(m.group(4))
        fits = [c for c in map(int, m.group(1).split(",")) if a * c + b == t]
        assert len(fits) == 1, question
        return str(fits[0])
    raise AssertionError(f"not a toy question: {question!r}")


# -- summary.json ------------------------------------------------------------------------------------


def test_summary_json_has_the_design_contract(small_pipeline) -> None:
    written = json.loads((small_pipeline.home / "summary.json").read_text())
    assert written == small_pipeline.summary
    # DESIGN.md's keys + the timing split and the machine below
    assert set(written) == {"wall_time_s", "eval", "stages", "timing", "machine"}
    assert 0 < written["wall_time_s"] <= small_pipeline.wall_s
    timing = written["timing"]  # compute inside Ray tasks vs orchestration: they add up to the wall time
    assert timing["ray_tasks"] >= 12  # base, npr_zero, rejection, 2 SFT, 2 RL + 6 evaluations
    assert 0 < timing["compute_s"] < written["wall_time_s"]
    assert timing["compute_s"] + timing["orchestration_s"] == pytest.approx(written["wall_time_s"], abs=0.2)
    # Where the compute went: one entry per stage task and per final-checkpoint evaluation.
    tasks = timing["tasks"]
    assert {"base", "npr_zero", "rejection", "npr_beta", "npr", "sr_beta", "sr"} <= set(tasks)
    evals = [label for label in tasks if label.startswith("eval ")]
    assert len(evals) == len(DESIGN_STAGES) and all(label.endswith(" toy_test") for label in evals)
    # A cached base (another fixture of the session may have trained it) takes ~0 s; the stages train here.
    assert all(seconds >= 0 for seconds in tasks.values()) and tasks["npr"] > 0
    assert sum(tasks.values()) == pytest.approx(timing["compute_s"], abs=0.1 * len(tasks))
    machine = written["machine"]  # what the timings and figures depend on
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["usable_cpus"] >= 1 and machine["torch"] == torch.__version__
    ev = written["eval"]
    assert set(ev) == DESIGN_EVAL_FIELDS
    assert ev == {
        "benchmark": "toy_test", "n_problems": SMALL.eval.n_problems, "n_samples": SMALL.eval.n_samples,
        "temperature": SMALL.eval.temperature, "top_p": SMALL.eval.top_p, "seed": SMALL.eval.seed,
    }  # fmt: skip
    assert set(written["stages"]) == DESIGN_STAGES
    for stage, entry in written["stages"].items():
        assert set(entry) == DESIGN_STAGE_FIELDS, stage
        parallel = stage in PARALLEL_STAGES
        assert entry["mode"] == ("parallel" if parallel else "sequential"), stage
        for key in ("accuracy", "format_valid_rate"):
            assert isinstance(entry[key], float) and 0.0 <= entry[key] <= 1.0, (stage, key)
        assert isinstance(entry["format_score_mean"], float), stage
        # parallel-mode stages report their trigger rate and their sequential-mode scores; the others not
        for key in ("trigger_rate", "sequential_mode_accuracy", "sequential_mode_format_valid_rate"):
            if parallel:
                assert isinstance(entry[key], float) and 0.0 <= entry[key] <= 1.0, (stage, key)
            else:
                assert entry[key] is None, (stage, key)
        for key in ("mean_critical_path_ratio", "throughput_speedup", "latency_speedup"):
            assert entry[key] is None or isinstance(entry[key], float), (stage, key)
        # the numbers are those of the stage's final checkpoint on toy_test, as benchmark_scores stored them
        ckpt = small_pipeline.latest_materialization(STAGE_ASSETS[stage]).asset_materialization
        partition = f"toy_test|{ckpt.metadata['checkpoint'].value}"
        scores = json.loads((small_pipeline.artifacts / "io" / "benchmark_scores" / (
            partition.replace("|", "__") + ".json")).read_text())  # fmt: skip
        assert scores["stage"] == stage and scores["mode"] == entry["mode"]
        assert scores["accuracy"] == entry["accuracy"]
        assert scores["format_valid_rate"] == entry["format_valid_rate"]
        assert small_pipeline.latest_materialization("benchmark_scores", partition) is not None


# -- the self-distilled corpus -----------------------------------------------------------------------


def test_corpus_holds_exactly_the_first_strictly_accepted_trace_per_problem(small_pipeline) -> None:
    attempts = pd.read_parquet(small_pipeline.artifacts / "io" / "cold_start_traces.parquet")
    corpus = pd.read_parquet(small_pipeline.artifacts / "io" / "self_distilled_corpus.parquet")
    assert len(corpus) > 0, "rejection sampling accepted nothing: the pipeline ran on an empty corpus"
    assert attempts["problem_id"].nunique() == SMALL.rejection_sampling.n_problems
    assert attempts.groupby("problem_id")["try"].max().max() < SMALL.rejection_sampling.max_tries
    # The acceptance rule, re-derived here for every attempt: finished, strictly valid, V2 score 0, and
    # the boxed answer equal to the question's answer computed from its text.
    for a in attempts.itertuples():
        valid = validate(parse_text(a.text)).valid
        boxed = last_boxed(a.text)
        correct = boxed is not None and boxed.strip() == solve(a.question)
        strict = a.finish_reason == "eos" and valid and format_score_v2(a.text) == 0.0 and correct
        assert bool(a.accepted) == strict, (a.problem_id, a.text, a.reasons)
    first = attempts[attempts["accepted"]].sort_values(["problem_index", "try"]).drop_duplicates("problem_id")
    assert corpus["problem_id"].tolist() == first["problem_id"].tolist()  # problem order, one per problem
    assert corpus["text"].tolist() == first["text"].tolist()
    assert (corpus["tries"].to_numpy() == first["try"].to_numpy() + 1).all()
    assert all(solve(q) == str(ans) for q, ans in zip(corpus["question"], corpus["answer"], strict=True))
    # every accepted problem stops sampling at its accepted try
    last_try = attempts.groupby("problem_id")["try"].max()
    assert (last_try[first["problem_id"]].to_numpy() == first["try"].to_numpy()).all()


# -- MLflow lineage ----------------------------------------------------------------------------------


def test_mlflow_lineage_from_npr_down_to_base_matches_dagster_data_versions(
    small_pipeline, tmp_path, monkeypatch
) -> None:
    import dagster as dg
    import mlflow

    from assets.jobs import RUN_TAGS
    from npr_pipelines.storage import Storage
    from npr_pipelines.storage.checkpoints import manifest_version
    from npr_pipelines.tracking import TAG_DAGSTER_ASSET, TAG_DAGSTER_RUN, TAG_STAGE, TAG_UPSTREAM, Tracker

    tracker = Tracker(small_pipeline.tracking_uri)
    # models:/ URIs resolve through the registry URI (without one, MLflow opens ./mlflow.db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracker.tracking_uri)
    client = tracker.client
    graph = small_pipeline.defs.resolve_asset_graph()
    start = small_pipeline.latest_materialization("npr_policy").asset_materialization
    run_id = start.metadata["mlflow_run_id"].value
    chain = []
    while run_id:
        run = client.get_run(run_id)
        tags = run.data.tags
        asset = tags[TAG_DAGSTER_ASSET]
        record = small_pipeline.latest_materialization(asset)
        assert tags[TAG_DAGSTER_RUN] == record.run_id, asset  # the run of the materialization we read
        assert record.asset_materialization.metadata["mlflow_run_id"].value == run_id
        # every input dataset is an upstream asset of this one, with its Dagster data version as digest
        parents = sorted(k.to_user_string() for k in graph.get(dg.AssetKey(asset)).parent_keys)
        expected = {p: small_pipeline.data_version(p) for p in parents}
        logged = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
        assert logged == expected, asset
        # the registered model's @final alias resolves, through mlflow, to this run's checkpoint
        stage = tags[TAG_STAGE]
        name = f"npr-{stage.replace('_', '-')}"
        version = client.get_model_version_by_alias(name, "final")
        assert (
            version.run_id == run_id and version.source == record.asset_materialization.metadata["uri"].value
        )
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}@final", dst_path=str(tmp_path / stage), tracking_uri=tracker.tracking_uri
        ))  # fmt: skip
        store = Storage(str(local.parent))
        store.verify_dir(str(local))  # every file matches the manifest's size and checksum
        assert manifest_version(store, str(local)) == small_pipeline.data_version(asset)
        chain.append(stage)
        upstream = [u for u in tags[TAG_UPSTREAM].split(",") if u]
        run_id = upstream[0] if upstream else ""
    assert chain == ["npr", "npr_beta", "base"]
    assert tracker.upstream_chain(start.metadata["mlflow_run_id"].value) == chain
    # the MLflow runs standing for `npr run`'s Dagster runs (the stage runs' parents) ended with them
    launched = {r.run_id for r in small_pipeline.instance.get_runs(dg.RunsFilter(tags=RUN_TAGS))}
    parents = client.search_runs([tracker.experiment_id()], filter_string="tags.`npr.kind` = 'dagster_run'")
    parents = {p.info.run_id: p.info.status for p in parents if p.data.tags[TAG_DAGSTER_RUN] in launched}
    assert parents and set(parents.values()) == {"FINISHED"}
    assert client.get_run(start.metadata["mlflow_run_id"].value).data.tags["mlflow.parentRunId"] in parents


# -- backfill through the daemon ---------------------------------------------------------------------


def test_backfill_of_benchmark_scores_runs_through_the_daemon(small_pipeline, monkeypatch) -> None:
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.utils import make_new_backfill_id
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._time import get_current_timestamp
    from pipeline_fixtures import SMALL_DEFINITIONS_FILE

    from assets.jobs import QUIET

    small_pipeline.environment(monkeypatch)
    instance = small_pipeline.instance
    npr_final = small_pipeline.latest_materialization("npr_policy").asset_materialization.metadata
    checkpoints = ["base", npr_final["checkpoint"].value]  # one sequential-mode and one parallel-mode model
    assert set(checkpoints) <= set(instance.get_dynamic_partitions("checkpoints"))
    keys = sorted(str(dg.MultiPartitionKey({"checkpoint": c, "benchmark": b}))
                  for c in checkpoints for b in ("toy_test", "toy_dev"))  # fmt: skip
    target = InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(LoadableTargetOrigin(
        python_file=str(SMALL_DEFINITIONS_FILE), attribute="defs", working_directory=str(Path.cwd()),
    )))  # fmt: skip
    with create_test_daemon_workspace_context(target, instance) as workspace:
        backfill_id = make_new_backfill_id()
        instance.add_backfill(
            PartitionBackfill.from_asset_partitions(
                backfill_id=backfill_id,
                asset_graph=workspace.create_request_context().asset_graph,
                partition_names=keys,
                asset_selection=[dg.AssetKey("benchmark_scores")],
                backfill_timestamp=get_current_timestamp(),
                tags={},
                dynamic_partitions_store=instance,
                all_partitions=False,
                title="test backfill",
                description=None,
                run_config={"execution": {"config": {"in_process": {}}}, **QUIET},
            )
        )
        logger = logging.getLogger("test_backfill")
        for _ in range(5):  # one iteration submits (and, in-process, runs) everything; the next settles it
            errors = [e for e in execute_backfill_iteration(workspace, logger) if e is not None]
            assert not errors, errors
            if instance.get_backfill(backfill_id).status != BulkActionStatus.REQUESTED:
                break
    assert instance.get_backfill(backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS
    runs = instance.get_runs(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    assert sorted(r.tags[PARTITION_NAME_TAG] for r in runs) == keys  # one run per partition
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
    run_of = {r.tags[PARTITION_NAME_TAG]: r.run_id for r in runs}
    seen_problems = {}
    for key in keys:
        record = small_pipeline.latest_materialization("benchmark_scores", key)
        assert record.run_id == run_of[key]  # materialized by the backfill's run, not by the main job
        scores = json.loads((small_pipeline.artifacts / "io" / "benchmark_scores" / (
            key.replace("|", "__") + ".json")).read_text())  # fmt: skip
        bench, ckpt = key.split("|")
        assert (scores["benchmark"], scores["checkpoint"]) == (bench, ckpt)
        assert scores["eval"]["n_problems"] == SMALL.eval.n_problems
        assert set(scores["modes"]) == ({"parallel", "sequential"} if ckpt != "base" else {"sequential"})
        samples = small_pipeline.artifacts / "reports" / "samples" / f"{ckpt}__{bench}.jsonl"
        ids = {json.loads(line)["problem_id"] for line in samples.read_text().splitlines()}
        assert len(ids) == SMALL.eval.n_problems
        seen_problems.setdefault(bench, ids)
        assert seen_problems[bench] == ids  # the same problems for both checkpoints
    assert seen_problems["toy_test"].isdisjoint(seen_problems["toy_dev"])  # two different held-out splits


# -- the artifact store on s3:// ---------------------------------------------------------------------


def test_a_stage_publishes_and_reads_its_checkpoint_through_s3(
    small_pipeline, s3_endpoint, s3_bucket, monkeypatch, tmp_path
) -> None:
    """``base_model`` materialized with the artifact store on ``s3://`` (a local moto endpoint): the
    checkpoint is published there, indexed, read back by the blocking load-and-generate check, and
    holds exactly the bytes the local run published."""
    import dagster as dg

    from assets import base_model
    from assets.checks import checkpoint_loads_check
    from assets.io_manager import NprIOManager
    from npr_pipelines.storage import Storage
    from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

    small_pipeline.environment(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)  # StorageResource: endpoint from the environment
    home = tmp_path / "home"
    # the bootstrapped base model is cached by config: reuse the session's instead of training it again
    key = SMALL.bootstrap.key
    shutil.copytree(small_pipeline.home / "cache" / "toy_base" / key, home / "cache" / "toy_base" / key)
    base_uri = f"s3://{s3_bucket}/artifacts"
    storage = StorageResource(base_uri=base_uri)
    result = dg.materialize(
        [base_model, checkpoint_loads_check(base_model)],
        resources={
            "settings": PipelineSettings(profile="small", home=str(home)),
            "storage": storage,
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}"),
            "ray": RayResource(),
            "io_manager": NprIOManager(base_uri=base_uri),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["new_tokens"].value > 0
    ref = result.output_for_node("base_model")
    assert ref["uri"].startswith(f"{base_uri}/checkpoints/base/")
    s3 = storage.get()
    assert s3.read_json("checkpoints/index/base.json") == ref
    assert s3.read_json("io/base_model.json") == ref  # the IO manager's copy lives on s3 too
    local_ref = json.loads((small_pipeline.artifacts / "checkpoints" / "index" / "base.json").read_text())
    assert ref["data_version"] == local_ref["data_version"]  # same manifest, whichever store
    fetched = tmp_path / "fetched"
    manifest = s3.fetch_dir(ref["uri"], fetched)  # every file verified against the manifest
    published = Path(local_ref["uri"])
    assert (
        manifest.files.keys()
        == Storage(str(small_pipeline.artifacts)).read_manifest(str(published)).files.keys()
    )
    for name in manifest.files:
        assert (fetched / name).read_bytes() == (published / name).read_bytes(), name


def test_papo_study_runs_from_the_pipelines_recorded_npr_beta(small_pipeline, tmp_path, capsys) -> None:
    from npr_pipelines.training.papo_study import main

    out = tmp_path / "study.json"
    argv = ["--home", str(small_pipeline.home), "--profile", "small", "--steps", "1", "--problems", "6",
            "--samples", "2", "--split", "dev", "--threads", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    # NPR-Beta is the last npr_beta checkpoint the run recorded (its index), not something the study trained.
    latest = sorted((small_pipeline.home / "artifacts" / "checkpoints" / "index").glob("npr_beta-*.json"))[-1]
    assert report["npr_beta"] == json.loads(latest.read_text())["uri"]
    assert set(report["summaries"]) == {"npr_beta", "npr", "control"}
    assert report["control_sft_steps"] >= 1 and report["papo_config"]["steps"] == 1
    for name in ("npr", "control"):
        g = report["gain_vs_npr_beta"][name]
        assert g["low"] <= g["diff"] <= g["high"]
        accuracy = {k: v["accuracy"] for k, v in report["summaries"].items()}
        assert g["diff"] == pytest.approx(accuracy[name] - accuracy["npr_beta"])
    assert "npr - npr_beta" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):  # a study never mixes into an earlier one's directory
        main(argv)
