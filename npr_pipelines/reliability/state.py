"""What a crash test compares and checks in an ``npr run`` home (no Dagster, no Ray).

- `artifact_digests`: content digests of the final artifacts: every stage's final checkpoint (its
  manifest's file checksums without ``trainer_state.json``, which holds step timings), the rejection
  attempts and the corpus, each final checkpoint's evaluation samples (without latencies) and the
  ``summary.json`` figures (without the timing-based speedups). Equal digests across two homes mean the
  same weights, data and scores.
- `WorkState`: the resumable state of the stages' working directories (checkpoints, the rejection
  attempt log, evaluation chunks), snapshotted when the job is killed; `resume_problems` then checks
  that the restart reused it instead of redoing it.
- `visible_partial_artifacts`: published artifacts a reader could see half-written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npr_pipelines.storage import MANIFEST_NAME, ArtifactError, Storage

#: Checkpoint files that hold wall-clock timings (``trainer_state.json``: per-step seconds).
VOLATILE_FILES = frozenset({"trainer_state.json"})
#: ``summary.json`` stage fields measured in wall-clock time.
TIMING_FIELDS = frozenset({"throughput_speedup", "latency_speedup"})
STEP_DIR = re.compile(r"^step-(\d{6})$")
NON_TRAINING_WORK = ("eval", "rejection")
#: A file's identity across snapshots: (inode, modification time in ns). Rewritten: another identity.
FileId = tuple[int, int]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def final_checkpoints(artifacts: Path) -> dict[str, dict[str, Any]]:
    """Stage -> the index entry of its highest-step published checkpoint."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((artifacts / "checkpoints" / "index").glob("*.json")):
        ref = json.loads(path.read_text())
        if ref["stage"] not in out or ref["step"] > out[ref["stage"]]["step"]:
            out[ref["stage"]] = ref
    return out


def checkpoint_digest(storage: Storage, uri: str) -> str:
    """The content of a published checkpoint: its files' checksums, timings file excluded."""
    manifest = storage.read_manifest(uri)
    return _sha(sorted((n, e.sha256) for n, e in manifest.files.items() if n not in VOLATILE_FILES))


def _frame_digest(path: Path) -> str:
    import pandas as pd

    return hashlib.sha256(pd.read_parquet(path).to_json(orient="records").encode()).hexdigest()[:24]


