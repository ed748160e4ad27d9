"""Schedules and sensors, evaluated with Dagster's contexts."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from assets.automation import (
    checkpoint_sensor,
    mlflow_parent_closers,
    retrain_schedule,
    train_problems_changed,
)
from assets.common import checkpoint_ref, record_checkpoint
from npr_pipelines.storage import Storage
from resources import MlflowResource


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NPR_HOME", str(tmp_path))
    return tmp_path


def _publish_index(home, key: str, version: str = "v1") -> None:
    stage, _, step = key.rpartition("-")
    ref = checkpoint_ref(stage=stage or key, step=int(step) if step.isdigit() else 0, uri=f"/x/{version}/{key}",
                         data_version=version, run_id=None, partition=key)  # fmt: skip
    record_checkpoint(Storage(str(home / "artifacts")), ref)


def test_checkpoint_sensor_registers_new_checkpoints_once(home) -> None:
    instance = dg.DagsterInstance.ephemeral()
    ctx = dg.build_sensor_context(instance=instance)
    assert isinstance(checkpoint_sensor(ctx), dg.SkipReason)
    _publish_index(home, "base")
    _publish_index(home, "npr_zero-000010")
    result = checkpoint_sensor(dg.build_sensor_context(instance=instance))
    assert sorted(result.dynamic_partitions_requests[0].partition_keys) == ["base", "npr_zero-000010"]
    keys = {r.partition_key.keys_by_dimension["checkpoint"] for r in result.run_requests}
    assert keys == {"base", "npr_zero-000010"}
    assert len({r.run_key for r in result.run_requests}) == len(result.run_requests)
    # Same cursor, nothing new: skip. One more checkpoint: only it is requested.
    again = checkpoint_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
    assert isinstance(again, dg.SkipReason)
    _publish_index(home, "npr_zero-000020")
    third = checkpoint_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
    assert third.dynamic_partitions_requests[0].partition_keys == ["npr_zero-000020"]
    assert json.loads(third.cursor) == {"base": "v1", "npr_zero-000010": "v1", "npr_zero-000020": "v1"}
    assert isinstance(
        checkpoint_sensor(dg.build_sensor_context(instance=instance, cursor=third.cursor)), dg.SkipReason
    )


def test_checkpoint_sensor_re_evaluates_a_re_published_checkpoint(home) -> None:
    """A re-trained stage publishes the same partition names with a new data version: evaluated again
    (new run keys), no partition added twice; a cursor of the earlier shape (names) is adopted."""
    instance = dg.DagsterInstance.ephemeral()
    _publish_index(home, "npr_beta-000400")
    first = checkpoint_sensor(dg.build_sensor_context(instance=instance))
    _publish_index(home, "npr_beta-000400", version="v2")
    again = checkpoint_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert not again.dynamic_partitions_requests and again.run_requests
    assert {r.partition_key.keys_by_dimension["checkpoint"] for r in again.run_requests} == {
        "npr_beta-000400"
    }
    assert not {r.run_key for r in again.run_requests} & {r.run_key for r in first.run_requests}
    assert json.loads(again.cursor) == {"npr_beta-000400": "v2"}
    old_shape = checkpoint_sensor(
        dg.build_sensor_context(instance=instance, cursor=json.dumps(["npr_beta-000400"]))
    )
    assert isinstance(old_shape, dg.SkipReason)


def test_retrain_sensor_fires_only_when_the_source_changes(home, tmp_path, monkeypatch) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.setenv("NPR_TRAIN_PROBLEMS", str(source))
    first = train_problems_changed(dg.build_sensor_context())
    assert not first.run_requests and first.cursor
    unchanged = train_problems_changed(dg.build_sensor_context(cursor=first.cursor))
    assert isinstance(unchanged, dg.SkipReason)
    source.write_text('{"question": "1+2", "answer": "3"}\n')
    changed = train_problems_changed(dg.build_sensor_context(cursor=first.cursor))
    assert len(changed.run_requests) == 1 and changed.cursor != first.cursor


def test_retrain_schedule_is_off_by_default() -> None:
    assert retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert retrain_schedule.job_name == "main"


@pytest.mark.parametrize("fails", [False, True])
def test_mlflow_parent_run_is_closed_when_its_dagster_run_ends(tmp_path, fails: bool) -> None:
    @dg.op
    def work() -> None:
        if fails:
            raise RuntimeError("boom")

    @dg.job
    def tiny() -> None:
        work()

    instance = dg.DagsterInstance.ephemeral()
    result = tiny.execute_in_process(instance=instance, raise_on_error=False)
    mlflow = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ui_url="")
    tracker = mlflow.tracker()
    parent = tracker.parent_run(result.run_id, "tiny")
    assert tracker.client.get_run(parent).info.status == "RUNNING"
    status = dg.DagsterRunStatus.FAILURE if fails else dg.DagsterRunStatus.SUCCESS
    event = next(
        e
        for e in result.all_events
        if e.event_type_value == ("PIPELINE_FAILURE" if fails else "PIPELINE_SUCCESS")
    )
    [sensor] = [
        s for s in mlflow_parent_closers if s.name == f"close_mlflow_parent_on_{status.value.lower()}"
    ]
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=event, dagster_instance=instance,
        dagster_run=result.dagster_run, resources={"mlflow": mlflow},
    )  # fmt: skip
    sensor(context)
    assert tracker.client.get_run(parent).info.status == ("FAILED" if fails else "FINISHED")
