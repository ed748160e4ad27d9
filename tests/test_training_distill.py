"""Rejection sampling and the SFT corpus: the first-accepted rule, every attempt on record, resume that
skips settled problems and changes nothing, de-duplication, held-out disjointness, and a token-level
re-check that catches planted bad traces. Traces are scripted through a logits hook on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _support import byte_bpe_tokenizer

from npr_pipelines.data import Problem
from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.structure import TagVocab, Trace, parse_tokens, render, validate
from npr_pipelines.training.distill import (
    ATTEMPTS_FILE,
    RejectionConfig,
    build_corpus,
    normalize_question,
    read_attempts,
    recheck_corpus,
    retokenize_trace,
    run_rejection_sampling,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def good(a: int, b: int) -> str:
    """A valid, V2-perfect trace answering a + b."""
    return render(
        Trace.build(
            [([f"take {a}", f"take {b}"], [f"a is {a}", f"b is {b}"], "add them")], f"\\boxed{{{a + b}}}"
        )
    )


# Valid for the strict validator but V2 deducts (a step shorter than 6 characters without whitespace).
V2_ONLY = render(Trace.build([(["add"], ["5"], "that is it")], "\\boxed{5}"))
INVALID = "<guideline><plan>1: add</plan></guideline><takeaway>done</takeaway>\\boxed{5}"  # no step
WRONG = good(1, 4).replace("\\boxed{5}", "\\boxed{7}")

PROBLEMS = [Problem("A", "what is 2+3?", "5", "t"), Problem("B", "what is 1+4?", "5", "t"),
            Problem("C", "what is 4+4?", "8", "t")]  # fmt: skip
# Per problem, the text each try produces (the last entry repeats).
SCRIPTS = {
    "A": [INVALID, good(2, 3).replace("5}", "6}"), good(2, 3), good(2, 3)],
    "B": [INVALID, V2_ONLY, WRONG],
    "C": [good(4, 4)],
}


class ForceText:
    """Logits hook: sample exactly ``ids`` then EOS."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos = ids, eos

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        n = stream.n_sampled
        out = torch.full_like(logits, float("-inf"))
        out[self.ids[n] if n < len(self.ids) else self.eos] = 0.0
        return out


@pytest.fixture(scope="module")
def policy():
    tok = byte_bpe_tokenizer(with_tags=False)  # NPR-Zero's tokenizer: tags are plain text
    return tiny_qwen3(len(tok), seed=0), tok


def scripted(tok, calls: list | None = None):
    def factory(pid: str, t: int):
        if calls is not None:
            calls.append((pid, t))
        texts = SCRIPTS[pid]
        return ForceText(
            tok.encode(texts[min(t, len(texts) - 1)], add_special_tokens=False), tok.eos_token_id
        )

    return factory


CFG = RejectionConfig(max_tries=3, max_new_tokens=200, batch_size=2, seed=7, num_blocks=512)