def _samples_digest(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _sha([{k: v for k, v in r.items() if k != "latency_s"} for r in rows])


def artifact_digests(home: Path, benchmark: str = "toy_test") -> dict[str, str]:
    """Named content digests of a finished home's final artifacts (see the module docstring)."""
    artifacts = home / "artifacts"
    storage = Storage(str(artifacts))
    out: dict[str, str] = {}
    for stage, ref in sorted(final_checkpoints(artifacts).items()):
        out[f"checkpoint:{stage}"] = f"step {ref['step']} {checkpoint_digest(storage, ref['uri'])}"
        samples = artifacts / "reports" / "samples" / f"{ref['partition']}__{benchmark}.jsonl"
        if samples.exists():
            out[f"eval_samples:{stage}"] = _samples_digest(samples)
    io = artifacts / "io"
    out["corpus"] = _frame_digest(io / "self_distilled_corpus.parquet")
    out["rejection_attempts"] = _frame_digest(io / "cold_start_traces.parquet")
    summary = json.loads((home / "summary.json").read_text())
    for stage, entry in sorted(summary["stages"].items()):
        out[f"summary:{stage}"] = json.dumps({k: v for k, v in entry.items() if k not in TIMING_FIELDS})
    out["summary:eval"] = json.dumps(summary["eval"], sort_keys=True)
    return out


def digest_mismatches(got: Mapping[str, str], want: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two `artifact_digests` results."""
    return [
        f"{key}: {got.get(key)} != {want.get(key)}"
        for key in sorted(set(got) | set(want))
        if got.get(key) != want.get(key)
    ]


# -- resumable state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkState:
    """The resumable state under ``home/work`` at one moment."""

    checkpoints: dict[str, dict[int, FileId]] = field(default_factory=dict)  # "<stage>/<key>" -> step -> id
    attempts: dict[str, list[str]] = field(default_factory=dict)  # rejection key -> complete log lines
    chunks: dict[str, FileId] = field(default_factory=dict)  # "<key>/<mode>/<file>" -> id

    def saved_steps(self, stage: str) -> list[int]:
        return sorted(s for k, steps in self.checkpoints.items() if k.split("/")[0] == stage for s in steps)

    def describe(self, stage: str) -> str:
        """What a stage had saved (for the report)."""
        if stage == "rejection":
            return f"{sum(map(len, self.attempts.values()))} attempts logged"
        if stage == "evaluation":
            return f"{len(self.chunks)} evaluation files saved"
        steps = self.saved_steps(stage)
        return f"checkpoints at steps {steps}" if steps else "no checkpoint yet"


def _file_id(path: Path) -> FileId:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _checkpoint_id(path: Path) -> FileId:
    """A checkpoint's identity: its weights file (``trainer_state.json`` may gain metrics later)."""
    weights = path / "model.safetensors"
    return _file_id(weights if weights.exists() else path / "trainer_state.json")


def _complete_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    return raw[: raw.rfind(b"\n") + 1].decode().splitlines()


def snapshot_work(home: Path) -> WorkState:
    """The checkpoints, attempt logs and evaluation files a restart should reuse."""
    work = home / "work"
    state = WorkState()
    if not work.is_dir():
        return state
    for stage_dir in sorted(p for p in work.iterdir() if p.is_dir() and p.name not in NON_TRAINING_WORK):
        for key_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            steps = {
                int(m.group(1)): _checkpoint_id(d)
                for d in key_dir.rglob("step-*")
                if (m := STEP_DIR.match(d.name)) and (d / "trainer_state.json").is_file()
            }
            state.checkpoints[f"{stage_dir.name}/{key_dir.name}"] = steps
    for log in sorted(work.glob("rejection/*/attempts.jsonl")):
        state.attempts[log.parent.name] = _complete_lines(log)
    for chunk in sorted(work.glob("eval/*/*/*.json")):
        state.chunks[chunk.relative_to(work / "eval").as_posix()] = _file_id(chunk)
    return state


def last_write(home: Path, stage: str) -> float | None:
    """When a stage last wrote into its working directories (Unix time; None: nothing written)."""
    root = home / "work" / ("eval" if stage == "evaluation" else stage)
    times = [p.stat().st_mtime for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return max(times, default=None)


def resume_problems(before: WorkState, after: WorkState) -> list[str]:
    """Ways in which ``after`` (a later snapshot) redid or lost what ``before`` had saved."""
    problems: list[str] = []
    for key, steps in before.checkpoints.items():
        for step, file_id in steps.items():
            if after.checkpoints.get(key, {}).get(step) != file_id:
                problems.append(f"checkpoint {key} step {step} was rewritten or lost")
    for key, lines in before.attempts.items():
        later = after.attempts.get(key, [])
        if later[: len(lines)] != lines:
            problems.append(f"rejection attempt log {key} lost or rewrote its first {len(lines)} attempts")
        tries = Counter((a["problem_id"], a["try"]) for a in map(json.loads, later))
        again = sorted(k for k, n in tries.items() if n > 1)
        if again:
            problems.append(f"rejection {key}: attempts sampled twice: {again[:5]}")
    for name, file_id in before.chunks.items():
        if after.chunks.get(name) != file_id:
            problems.append(f"evaluation file {name} was rewritten or lost")
    return problems


def restart_problems(before: WorkState, logged_steps: Mapping[str, list[int]]) -> list[str]:
    """Stages whose restart logged a step at or below a checkpoint saved before the kill."""
    problems = []
    for stage, steps in logged_steps.items():
        saved = before.saved_steps(stage)
        if steps and saved and min(steps) <= max(saved):
            problems.append(f"{stage} restarted at step {min(steps)} although step {max(saved)} was saved")
    return problems


def visible_partial_artifacts(home: Path) -> list[str]:
    """Published-looking directories a reader could see incomplete: indexed checkpoints that do not
    verify, and visible checkpoint directories without a manifest (staging directories are hidden)."""
    artifacts = home / "artifacts"
    storage = Storage(str(artifacts))
    problems = []
    for path in sorted((artifacts / "checkpoints" / "index").glob("*.json")):
        uri = json.loads(path.read_text())["uri"]
        try:
            storage.verify_dir(uri)
        except ArtifactError as exc:
            problems.append(f"index {path.name} points at an unverifiable checkpoint: {exc}")
    for root in (artifacts / "checkpoints", home / "cache" / "checkpoints"):
        for d in sorted(root.rglob("*")) if root.is_dir() else []:
            hidden = any(part.startswith(".") for part in d.relative_to(root).parts)
            looks_published = d.is_dir() and (d / "config.json").exists()
            if looks_published and not hidden and not (d / MANIFEST_NAME).is_file():
                problems.append(f"{d} is visible without {MANIFEST_NAME}")
    return problems
