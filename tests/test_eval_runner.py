"""Evaluation runner: deterministic per-(problem, sample) seeds, every sample kept and graded."""

from __future__ import annotations

import pytest
from _support import byte_bpe_tokenizer

from npr_pipelines.data import Problem
from npr_pipelines.engine import EngineOutput, FinishReason, TokenCodec
from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.eval.runner import EvalConfig, SampleRecord, evaluate_problems, score_output, summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_are_deterministic_and_independent_of_chunking() -> None:
    tok = byte_bpe_tokenizer()
    model = tiny_qwen3(len(tok), seed=0)
    problems = [Problem(str(i), f"what is {i}+{i}?", str(2 * i), "t") for i in range(3)]
    cfg = EvalConfig(mode="parallel", n_samples=2, max_new_tokens=12, top_p=1.0)
    a, _ = evaluate_problems(model, tok, problems, cfg, chunk=1)
    b, _ = evaluate_problems(model, tok, problems, cfg, chunk=3)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [(r.problem_id, r.sample) for r in a] == [(p.id, s) for p in problems for s in range(2)]
    assert len({tuple(r.response_ids) for r in a}) > 1  # different seeds per sample
    assert all(not r.format_valid and r.violations for r in a)  # an untrained model produces no valid trace
    with pytest.raises(ValueError, match="tag tokens"):
        evaluate_problems(model, byte_bpe_tokenizer(with_tags=False), problems, cfg)


def test_score_output_grades_and_validates_text() -> None:
    tok = byte_bpe_tokenizer()
    codec = TokenCodec.from_tokenizer(tok)
    text = "<guideline><plan>1: add</plan></guideline><step>1: 2+2=4</step><takeaway>four it is</takeaway>\\boxed{4}"
    ids = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    out = EngineOutput(
        request_id="x", mode="parallel", prompt_ids=[1], response_ids=ids, positions=list(range(1, len(ids) + 1)),
        logprobs=[None] * len(ids), inserted=[False] * len(ids), finish_reason=FinishReason.EOS, finish_detail="",
        forks=[], segments=[], prefill_tokens=1, decode_tokens=len(ids), time_to_first_token_s=0.0, latency_s=0.1,
    )  # fmt: skip
    rec = score_output(Problem("p", "q", "4", "t"), 0, out, codec)
    assert rec.text == text and rec.correct and rec.format_valid and rec.extracted == "4"
    assert rec.format_score == 0.0 and rec.rounds == 1 and rec.plans_per_guideline == [1]
    assert not rec.triggered  # the engine did not fork: structure in text alone is not a trigger


def _rec(
    pid: str, correct: bool, valid: bool, triggered: bool, total: int = 10, critical: int = 5
) -> SampleRecord:
    return SampleRecord(pid, 0, [], "", None, correct, valid, [], 0.0 if valid else -1.0, triggered, 1, [2],
                        total, critical, "eos", 0.1)  # fmt: skip


def test_summarize() -> None:
    recs = [_rec("a", True, True, True), _rec("a", False, True, True, 12, 4), _rec("b", False, False, False)]
    m = summarize(recs, pass_ks=(1,))
    assert m["accuracy"] == pytest.approx(1 / 3) and m["format_valid_rate"] == pytest.approx(2 / 3)
    assert m["trigger_rate"] == pytest.approx(2 / 3)
    assert m["mean_critical_path_ratio"] == pytest.approx((2.0 + 3.0) / 2)
    assert m["pass_at_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["format_score_mean"] == pytest.approx(-1 / 3)
