"""Crash-safety driver: SIGKILL ``npr run`` inside its stages, restart it, compare with an uninterrupted run.

    python -m npr_pipelines.reliability.crash --profile small --kills-per-stage 3

The main job runs as a subprocess in a session of its own, in a given home: its process group holds the
driver, Ray's head processes and raylet; the Ray workers, which raylet starts in process groups of their
own, are in the session too. The driver reads its output to know which stage is running: a stage starts with
its ``<stage>: run key ...`` log line (Dagster's INFO log of the stage asset), evaluation with the
``phase 2`` line; per-step progress (``<stage> step N:``, printed by the stage's Ray task) shows what a
restart resumed from. When a wanted stage starts, the driver draws a delay (`Window`: uniform within
the stage's expected duration, or half the time within the part where it writes its resumable state;
measured in the baseline run, shrunk when a stage ends early) and then SIGKILLs the whole session (the
group, then the workers), checks that no process of the job survived (they carry ``TAG_VAR``, also
outside the session), snapshots the working
directories (`state.snapshot_work`) and starts the job again. A stage that finishes before its kill
can be killed again only in a fresh home: a *round* is one home, killed until its wanted kills are
spent and then run to completion; rounds repeat until every stage got its kills.

After every kill: no visible partial artifact (`state.visible_partial_artifacts`). After every restart:
nothing saved before the kill was redone or lost, and no stage logged a step at or below a checkpoint
it had saved (`state.resume_problems`, `state.restart_problems`). After every round: the final
artifacts' digests equal the uninterrupted run's (`state.artifact_digests`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from npr_pipelines.reliability.state import (
    WorkState,
    artifact_digests,
    digest_mismatches,
    last_write,
    restart_problems,
    resume_problems,
    snapshot_work,
    visible_partial_artifacts,
)

#: The stages a sweep kills, in pipeline order.
STAGES = ("npr_zero", "rejection", "npr_beta", "sr_beta", "npr", "sr", "evaluation")
TRAINING = ("npr_zero", "npr_beta", "sr_beta", "npr", "sr")
#: What kind of work each stage is (its resume mechanism).
STAGE_KIND: dict[str, str] = {
    "npr_zero": "rl", "npr": "rl", "sr": "rl", "npr_beta": "sft", "sr_beta": "sft", "rejection": "rejection",
    "evaluation": "evaluation",
}  # fmt: skip
#: Marks the end of the last stage.
DONE = "done"

_START = re.compile(r"\b(npr_zero|rejection|npr_beta|sr_beta|npr|sr): run key [0-9a-f]+")
_STEP = re.compile(r"\b(npr_zero|npr_beta|sr_beta|npr|sr) step (\d+):")


@dataclass(frozen=True)
class Window:
    """When to kill inside a stage: it lasts ``total_s`` (its start line to the next stage's) and its
    resumable state changes until ``work_s`` (the last write into its working directory)."""

    total_s: float
    work_s: float

    def draw(self, rng: random.Random) -> float:
        """A kill delay after the stage's start: half the time within its work, else anywhere in it."""
        bound = min(self.work_s, self.total_s) if rng.random() < 0.5 else self.total_s
        return rng.uniform(0.0, bound)

    def shrunk(self, seconds: float) -> Window:
        return Window(min(self.total_s, seconds), min(self.work_s, seconds))


#: The small profile's stages without a baseline run: about half of what 2 busy cores measure (npr_zero
#: 2.1 s, 0.9 s of it writing checkpoints; rejection 1.5/1.1; SFT 0.5/0.1; npr 0.7/0.2; sr 1.0/0.4;
#: evaluation 7.5/7.0), so that a kill lands inside its stage on a faster machine too.
DEFAULT_WINDOWS: dict[str, Window] = {
    "npr_zero": Window(0.9, 0.45), "rejection": Window(0.7, 0.5), "npr_beta": Window(0.2, 0.05),
    "sr_beta": Window(0.25, 0.05), "npr": Window(0.3, 0.1), "sr": Window(0.45, 0.2), "evaluation": Window(3.4, 3.2),
}  # fmt: skip
#: Variable set in the job's environment to find its processes (``/proc/<pid>/environ``).
TAG_VAR = "NPR_CRASH_TAG"


def stage_marker(line: str) -> str | None:
    """The stage that starts at this output line (`DONE` at the end of the run), else None."""
    if line.startswith("phase 2:"):
        return "evaluation"
    if line.startswith("wrote ") and line.rstrip().endswith("summary.json"):
        return DONE
    m = _START.search(line)
    return m.group(1) if m else None


def logged_steps(lines: Sequence[str]) -> dict[str, list[int]]:
    """Training steps each stage's progress lines report, in order."""
    out: dict[str, list[int]] = {}
    for line in lines:
        if m := _STEP.search(line):
            out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


# -- the job process ---------------------------------------------------------------------------------


def _live_processes() -> list[tuple[int, int, bytes]]:
    """(pid, session id, environment) of every live process this user can read."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            env = (entry / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if state != "Z":
            out.append((int(entry.name), int(session), env))
    return out


def job_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``TAG_VAR=tag`` (the job and everything it started)."""
    needle = f"{TAG_VAR}={tag}".encode()
    return sorted(pid for pid, _, env in _live_processes() if needle in env.split(b"\0"))


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    return sorted(pid for pid, session, _ in _live_processes() if session == sid)


class Job:
    """One start of the main job in its own session (and process group); a thread reads its output."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str], log: IO[str]) -> None:
        self.start, self.clock0 = time.monotonic(), time.time()
        self.proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
            start_new_session=True, text=True, errors="replace", bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self._reader.start()

    def _read(self, log: IO[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.monotonic() - self.start
            with contextlib.suppress(ValueError):  # the log is closed once the attempt is over
                log.write(f"{t:9.3f} {line}")
            self.lines.put((t, line.rstrip("\n")))
        self.lines.put(None)

    def now(self) -> float:
        return time.monotonic() - self.start

    def kill(self) -> None:
        """SIGKILL the job's process group, then every other process of its session: the Ray workers,
        which raylet starts in process groups of their own (left alone, they would go on computing and
        writing for seconds, until they notice that raylet is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in session_processes(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def drain(self, timeout: float = 3.0) -> list[tuple[float, str]]:
        """What the job wrote before the kill (read until every writer of the pipe is gone, or ``timeout``:
        a process that escaped the kill may hold the pipe open)."""
        self._reader.join(timeout)
        out = []
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return out
            if item is not None:
                out.append(item)


# -- one attempt -------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One start of the job: killed (and where) or run to its end."""

    index: int
    wall_s: float
    returncode: int | None
    killed_in: str | None = None  # the stage running when it was killed
    hung: bool = False  # killed because it ran past the attempt's time limit
    kill_after_s: float | None = None  # seconds after that stage started
    survivors: list[int] = field(default_factory=list)  # processes that outlived the kill
    tag: str = ""  # the job's processes carry TAG_VAR=tag
    durations: dict[str, float] = field(default_factory=dict)  # stage -> seconds, stages that ended
    started: dict[str, float] = field(default_factory=dict)  # stage -> its (last) start, Unix time
    lines: list[str] = field(default_factory=list, repr=False)


#: Called when a stage starts; returns a kill delay (seconds) or None.
ArmFn = Callable[[str], float | None]


def run_attempt(cmd: Sequence[str], env: Mapping[str, str], log_path: Path, index: int, arm: ArmFn,
                timeout_s: float = 900.0, grace_s: float = 15.0) -> Attempt:  # fmt: skip
    """Start the job and let it run until it exits, or until the delay ``arm`` gave for a starting
    stage has passed: then SIGKILL its session and check that none of its processes outlive ``grace_s``."""
    tag = uuid.uuid4().hex
    with open(log_path, "w", encoding="utf-8") as log:
        job = Job(cmd, {**env, TAG_VAR: tag}, log)
        lines: list[str] = []
        starts: list[tuple[str, float]] = []
        deadline: float | None = None
        killed_at: float | None = None
        hung = False
        while True:
            now = job.now()
            if now > timeout_s or (deadline is not None and now >= deadline):
                job.kill()
                killed_at, hung = now, now > timeout_s
                break
            wait = min(0.5, (deadline - now) if deadline is not None else 0.5)
            try:
                item = job.lines.get(timeout=max(wait, 0.0))
            except queue.Empty:
                continue
            if item is None:
                break
            t, line = item
            lines.append(line)
            stage = stage_marker(line)
            if stage is None:
                continue
            starts.append((stage, t))
            delay = arm(stage) if stage != DONE else None
            deadline = t + delay if delay is not None else None
        for t, line in job.drain() if killed_at is not None else []:  # written before the kill
            lines.append(line)
            if (stage := stage_marker(line)) is not None:
                starts.append((stage, t))
        returncode = job.proc.wait()
        killed = killed_at is not None
        attempt = Attempt(
            index, round(job.now(), 2), None if killed else returncode, hung=hung, tag=tag, lines=lines
        )
    if killed_at is not None:
        attempt.killed_in = starts[-1][0] if starts else None
        attempt.kill_after_s = round(max(0.0, killed_at - starts[-1][1]), 3) if starts else None
        attempt.survivors = _reap(tag, grace_s)
    attempt.durations = {a: round(tb - ta, 3) for (a, ta), (_, tb) in itertools.pairwise(starts)}
    attempt.started = {stage: job.clock0 + t for stage, t in starts}
    return attempt


def _reap(tag: str, grace_s: float = 15.0) -> list[int]:
    """Processes of the killed job still alive after ``grace_s`` (then killed, so the sweep goes on)."""
    deadline = time.monotonic() + grace_s
    while (alive := job_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


# -- rounds and the sweep ----------------------------------------------------------------------------


@dataclass
class Kill:
    round: int
    attempt: int
    stage: str | None
    after_s: float | None
    saved: str  # what the stage had saved at the kill
    resumed: str = ""  # what its restart logged
    problems: list[str] = field(default_factory=list)


@dataclass
class Round:
    home: str
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    completed: bool = False
    wall_s: float = 0.0
    digest_mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    windows: dict[str, Window] = field(default_factory=dict)  # as learnt by the round's plan


class KillPlan:
    """Which stages still want a kill in this round, and when to kill them.

    ``wanted`` counts kills per stage, or per kind of stage with ``kind_of`` (e.g. `STAGE_KIND`: any
    RL stage). A stage that ran to its end is not armed again in this round: it is finished, and a
    restart only reuses it.
    """

    def __init__(self, wanted: Mapping[str, int], windows: Mapping[str, Window], rng: random.Random,
                 kind_of: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.wanted = Counter({s: n for s, n in wanted.items() if n > 0})
        self.windows = dict(windows)
        self.rng = rng
        self.kind_of = dict(kind_of or {})
        self.finished: set[str] = set()

    def _key(self, stage: str | None) -> str | None:
        return self.kind_of.get(stage, stage) if stage is not None else None

    def arm(self, stage: str) -> float | None:
        if stage in self.finished or self.wanted[self._key(stage)] <= 0:
            return None
        return self.windows.get(stage, Window(1.0, 1.0)).draw(self.rng)

    def settle(self, attempt: Attempt) -> None:
        """Count the kill where it landed; stages that ended are finished (a wanted one ended before its
        kill: its expected duration shrinks to what was observed)."""
        key = self._key(attempt.killed_in)
        if self.wanted[key] > 0:
            self.wanted[key] -= 1
        for stage, seconds in attempt.durations.items():
            if stage not in self.finished and self.wanted[self._key(stage)] > 0:
                self.windows[stage] = self.windows.get(stage, Window(seconds, seconds)).shrunk(seconds)
            self.finished.add(stage)
        self.wanted = +self.wanted


def main_job_command(profile: str, home: Path) -> list[str]:
    return [sys.executable, "-m", "npr_pipelines.cli", "run", "--profile", profile, "--home", str(home)]


def prepare_home(home: Path, toy_cache: Path | None) -> None:
    """An empty home, sharing the bootstrap cache (the base model) when ``toy_cache`` is given."""
    home.mkdir(parents=True, exist_ok=False)
    if toy_cache is not None:
        toy_cache.mkdir(parents=True, exist_ok=True)
        (home / "cache").mkdir()
        (home / "cache" / "toy_base").symlink_to(toy_cache.resolve(), target_is_directory=True)


def _job_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    for var in ("RAY_ADDRESS", "NPR_RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DAGSTER_HOME", "NPR_HOME"):
        out.pop(var, None)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def _restart_report(kill: Kill, before: WorkState, after: WorkState, attempt: Attempt) -> None:
    """What the start after ``kill`` resumed from, and what it redid or lost (``kill.problems``)."""
    steps = logged_steps(attempt.lines)
    if kill.stage in TRAINING:
        logged = steps.get(kill.stage)
        kill.resumed = f"restart logged steps {logged}" if logged else "restart logged no step of it"
    elif kill.stage == "rejection":
        kept, now = (sum(map(len, s.attempts.values())) for s in (before, after))
        kill.resumed = f"restart kept the {kept} logged attempts ({now} after it)"
    elif kill.stage == "evaluation":
        reused = sum("(saved earlier)" in line for line in attempt.lines)
        kill.resumed = f"restart reused {reused} saved evaluation chunks"
    kill.problems += resume_problems(before, after) + restart_problems(before, steps)


def run_round(home: Path, wanted: Mapping[str, int], *, profile: str = "small", baseline: Mapping[str, str],
              windows: Mapping[str, Window] = DEFAULT_WINDOWS, rng: random.Random, index: int = 0,
              toy_cache: Path | None = None, env: Mapping[str, str] | None = None,
              kind_of: Mapping[str, str] | None = None,
              max_attempts: int = 40, log: Callable[[str], None] = print) -> Round:  # fmt: skip
    """Kill the job in a fresh ``home`` until ``wanted`` (see `KillPlan`) is spent or its stages have
    passed, run it to completion, and compare its final artifacts with ``baseline`` digests."""
    prepare_home(home, toy_cache)
    plan = KillPlan(wanted, windows, rng, kind_of)
    job_env, cmd = _job_env(env), main_job_command(profile, home)
    result, start, pending = Round(str(home)), time.monotonic(), None
    while result.attempts < max_attempts:
        attempt = run_attempt(cmd, job_env, home / f"attempt-{result.attempts:02d}.log", result.attempts,
                              plan.arm)  # fmt: skip
        result.attempts += 1
        state = snapshot_work(home)
        if pending is not None:
            _restart_report(*pending, state, attempt)
        if attempt.hung:
            result.problems.append(f"attempt {attempt.index} hung (killed after {attempt.wall_s} s)")
            break
        if attempt.returncode is not None:
            result.completed = attempt.returncode == 0
            if not result.completed:
                result.problems.append(f"attempt {attempt.index} exited with {attempt.returncode}")
            break
        plan.settle(attempt)
        kill = Kill(index, attempt.index, attempt.killed_in, attempt.kill_after_s,
                    state.describe(attempt.killed_in or ""))  # fmt: skip
        kill.problems += [f"process {pid} survived the kill" for pid in attempt.survivors]
        kill.problems += visible_partial_artifacts(home)
        result.kills.append(kill)
        pending = (kill, state)
        log(f"round {index} attempt {attempt.index}: killed in {kill.stage} after {kill.after_s} s "
            f"({kill.saved}){'; PROBLEMS: ' + '; '.join(kill.problems) if kill.problems else ''}")  # fmt: skip
    result.wall_s, result.windows = round(time.monotonic() - start, 1), plan.windows
    if result.completed:
        result.digest_mismatches = digest_mismatches(artifact_digests(home), baseline)
        result.problems += visible_partial_artifacts(home)
    else:
        result.problems.append(f"did not complete within {max_attempts} attempts")
    return result


def baseline_run(home: Path, profile: str, toy_cache: Path | None, env: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, str], dict[str, Window], float]:  # fmt: skip
    """An uninterrupted run: its digests, its stages' windows and its wall time."""
    prepare_home(home, toy_cache)
    attempt = run_attempt(main_job_command(profile, home), _job_env(env), home / "attempt-00.log", 0,
                          lambda _stage: None)  # fmt: skip
    if attempt.returncode != 0:
        raise RuntimeError(f"the baseline run failed ({attempt.returncode}); see {home / 'attempt-00.log'}")
    windows = {}
    for stage, seconds in attempt.durations.items():
        written = last_write(home, stage)
        work = written - attempt.started[stage] if written is not None else seconds
        windows[stage] = Window(seconds, round(min(max(work, 0.0), seconds), 3))
    return artifact_digests(home), windows, attempt.wall_s


@dataclass
class SweepReport:
    profile: str
    seed: int
    kills_per_stage: int
    baseline_wall_s: float
    windows: dict[str, Window]  # of each wanted stage, measured in the baseline run
    rounds: list[Round]
    wall_s: float = 0.0

    def kills_by_stage(self) -> dict[str, int]:
        """Kills per stage they landed in ("startup": before the first stage)."""
        return {
            **dict.fromkeys(STAGES, 0),
            **Counter(k.stage or "startup" for r in self.rounds for k in r.kills),
        }

    def kill_lines(self) -> list[str]:
        """One line per kill: where, what was saved, what the restart did."""
        return [f"{k.stage} +{k.after_s} s: {k.saved}; {k.resumed}" + (f"; PROBLEMS {k.problems}" if k.problems else "")
                for r in self.rounds for k in r.kills]  # fmt: skip

    def ok(self) -> bool:
        kills = self.kills_by_stage()
        enough = all(kills[s] >= self.kills_per_stage for s in self.windows)  # the stages the sweep wanted
        clean = all(
            r.completed and not r.digest_mismatches and not r.problems and not any(k.problems for k in r.kills)
            for r in self.rounds
        )  # fmt: skip
        return enough and clean

    def to_json(self) -> dict:
        return {**asdict(self), "kills_by_stage": self.kills_by_stage(), "ok": self.ok()}


def sweep(root: Path, *, profile: str = "small", kills_per_stage: int = 3, stages: Sequence[str] = STAGES,
          seed: int = 0, max_rounds: int = 6, toy_cache: Path | None = None,
          log: Callable[[str], None] = print) -> SweepReport:  # fmt: skip
    """A baseline run, then rounds (fresh homes under ``root``) until every stage got its kills. The
    homes share one bootstrap cache (``toy_cache``, default ``root/toy_base``)."""
    start = time.monotonic()
    toy_cache = toy_cache or root / "toy_base"
    log(f"baseline run in {root / 'baseline'}")
    baseline, measured, baseline_wall = baseline_run(root / "baseline", profile, toy_cache)
    windows = {s: measured.get(s, DEFAULT_WINDOWS[s]) for s in stages}
    report = SweepReport(profile, seed, kills_per_stage, baseline_wall, dict(windows), [])
    rng = random.Random(seed)
    owed = Counter({s: kills_per_stage for s in stages})
    while +owed and len(report.rounds) < max_rounds:
        index = len(report.rounds)
        log(f"round {index}: wanted kills {dict(+owed)}")
        result = run_round(root / f"round-{index}", +owed, profile=profile, baseline=baseline, windows=windows,
                           rng=rng, index=index, toy_cache=toy_cache, log=log)  # fmt: skip
        report.rounds.append(result)
        owed -= Counter(k.stage for k in result.kills)
        windows.update(result.windows)  # a stage that ended before its kill is shorter than measured
        log(f"round {index}: {len(result.kills)} kills, completed {result.completed}, "
            f"digests {'equal' if not result.digest_mismatches else result.digest_mismatches}, {result.wall_s} s")  # fmt: skip
    report.wall_s = round(time.monotonic() - start, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npr_pipelines.reliability.crash", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--profile", default="small")
    parser.add_argument("--kills-per-stage", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, help="directory for the homes (default: a new temp dir)")
    parser.add_argument("--max-rounds", type=int, default=6)
    parser.add_argument("--toy-cache", type=Path, help="a bootstrap cache to share (default: ROOT/toy_base)")
    args = parser.parse_args(argv)
    if args.root is None:
        import tempfile

        args.root = Path(tempfile.mkdtemp(prefix="npr-crash-"))
    report = sweep(args.root, profile=args.profile, kills_per_stage=args.kills_per_stage, stages=args.stages,
                   seed=args.seed, max_rounds=args.max_rounds, toy_cache=args.toy_cache,
                   log=lambda message: print(message, flush=True))  # fmt: skip
    (args.root / "crash_report.json").write_text(json.dumps(report.to_json(), indent=2))
    rounds = [{"attempts": r.attempts, "completed": r.completed, "digests_equal": not r.digest_mismatches,
               "problems": r.problems, "wall_s": r.wall_s} for r in report.rounds]  # fmt: skip
    print(json.dumps({"kills_by_stage": report.kills_by_stage(), "kills": report.kill_lines(), "rounds": rounds,
                      "ok": report.ok(), "wall_s": report.wall_s, "report": str(args.root / "crash_report.json")},
                     indent=2))  # fmt: skip
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
