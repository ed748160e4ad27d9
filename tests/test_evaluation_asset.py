"""``benchmark_scores`` as Dagster runs it, with the Ray task replaced by canned per-mode results: the
speedups, the stored scores, the report and plot as metadata and MLflow artifacts, the checkpoint's run
and model version, and the resumable work directory."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

import assets.evaluation as evaluation
from assets.stage_runner import checkpoint_cache_dir
from npr_pipelines.eval.runner import SampleRecord, mode_summary
from npr_pipelines.storage import Storage
from npr_pipelines.storage.checkpoints import checkpoint_ref, record_checkpoint
from npr_pipelines.toy.profiles import SMALL
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

#: Canned per-mode results: (tokens per sample, decoding seconds, latencies at concurrency 1).
CANNED = {"parallel": (30, 1.0, [0.1, 0.2, 0.3]), "sequential": (20, 2.0, [0.4, 0.5, 0.9])}


def fake_run_on_ray(calls: list):
    def run(
        fn,
        model_dir,
        problems,
        modes,
        eval_kwargs,
        prompt,
        threads,
        workdir,
        latency_problems,
        pool,
        num_cpus,
        label,
    ):
        calls.append({"modes": modes, "workdir": workdir, "latency_problems": latency_problems,
                      "model_dir": model_dir})  # fmt: skip
        out = {}
        for mode in modes:
            tokens, wall, lat = CANNED[mode]
            recs = [SampleRecord(p["id"], s, [], "", None, s == 0, True, [], 0.0, mode == "parallel", 1, [2],
                                 tokens, tokens // 2, "eos", 0.1)
                    for p in problems for s in range(eval_kwargs["n_samples"])]  # fmt: skip
            out[mode] = {"summary": mode_summary(recs, wall, lat[:latency_problems]),
                         "records": [r.to_dict() for r in recs], "reused_chunks": 0}  # fmt: skip
        return out

    return run


@pytest.fixture
def env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("NPR_HOME", str(tmp_path))
    store = Storage(str(tmp_path / "artifacts"))
    mlflow = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ui_url="")
    calls: list = []
    monkeypatch.setattr(evaluation, "run_on_ray", fake_run_on_ray(calls))
    monkeypatch.setattr(RayResource, "ensure", lambda self: None)
    instance = dg.DagsterInstance.ephemeral()
    return tmp_path, store, mlflow, calls, instance


def _checkpoint(
    tmp_path: Path, store: Storage, mlflow: MlflowResource, stage: str, step: int, training_run: str = "r1"
) -> dict:
    key = "base" if stage == "base" else f"{stage}-{step:06d}"
    uri = store.uri("checkpoints", stage, training_run, key)
    with mlflow.tracker().stage_run(stage=stage, run_key=f"k-{training_run}-{key}") as run:
        run.register_checkpoint(f"npr-{stage}", uri, alias="final")
    ref = checkpoint_ref(stage=stage, step=step, uri=uri, data_version=f"v-{training_run}-{key}",
                         run_id=run.run_id)  # fmt: skip
    record_checkpoint(store, ref)
    cached = checkpoint_cache_dir(tmp_path, ref)
    cached.mkdir(parents=True)
    (cached / "MANIFEST.json").write_text("{}")  # "already fetched"
    return ref


def _materialize(env, ckpt: str) -> dg.Output:
    tmp_path, store, mlflow, _, instance = env
    instance.add_dynamic_partitions("checkpoints", [ckpt])
    key = dg.MultiPartitionKey({"checkpoint": ckpt, "benchmark": "toy_test"})
    problems = pd.DataFrame([{"id": f"p{i}", "question": f"q{i}", "answer": "1", "source": "toy",
                              "benchmark": "toy_test"} for i in range(20)])  # fmt: skip
    ctx = dg.build_asset_context(partition_key=key, instance=instance)
    return evaluation.benchmark_scores(
        ctx, benchmarks=problems, settings=PipelineSettings(profile="small", home=str(tmp_path)),
        storage=StorageResource(base_uri=store.base_uri), mlflow=mlflow, ray=RayResource(num_cpus=1),
    )  # fmt: skip


def test_two_mode_checkpoint_gets_speedups_report_and_metrics(env) -> None:
    tmp_path, store, mlflow, calls, _ = env
    _checkpoint(tmp_path, store, mlflow, "base", 0)
    ref = _checkpoint(tmp_path, store, mlflow, "npr", 2)
    base_out = _materialize(env, "base")
    out = _materialize(env, "npr-000002")
    scores = out.value

    assert base_out.value["throughput_speedup"] is None and base_out.value["latency_speedup"] is None
    # 30 tokens/1.0 s vs 20 tokens/2.0 s per sample: 3x; medians 0.5 s / 0.2 s: 2.5x
    assert scores["throughput_speedup"] == pytest.approx(3.0)
    assert scores["latency_speedup"] == pytest.approx(2.5)
    latency_problems = min(SMALL.eval.latency_problems, 20)
    assert scores["eval"]["latency_problems"] == latency_problems == calls[-1]["latency_problems"]
    assert set(scores["modes"]) == {"parallel", "sequential"} and scores["mode"] == "parallel"
    # n_samples > 1: pass@n and the inter-run std in every mode's summary
    n = SMALL.eval.n_samples
    assert n > 1 and all(f"pass_at_{n}" in m and "inter_run_std" in m for m in scores["modes"].values())

    # resumable: the work directory is keyed by checkpoint data version + eval config, under NPR_HOME/work
    workdirs = [Path(c["workdir"]) for c in calls]
    assert all(w.parent == tmp_path / "work" / "eval" for w in workdirs) and workdirs[0] != workdirs[1]
    _materialize(env, "npr-000002")
    assert Path(calls[-1]["workdir"]) == workdirs[1]  # the same partition and config: the same directory

    # the report over every stored score, this checkpoint in bold, and the plot
    report = out.metadata["report"].value
    assert "| base (sequential) |" in report and "| **npr-000002** (parallel) |" in report
    assert "## Throughput" in report and "(3.00×)" in report and "(2.50×)" in report
    assert out.metadata["plot"].value.startswith("![plot](data:image/png;base64,")
    assert out.metadata["throughput_speedup"].value == pytest.approx(3.0)
    assert len(store.ls("reports/scores")) == 2

    # MLflow: artifacts on the evaluation's run; metrics on the checkpoint's run; tags on its model version
    client = mlflow.tracker().client
    eval_run = out.metadata["mlflow_run_id"]
    eval_run = getattr(eval_run, "value", eval_run)
    assert {a.path for a in client.list_artifacts(eval_run)} >= {"report.md", "report.png", "summary.json"}
    ckpt_run = client.get_run(ref["mlflow_run_id"]).data.metrics
    assert ckpt_run["eval/toy_test/latency_speedup"] == pytest.approx(2.5)
    assert ckpt_run["eval/toy_test/sequential_mode_accuracy"] == pytest.approx(
        scores["modes"]["sequential"]["accuracy"]
    )
    [version] = client.search_model_versions("name = 'npr-npr'")
    assert float(version.tags["eval/toy_test/throughput_speedup"]) == pytest.approx(3.0)


def test_retrained_checkpoint_is_evaluated_from_its_own_copy_not_the_cached_old_one(env) -> None:
    """Re-training a stage publishes the same partition name (``npr-000002``) under a new URI: the local
    copy evaluation reads must be the new checkpoint's, and the old copy stays where it was."""
    tmp_path, store, mlflow, calls, _ = env
    old = _checkpoint(tmp_path, store, mlflow, "npr", 2, training_run="r1")
    _materialize(env, "npr-000002")
    new = _checkpoint(tmp_path, store, mlflow, "npr", 2, training_run="r2")
    _materialize(env, "npr-000002")
    first, second = (Path(c["model_dir"]) for c in calls[-2:])
    assert first == checkpoint_cache_dir(tmp_path, old) and second == checkpoint_cache_dir(tmp_path, new)
    assert first != second and first.parent == second.parent == tmp_path / "cache" / "checkpoints"
    assert Path(calls[-2]["workdir"]) != Path(calls[-1]["workdir"])  # a new data version: a new evaluation
