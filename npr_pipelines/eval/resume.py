"""Resumable evaluation: each chunk of problems is saved to a work directory as soon as it is graded.

The work directory is keyed by the caller (``benchmark_scores`` uses the checkpoint's data version,
the eval config and the problem set), so a re-run after a crash finds the chunks it finished and
decodes only the rest. Samples are seeded per (problem, sample) (``runner.sample_seed``), so a
resumed evaluation gives the same records as an uninterrupted one. Layout::

    <workdir>/<mode>/chunk-<start:06d>.json   {"problem_ids", "n_samples", "wall_s", "records"}
    <workdir>/<mode>/latency.json             {"problem_ids", "latencies_s"}

A file that is missing, unreadable or about other (problem, sample) pairs is decoded again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from npr_pipelines.data import Problem
from npr_pipelines.engine import Engine
from npr_pipelines.eval.runner import (
    EvalConfig,
    SampleRecord,
    build_engine,
    evaluate_problems,
    measure_latency,
)
from npr_pipelines.tokenization import PromptConfig


def chunk_path(workdir: Path, mode: str, start: int) -> Path:
    """Where the chunk of problems starting at index ``start`` is saved for ``mode``."""
    return Path(workdir) / mode / f"chunk-{start:06d}.json"


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write: a temp file in the same directory, then rename (a crash leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_chunk(path: Path, problem_ids: Sequence[str], n_samples: int, records: Sequence[SampleRecord],
               wall_s: float) -> None:  # fmt: skip
    """Save one graded chunk: its records and the wall-clock seconds its decoding took."""
    _write_json(path, {"problem_ids": list(problem_ids), "n_samples": n_samples, "wall_s": wall_s,
                       "records": [r.to_dict() for r in records]})  # fmt: skip


def load_chunk(
    path: Path, problem_ids: Sequence[str], n_samples: int
) -> tuple[list[SampleRecord], float] | None:
    """The saved (records, wall seconds) of a chunk, or None unless the file holds exactly one record per
    (problem, sample) of these ``problem_ids`` x ``range(n_samples)``, in that order."""
    data = _read_json(path)
    if data is None or data.get("problem_ids") != list(problem_ids) or data.get("n_samples") != n_samples:
        return None
    try:
        records = [SampleRecord(**r) for r in data["records"]]
        wall = float(data["wall_s"])
    except (KeyError, TypeError, ValueError):
        return None
    expected = [(pid, s) for pid in problem_ids for s in range(n_samples)]
    if [(r.problem_id, r.sample) for r in records] != expected:
        return None
    return records, wall


def evaluate_resumable(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: EvalConfig,
    prompt: PromptConfig | None = None,
    workdir: Path | None = None,
    chunk: int = 64,
    engine: Engine | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[SampleRecord], float, int]:
    """``evaluate_problems`` chunk by chunk, reusing the chunks already saved under ``workdir``.

    Returns the records (problem order, then sample), the decoding wall-clock seconds summed over the
    chunks (a reused chunk counts the seconds saved with it, so tokens/s stays comparable), and the
    number of chunks reused. ``workdir=None`` saves nothing.
    """
    records: list[SampleRecord] = []
    wall, reused = 0.0, 0
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        ids = [p.id for p in part]
        path = chunk_path(workdir, config.mode, start) if workdir is not None else None
        saved = load_chunk(path, ids, config.n_samples) if path is not None else None
        if saved is not None:
            recs, seconds = saved
            reused += 1
        else:
            engine = engine or build_engine(model, tokenizer, config)
            recs, seconds = evaluate_problems(
                model, tokenizer, part, config, prompt, engine=engine, chunk=len(part)
            )
            if path is not None:
                save_chunk(path, ids, config.n_samples, recs, seconds)
        records.extend(recs)
        wall += seconds
        if log is not None:
            done = min(start + chunk, len(problems))
            log(f"{config.mode}: {done}/{len(problems)} problems{' (saved earlier)' if saved else ''}")
    return records, wall, reused


def latency_resumable(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: EvalConfig,
    prompt: PromptConfig | None = None,
    workdir: Path | None = None,
    engine: Engine | None = None,
) -> list[float]:
    """``measure_latency`` (seconds per request at concurrency 1, one per problem), reusing the
    measurement saved under ``workdir`` for the same problems."""
    ids = [p.id for p in problems]
    path = Path(workdir) / config.mode / "latency.json" if workdir is not None else None
    data = _read_json(path) if path is not None else None
    if data is not None and data.get("problem_ids") == ids and len(data.get("latencies_s") or []) == len(ids):
        return [float(x) for x in data["latencies_s"]]
    latencies = measure_latency(model, tokenizer, problems, config, prompt, engine=engine)
    if path is not None:
        _write_json(path, {"problem_ids": ids, "latencies_s": latencies})
    return latencies
