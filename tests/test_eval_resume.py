"""Resumable evaluation: a re-run decodes only the chunks a crashed run did not save, and gets the same
records (per-(problem, sample) seeds)."""

from __future__ import annotations

import json

import pytest
from _support import byte_bpe_tokenizer

import npr_pipelines.eval.resume as resume
from npr_pipelines.data import Problem
from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.eval.resume import chunk_path, evaluate_resumable, latency_resumable, load_chunk
from npr_pipelines.eval.runner import EvalConfig, evaluate_problems

pytestmark = pytest.mark.usefixtures("one_thread")

PROBLEMS = [Problem(f"p{i}", f"what is {i}+{i}?", str(2 * i), "t") for i in range(5)]
CFG = EvalConfig(mode="parallel", n_samples=2, max_new_tokens=8, top_p=1.0)


@pytest.fixture(scope="module")
def model_tok():
    tok = byte_bpe_tokenizer()
    return tiny_qwen3(len(tok), seed=0), tok


def _spy(monkeypatch) -> list[list[str]]:
    """Record the problem ids of each chunk actually decoded."""
    decoded: list[list[str]] = []
    real = resume.evaluate_problems

    def spy(model, tok, part, *args, **kwargs):
        decoded.append([p.id for p in part])
        return real(model, tok, part, *args, **kwargs)

    monkeypatch.setattr(resume, "evaluate_problems", spy)
    return decoded


def test_rerun_after_a_crash_decodes_only_unfinished_chunks(model_tok, tmp_path, monkeypatch) -> None:
    model, tok = model_tok
    decoded = _spy(monkeypatch)
    first, wall, reused = evaluate_resumable(model, tok, PROBLEMS, CFG, workdir=tmp_path, chunk=2)
    assert decoded == [["p0", "p1"], ["p2", "p3"], ["p4"]] and reused == 0 and wall > 0
    reference, _ = evaluate_problems(model, tok, PROBLEMS, CFG)
    assert [r.response_ids for r in first] == [r.response_ids for r in reference]

    # a crash during the last chunk: it never got saved; a torn write of the middle one is unreadable
    chunk_path(tmp_path, "parallel", 4).unlink()
    chunk_path(tmp_path, "parallel", 2).write_text('{"problem_ids": ["p2", "p3"], "n_sam')
    decoded.clear()
    again, wall_again, reused = evaluate_resumable(model, tok, PROBLEMS, CFG, workdir=tmp_path, chunk=2)
    assert decoded == [["p2", "p3"], ["p4"]] and reused == 1
    assert [r.to_dict() | {"latency_s": 0} for r in again] == [r.to_dict() | {"latency_s": 0} for r in first]
    saved_wall = json.loads(chunk_path(tmp_path, "parallel", 0).read_text())["wall_s"]
    assert wall_again >= saved_wall  # the reused chunk's decoding time still counts for tokens/s

    # nothing left to do: no decoding at all, same records
    decoded.clear()
    third, _, reused = evaluate_resumable(model, tok, PROBLEMS, CFG, workdir=tmp_path, chunk=2)
    assert (
        decoded == [] and reused == 3 and [r.response_ids for r in third] == [r.response_ids for r in first]
    )


def test_a_saved_chunk_is_reused_only_for_the_same_problems_and_samples(model_tok, tmp_path) -> None:
    model, tok = model_tok
    evaluate_resumable(model, tok, PROBLEMS[:2], CFG, workdir=tmp_path, chunk=2)
    path = chunk_path(tmp_path, "parallel", 0)
    assert load_chunk(path, ["p0", "p1"], 2) is not None
    assert load_chunk(path, ["p0", "p9"], 2) is None  # another problem set
    assert load_chunk(path, ["p0", "p1"], 3) is None  # more samples asked for
    data = json.loads(path.read_text())
    data["records"] = data["records"][:-1]  # a record missing
    path.write_text(json.dumps(data))
    assert load_chunk(path, ["p0", "p1"], 2) is None
    assert not chunk_path(tmp_path, "sequential", 0).exists()  # modes are kept apart


def test_latency_measurement_is_saved_and_reused(model_tok, tmp_path, monkeypatch) -> None:
    model, tok = model_tok
    calls = []
    real = resume.measure_latency
    monkeypatch.setattr(resume, "measure_latency", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = latency_resumable(model, tok, PROBLEMS[:2], CFG, workdir=tmp_path)
    assert latency_resumable(model, tok, PROBLEMS[:2], CFG, workdir=tmp_path) == first and len(calls) == 1
    latency_resumable(model, tok, PROBLEMS[:3], CFG, workdir=tmp_path)  # another subset: measured again
    assert len(calls) == 2