def test_first_accepted_trace_is_kept_and_every_attempt_recorded(policy, tmp_path) -> None:
    model, tok = policy
    res = run_rejection_sampling(model, tok, PROBLEMS, CFG, tmp_path, logits_hook=scripted(tok))
    attempts = read_attempts(tmp_path)
    tries = {(a["problem_id"], a["try"]) for a in attempts}
    # A: invalid, wrong, accepted (its 4th script entry is never sampled); B: exhausted; C: first try.
    assert tries == {("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1), ("B", 2), ("C", 0)}
    assert len(attempts) == 7
    assert [(r["problem_id"], r["tries"], r["text"]) for r in res.accepted] == [
        ("A", 3, good(2, 3)),
        ("C", 1, good(4, 4)),
    ]
    assert res.outcomes["B"]["status"] == "exhausted" and res.outcomes["A"]["accepted_try"] == 2
    by = {(a["problem_id"], a["try"]): a for a in attempts}
    assert by[("A", 2)]["verdict"] == "accepted" and by[("A", 2)]["reasons"] == []
    assert not by[("A", 0)]["format_valid"] and any("step_count" in r for r in by[("A", 0)]["reasons"])
    assert by[("A", 1)]["format_valid"] and not by[("A", 1)]["correct"]
    assert any(r.startswith("incorrect") for r in by[("A", 1)]["reasons"])
    v2 = by[("B", 1)]  # correct and strictly valid, rejected on the V2 score alone
    assert v2["correct"] and v2["format_valid"] and v2["format_score"] < 0
    assert v2["reasons"] == [f"format_score: V2 = {v2['format_score']:g}"]
    assert all({"seed", "format_score", "reasons", "text", "finish_reason"} <= a.keys() for a in attempts)
    s = res.summary
    assert (s["offered"], s["accepted"], s["exhausted"], s["attempts"]) == (3, 2, 1, 7)
    assert s["acceptance_rate"] == pytest.approx(2 / 3) and "first of" in s["rule"]


def test_resume_skips_settled_problems_and_gives_the_same_result(policy, tmp_path) -> None:
    model, tok = policy
    full = run_rejection_sampling(model, tok, PROBLEMS, CFG, tmp_path / "full", logits_hook=scripted(tok))

    class Crash(RuntimeError):
        pass

    def crash(progress):
        if progress["batch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run_rejection_sampling(
            model, tok, PROBLEMS, CFG, tmp_path / "r", logits_hook=scripted(tok), on_batch=crash
        )
    first = read_attempts(tmp_path / "r")
    assert len(first) == 2  # one batch (= 2 attempts with a pool of 2) was written
    with open(tmp_path / "r" / ATTEMPTS_FILE, "a") as f:
        f.write('{"problem_id": "A", "tr')  # a torn write from the crash
    calls: list = []
    res = run_rejection_sampling(model, tok, PROBLEMS, CFG, tmp_path / "r", logits_hook=scripted(tok, calls))
    assert ("A", 0) not in calls and ("B", 0) not in calls  # settled tries are not sampled again
    assert res.accepted == full.accepted and res.outcomes == full.outcomes
    strip = lambda rows: sorted((a["problem_id"], a["try"], a["text"], a["seed"]) for a in rows)  # noqa: E731
    assert strip(read_attempts(tmp_path / "r")) == strip(read_attempts(tmp_path / "full"))
    calls.clear()
    again = run_rejection_sampling(
        model, tok, PROBLEMS, CFG, tmp_path / "r", logits_hook=scripted(tok, calls)
    )
    assert calls == [] and again.accepted == full.accepted and again.summary["new_attempts"] == 0
    with pytest.raises(ValueError, match="different config"):
        run_rejection_sampling(model, tok, PROBLEMS, RejectionConfig(max_tries=4), tmp_path / "r")


def test_free_sampling_is_independent_of_the_pool_size(policy, tmp_path) -> None:
    model, tok = policy
    cfg = RejectionConfig(max_tries=2, max_new_tokens=12, batch_size=3, num_blocks=256)
    a = run_rejection_sampling(model, tok, PROBLEMS, cfg, tmp_path / "a")
    b = run_rejection_sampling(model, tok, PROBLEMS, replace(cfg, batch_size=1), tmp_path / "b")
    texts = lambda d: sorted((x["problem_id"], x["try"], x["text"]) for x in read_attempts(d))  # noqa: E731
    assert texts(tmp_path / "a") == texts(tmp_path / "b")
    assert len(texts(tmp_path / "a")) == 6 and a.summary["accepted"] == 0 == b.summary["accepted"]


def row(pid: str, question: str, a: int, b: int) -> dict:
    return {"problem_id": pid, "question": question, "answer": str(a + b), "text": good(a, b)}


def test_corpus_deduplicates_and_is_disjoint_from_held_out() -> None:
    accepted = [
        row("p1", "What is 2+3?", 2, 3),
        row("p1", "What is 2+3 again?", 2, 3),  # same id
        row("p2", "what  is 2 + 3 ?", 2, 3),  # same normalised question
        row("p3", "What is 4+4?", 4, 4),  # held out by question
        row("p4", "What is 1+1?", 1, 1),  # held out by id
        row("p5", "What is 5+5?", 5, 5),
    ]
    held = [Problem("h1", "WHAT IS 4+4 ?", "8", "bench"), Problem("p4", "something else", "2", "bench")]
    rows, report = build_corpus(accepted, held)
    assert [r["problem_id"] for r in rows] == ["p1", "p5"] and rows[0]["question"] == "What is 2+3?"
    assert report["dropped"] == {"duplicate_id": 1, "duplicate_question": 1, "held_out_overlap": 2}
    assert report["rows"] == 2 and report["candidates"] == 6 and "held-out" in report["rule"]
    held_q = {normalize_question(h.question) for h in held}
    assert not any(normalize_question(r["question"]) in held_q for r in rows)
    rows2, _ = build_corpus(accepted, ["what is 5+5"])  # plain question strings work too
    assert "p5" not in [r["problem_id"] for r in rows2]


def test_retokenized_ids_are_the_engine_split_with_single_tag_tokens() -> None:
    tok = byte_bpe_tokenizer(with_tags=True)
    vocab = TagVocab.from_tokenizer(tok)
    text = good(12, 30)
    ids = retokenize_trace(text, tok)
    assert sum(i in vocab.by_id for i in ids) == 1 + 2 * 2 + 1 + 2 * 2 + 2  # every tag is one token
    assert tok.decode(ids, skip_special_tokens=False) == text
    table = parse_tokens(ids, vocab, lambda x: tok.decode(list(x), skip_special_tokens=False))
    assert validate(table).valid
    step = ids.index(vocab.ids[next(t for t in vocab.ids if t.value == "<step>")])
    assert ids[step + 1 : step + 1 + len(tok.encode("1:"))] == tok.encode("1:")  # the header, split off
    with pytest.raises(ValueError, match="not valid"):
        retokenize_trace(INVALID, tok)


def test_recheck_passes_a_clean_corpus_and_catches_planted_bad_traces() -> None:
    tok = byte_bpe_tokenizer(with_tags=True)
    clean = [row(f"p{i}", f"What is {i}+{i + 1}?", i, i + 1) for i in range(1, 5)]
    assert recheck_corpus(clean, tok) == []
    bad = [
        {**clean[0], "answer": "99"},  # wrong answer
        {**clean[1], "text": INVALID},  # no step
        {**clean[2], "text": V2_ONLY, "answer": "5"},  # V2 score -0.4
        {**clean[3], "text": clean[3]["text"].replace("<step>2:", "<step>3:")},  # numbering
    ]
    corpus = [*clean, *bad]
    fails = recheck_corpus(corpus, tok)
    assert [f["index"] for f in fails] == [4, 5, 6, 7]
    assert any("incorrect" in r for r in fails[0]["reasons"])
    assert any("step_count" in r for r in fails[1]["reasons"])
    assert any("format_score" in r for r in fails[2]["reasons"])
    assert any("numbering" in r for r in fails[3]["reasons"])
    assert recheck_corpus(clean, tok, max_length=10)[0]["reasons"][0].startswith("too long")
    with pytest.raises(ValueError, match="single tokens"):
        recheck_corpus(clean, byte_bpe_tokenizer(with_tags=False))
    json.dumps(fails)  # failures are JSON-able (they go into reports)


def test_rejection_config_takes_profile_values_and_keys_only_result_fields() -> None:
    from npr_pipelines.toy.profiles import get_profile

    cfg = RejectionConfig().with_stage_values(get_profile("default").rejection_sampling)
    assert (cfg.max_tries, cfg.max_new_tokens, cfg.batch_size) == (8, 320, 256)
    assert RejectionConfig().max_new_tokens == 32_768 and RejectionConfig().max_tries == 8  # the paper's
    assert "batch_size" not in cfg.result_key() and "seed" in cfg.result_key()
