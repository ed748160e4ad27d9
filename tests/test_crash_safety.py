"""Crash safety (#11 item 1): SIGKILL the main job inside its stages, restart it, get the same artifacts.

The slow test kills ``npr run`` (small profile) in an RL stage, in rejection sampling, in an SFT stage
and in evaluation, at seeded random moments, restarts it after each kill, and compares the final
artifacts' content digests with the session's uninterrupted run (``small_pipeline``). The fast tests
cover the pieces: the driver's reading of the job's output, killing a whole process group, the checks
on what a restart must reuse, and the recovery of the Dagster runs a killed process leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import pytest

from npr_pipelines.reliability.crash import (
    STAGE_KIND,
    Attempt,
    Kill,
    KillPlan,
    Round,
    SweepReport,
    Window,
    job_processes,
    logged_steps,
    run_attempt,
    run_round,
    stage_marker,
)
from npr_pipelines.reliability.state import (
    WorkState,
    artifact_digests,
    restart_problems,
    resume_problems,
    snapshot_work,
    visible_partial_artifacts,
)

# -- reading the job's output ------------------------------------------------------------------------

DAGSTER_LINE = (
    "2026-11-26 04:32:33 +0000 - dagster - INFO - main - cfd920f7 - {asset} - {stage}: run key "
    "14a375082f99c0f4, workdir /h/work/{stage}/14a375082f99c0f4, mlflow run f9f43bcc"
)


@pytest.mark.parametrize(
    ("line", "stage"),
    [
        (DAGSTER_LINE.format(asset="npr_zero_policy", stage="npr_zero"), "npr_zero"),
        (DAGSTER_LINE.format(asset="cold_start_traces", stage="rejection"), "rejection"),
        (DAGSTER_LINE.format(asset="npr_policy", stage="npr"), "npr"),
        (DAGSTER_LINE.format(asset="sr_beta_checkpoint", stage="sr_beta"), "sr_beta"),
        ("phase 2: evaluating 6 final checkpoints on toy_test", "evaluation"),
        ("wrote /tmp/h/summary.json", "done"),
        (
            "2026-11-26 - dagster - INFO - evaluate - 2d75 - benchmark_scores - eval sr-000002 on toy_test: "
            "run key a1371658ea6886fc, workdir /h/work/eval/a1371658ea6886fc",
            None,
        ),
        ("\x1b[36m(_timed pid=13845)\x1b[0m npr_zero step 1: loss -0.028", None),
    ],
)
def test_stage_markers(line: str, stage: str | None) -> None:
    assert stage_marker(line) == stage


def test_logged_steps_per_stage() -> None:
    lines = [
        "\x1b[36m(_timed pid=1)\x1b[0m npr_zero step 2: loss -0.02",
        "\x1b[36m(_timed pid=1)\x1b[0m npr step 1: reward_mean 0",
        "\x1b[36m(_timed pid=1)\x1b[0m sr_beta step 3: loss 2.8",
        "\x1b[36m(_timed pid=1)\x1b[0m rejection batch 1: attempts 64, accepted 2, open 40",
        "\x1b[36m(_timed pid=1)\x1b[0m npr step 2: reward_mean 0",
    ]
    assert logged_steps(lines) == {"npr_zero": [2], "npr": [1, 2], "sr_beta": [3]}


def test_kill_delays_fall_within_the_stage_and_half_within_its_work() -> None:
    rng, window = random.Random(3), Window(total_s=2.0, work_s=0.5)
    delays = [window.draw(rng) for _ in range(400)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert 0.55 < sum(d <= 0.5 for d in delays) / len(delays) < 0.7  # 1/2 + 1/2 * 1/4


def test_kill_plan_arms_wanted_unfinished_stages_and_counts_by_kind() -> None:
    plan = KillPlan({"rl": 1, "evaluation": 1}, {"npr_zero": Window(2.0, 1.0)}, random.Random(0), STAGE_KIND)
    assert plan.arm("rejection") is None
    assert 0.0 <= plan.arm("npr_zero") <= 2.0
    # npr_zero ended (0.5 s) before its kill; the kill landed in rejection, which wanted none
    plan.settle(Attempt(0, 9.0, None, killed_in="rejection", durations={"npr_zero": 0.5}))
    assert plan.arm("npr_zero") is None and plan.windows["npr_zero"] == Window(0.5, 0.5)
    assert plan.arm("npr") is not None  # another RL stage takes the RL kill
    plan.settle(Attempt(1, 9.0, None, killed_in="npr"))
    assert plan.arm("sr") is None and plan.arm("evaluation") is not None


# -- killing a process group -------------------------------------------------------------------------

FAKE_JOB = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, time\\n{detach}time.sleep(60)"])
print("phase 1: materializing the stage assets", flush=True)
print("x - npr_zero: run key 0123abcd, workdir w", flush=True)
time.sleep(60)
"""


