"""MLflow lineage: nested stage runs, resume by run key, upstream walk, inputs and model aliases."""

from __future__ import annotations

import pandas as pd
import pytest

from npr_pipelines.tracking import TAG_PARENT, TAG_UPSTREAM, Tracker


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test", ui_url="http://127.0.0.1:5000")


def test_stage_runs_nest_resume_and_chain(tracker, tmp_path) -> None:
    with tracker.stage_run(stage="base", run_key="k-base", dagster_run_id="d1") as base:
        base.log_params({"model": {"hidden": 128}, "seed": 0})
        base.log_metrics({"accuracy": 0.5}, step=0)
    with tracker.stage_run(
        stage="npr_zero", run_key="k-zero", dagster_run_id="d1", upstream_run_ids=[base.run_id]
    ) as z:
        pass
    # A crash inside a stage marks the run FAILED; the next Dagster run finds it by its key and resumes.
    with (
        pytest.raises(RuntimeError),
        tracker.stage_run(
            stage="npr", run_key="k-npr", dagster_run_id="d1", upstream_run_ids=[z.run_id]
        ) as first,
    ):
        first.log_params({"lr": 1e-4})
        raise RuntimeError("killed")
    assert tracker.client.get_run(first.run_id).info.status == "FAILED"
    with tracker.stage_run(
        stage="npr", run_key="k-npr", dagster_run_id="d2", upstream_run_ids=[z.run_id]
    ) as again:
        again.log_params({"lr": 1e-4})  # same value: fine
        with pytest.raises(ValueError, match="changed"):
            again.log_params({"lr": 2e-4})
    assert again.resumed and again.run_id == first.run_id
    run = tracker.client.get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_PARENT] == tracker.parent_run("d2") != tracker.parent_run("d1")
    assert run.data.tags[TAG_UPSTREAM] == z.run_id
    assert tracker.upstream_chain(again.run_id) == ["npr", "npr_zero", "base"]
    assert tracker.client.get_run(base.run_id).data.params["model.hidden"] == "128"
    assert again.url.endswith(f"/runs/{again.run_id}")


def test_inputs_and_model_aliases(tracker, tmp_path) -> None:
    with tracker.stage_run(stage="sft", run_key="k-sft") as run:
        run.log_input(
            pd.DataFrame({"q": ["a"], "a": ["1"]}), name="corpus", source=str(tmp_path), digest="abc123"
        )
        version = run.register_checkpoint("npr-beta", str(tmp_path), alias="final")
    inputs = tracker.client.get_run(run.run_id).inputs.dataset_inputs
    assert inputs[0].dataset.digest == "abc123" and inputs[0].dataset.name == "corpus"
    mv = tracker.client.get_model_version_by_alias("npr-beta", "final")
    assert mv.version == version and mv.run_id == run.run_id


def test_artifacts_live_beside_the_sqlite_store(tracker, tmp_path) -> None:
    with tracker.stage_run(stage="x", run_key="k-x") as run:
        run.log_dict({"a": 1}, "a.json")
    uri = tracker.client.get_run(run.run_id).info.artifact_uri
    assert uri.startswith((tmp_path / "mlartifacts").as_uri())