def test_a_sweep_is_ok_when_each_wanted_stage_got_its_kills_and_every_round_is_clean() -> None:
    window = Window(1.0, 0.5)
    kills = [
        Kill(0, i, stage, 0.1, "no checkpoint yet") for i, stage in enumerate(["npr_beta", "npr_beta", "npr"])
    ]
    report = SweepReport(
        "small", 0, 2, 10.0, {"npr_beta": window, "npr": window}, [Round("h", kills, 4, True)]
    )
    assert not report.ok()  # npr got one kill of two (the stages not wanted do not count)
    report.rounds[0].kills.append(Kill(0, 3, "npr", 0.2, "checkpoints at steps [1]"))
    assert report.ok()
    report.rounds[0].digest_mismatches.append("npr")
    assert not report.ok()


@pytest.mark.parametrize(
    ("detach", "survivors"),
    [
        ("", 0),  # in the job's process group
        ("os.setpgid(0, 0)\\n", 0),  # in a group of its own, as raylet starts Ray workers
        ("os.setsid()\\n", 1),  # out of the session: outlives the kill, reported (then killed)
    ],
)
def test_the_whole_job_is_killed_and_escapees_are_reported(
    tmp_path: Path, detach: str, survivors: int
) -> None:
    script = FAKE_JOB.format(detach=detach)
    attempt = run_attempt([sys.executable, "-c", script], dict(os.environ), tmp_path / "log", 0,
                          lambda stage: 0.2 if stage == "npr_zero" else None, timeout_s=30, grace_s=2)  # fmt: skip
    assert attempt.returncode is None and not attempt.hung
    assert attempt.killed_in == "npr_zero" and 0.2 <= attempt.kill_after_s < 5
    assert len(attempt.survivors) == survivors
    time.sleep(0.5)
    assert job_processes(attempt.tag) == []


# -- what a restart must reuse -----------------------------------------------------------------------


def make_checkpoint(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")


def attempt_line(pid: str, t: int) -> str:
    return json.dumps({"problem_id": pid, "try": t, "text": "x"})


def test_work_state_checks_detect_redone_and_lost_work(tmp_path: Path) -> None:
    work = tmp_path / "work"
    make_checkpoint(work / "npr_zero" / "k1" / "step-000001")
    make_checkpoint(work / "npr_beta" / "k2" / "checkpoints" / "step-000002")
    (work / "npr_zero" / "k1" / ".tmp-step-000002-77").mkdir()  # unfinished: not a checkpoint
    (work / "rejection" / "k3").mkdir(parents=True)
    log = work / "rejection" / "k3" / "attempts.jsonl"
    log.write_text(attempt_line("a", 0) + "\n" + '{"problem_id": "b", "tr')  # torn last line
    (work / "eval" / "k4" / "parallel").mkdir(parents=True)
    (work / "eval" / "k4" / "parallel" / "chunk-000000.json").write_text("{}")
    before = snapshot_work(tmp_path)
    assert before.checkpoints.keys() == {"npr_zero/k1", "npr_beta/k2"}
    assert [list(steps) for steps in before.checkpoints.values()] == [[2], [1]]
    assert before.describe("npr_zero") == "checkpoints at steps [1]"
    assert before.describe("rejection") == "1 attempts logged"

    # a good restart: appends, adds checkpoints, keeps the rest
    make_checkpoint(work / "npr_zero" / "k1" / "step-000002")
    log.write_text("\n".join([attempt_line("a", 0), attempt_line("b", 0), ""]))
    assert resume_problems(before, snapshot_work(tmp_path)) == []
    assert restart_problems(before, {"npr_zero": [2], "npr_beta": []}) == []

    # a bad one: starts a stage over, resamples, re-evaluates
    assert restart_problems(before, {"npr_zero": [1, 2]}) == [
        "npr_zero restarted at step 1 although step 1 was saved"
    ]
    (work / "npr_zero" / "k1" / "step-000001").rename(work / "old")
    make_checkpoint(work / "npr_zero" / "k1" / "step-000001")
    log.write_text("\n".join([attempt_line("a", 0), attempt_line("a", 0), ""]))
    chunk = work / "eval" / "k4" / "parallel" / "chunk-000000.json"
    (chunk.parent / "new").write_text("{}")
    (chunk.parent / "new").replace(chunk)  # how evaluation writes a chunk
    problems = resume_problems(before, snapshot_work(tmp_path))
    assert any("npr_zero/k1 step 1 was rewritten" in p for p in problems)
    assert any("attempts sampled twice: [('a', 0)]" in p for p in problems)
    assert any("parallel/chunk-000000.json was rewritten" in p for p in problems)
    assert WorkState().describe("evaluation") == "0 evaluation files saved"


def test_visible_partial_artifacts(tmp_path: Path) -> None:
    ckpts = tmp_path / "artifacts" / "checkpoints" / "npr" / "k"
    (ckpts / "step-000001").mkdir(parents=True)
    (ckpts / "step-000001" / "config.json").write_text("{}")  # visible, no manifest: partial
    (ckpts / ".step-000002.publishing-abc").mkdir()
    (ckpts / ".step-000002.publishing-abc" / "config.json").write_text("{}")  # hidden staging: fine
    assert visible_partial_artifacts(tmp_path) == [
        f"{ckpts / 'step-000001'} is visible without MANIFEST.json"
    ]


# -- Dagster runs a killed process left ---------------------------------------------------------------


def test_restart_fails_the_killed_runs_and_frees_their_pool_slot(tmp_path: Path) -> None:
    """A SIGKILLed ``npr run`` leaves its in-process run STARTED, holding the ``compute`` pool slot; the
    restart's first pooled step would wait for it forever."""
    import dagster as dg

    from assets.jobs import RUN_TAGS, home_lock, recover_interrupted_runs
    from npr_pipelines.cli import DAGSTER_YAML

    @dg.asset(pool="compute")
    def pooled() -> int:
        return 1

    job = dg.Definitions(
        assets=[pooled], jobs=[dg.define_asset_job("j", selection=[pooled])]
    ).resolve_job_def("j")
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default("compute")
        dead = instance.create_run_for_job(job, tags=RUN_TAGS, status=dg.DagsterRunStatus.STARTED)
        storage.claim_concurrency_slot("compute", dead.run_id, "pooled")
        foreign = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)  # not npr run's
        assert storage.get_concurrency_info("compute").active_slot_count == 1
        with home_lock(tmp_path):
            with pytest.raises(RuntimeError, match="in use by another `npr run`"), home_lock(tmp_path):
                pass
            assert recover_interrupted_runs(instance) == [dead.run_id]
            assert recover_interrupted_runs(instance) == []
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(foreign.run_id).status == dg.DagsterRunStatus.STARTED
        assert storage.get_concurrency_info("compute").active_slot_count == 0
        assert job.execute_in_process(instance=instance, tags=RUN_TAGS).success  # the slot is free again


# -- the main job, killed and restarted ---------------------------------------------------------------

#: One kill in each kind of stage (any RL stage, rejection sampling, any SFT stage, evaluation).
KILLS_BY_KIND = {"rl": 1, "rejection": 1, "sft": 1, "evaluation": 1}


@pytest.mark.slow
def test_main_job_killed_in_every_kind_of_stage_completes_with_the_same_artifacts(
    small_pipeline, tmp_path: Path
) -> None:
    baseline = artifact_digests(small_pipeline.home)
    result = run_round(
        tmp_path / "home", KILLS_BY_KIND, baseline=baseline, rng=random.Random(11), kind_of=STAGE_KIND,
        toy_cache=(small_pipeline.home / "cache" / "toy_base").resolve(),
    )  # fmt: skip
    report = json.dumps([k.__dict__ for k in result.kills], indent=1)
    print(f"\ncrash round: {result.attempts} starts, {result.wall_s} s\n{report}")
    assert result.completed, result.problems
    assert {STAGE_KIND.get(k.stage or "") for k in result.kills} >= set(KILLS_BY_KIND), report
    assert [p for k in result.kills for p in k.problems] == [], report  # no survivor, partial or redo
    assert result.problems == []
    assert result.digest_mismatches == []
