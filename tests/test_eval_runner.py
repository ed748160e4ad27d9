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


def test_trigger_rate_counts_engine_forks_not_structure_in_the_text() -> None:
    """The trigger rate ignores structure the engine inserted and structure that is only text: the same
    trace is a trigger when the engine forked on the model's ``</guideline>`` (step headers and
    ``<takeaway>`` inserted by the engine), and not one when the model wrote every token itself."""
    from npr_pipelines.engine import Engine, EngineConfig, Request, SamplingParams
    from npr_pipelines.engine.testing import CharCodec, ScriptHook, replay_script, trace_script
    from npr_pipelines.structure import Trace

    cc = CharCodec()
    engine = Engine(tiny_qwen3(cc.vocab_size, layers=1, hidden=32), cc.codec(), cc.tags,
                    EngineConfig(num_blocks=256, block_size=4))  # fmt: skip
    trace = Trace.build([(["add", "mul"], ["2+2=4", "2*2=4"], "both 4")], "\\boxed{4}")
    prompt = cc.encode("q\n")

    def run(mode: str, script: dict) -> EngineOutput:
        params = SamplingParams(mode=mode, seed=0, max_tokens=300)
        [out] = engine.generate([Request(mode, prompt, params, logits_hook=ScriptHook(script))])
        return out

    forked = run("parallel", trace_script(trace, cc.tags, cc.encode))
    written = run("sequential", replay_script(forked, "sequential"))  # the model samples the inserted tokens
    no_guideline = "<step>1: add</step><takeaway>t</takeaway>\\boxed{4}"  # structure without a fork
    plain = run("parallel", {(0,): cc.encode_with_tags(no_guideline)})
    assert written.response_ids == forked.response_ids and not any(written.inserted)
    inserted = cc.decode([t for t, ins in zip(forked.response_ids, forked.inserted, strict=True) if ins])
    assert inserted.count("<step>") == 2 and "<takeaway>" in inserted  # the engine wrote these
    problem = Problem("p", "q", "4", "t")
    recs = [score_output(problem, i, o, cc.codec()) for i, o in enumerate((forked, written, plain))]
    assert recs[0].text == recs[1].text and "<takeaway>" in recs[2].text
    assert recs[0].format_valid and recs[1].format_valid and recs[0].rounds == recs[1].rounds == 1
    assert [r.triggered for r in recs] == [True, False, False]
    assert summarize(recs)["trigger_rate"] == pytest.approx(1 / 3)


def test_summarize_with_repeated_samples_adds_pass_at_n_and_inter_run_std() -> None:
    # two runs (sample 0, sample 1) over three problems: run 0 gets a and b right, run 1 only a
    recs = [
        SampleRecord(pid, s, [], "", None, ok, True, [], 0.0, False, 0, [], 10, 10, "eos", 0.1)
        for pid, s, ok in [("a", 0, True), ("a", 1, True), ("b", 0, True), ("b", 1, False),
                           ("c", 0, False), ("c", 1, False)]
    ]  # fmt: skip
    m = summarize(recs)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["pass_at_1"] == pytest.approx(0.5)
    assert m["pass_at_2"] == pytest.approx(2 / 3)  # a and b solved at least once
    assert m["inter_run_std"] == pytest.approx(abs(2 / 3 - 1 / 3) / 2)  # population std of [2/3, 1/3]
    assert m["intra_problem_std"] == pytest.approx((0 + 0.5 + 0) / 3)
    single = summarize([r for r in recs if r.sample == 0])
    assert "inter_run_std" not in single and "pass_at_2" not in single
    assert single["pass_at_1"] == pytest.approx(2 / 3)
    ragged = summarize(recs[:-1])  # c has one sample: no common set of runs
    assert "inter_run_std" not in ragged


def test_latency_is_one_request_at_a_time_with_the_evaluation_seeds() -> None:
    from npr_pipelines.eval.runner import build_engine, measure_latency, mode_summary, sample_seed

    tok = byte_bpe_tokenizer()
    model = tiny_qwen3(len(tok), seed=0)
    problems = [Problem(str(i), f"what is {i}+{i}?", str(2 * i), "t") for i in range(3)]
    cfg = EvalConfig(mode="parallel", n_samples=1, max_new_tokens=8, top_p=1.0, seed=5)
    engine = build_engine(model, tok, cfg)
    calls: list[list] = []
    generate = engine.generate
    engine.generate = lambda requests: calls.append(list(requests)) or generate(requests)
    latencies = measure_latency(model, tok, problems, cfg, engine=engine)
    assert len(latencies) == 3 and all(t > 0 for t in latencies)
    assert [len(c) for c in calls] == [1, 1, 1]  # concurrency 1
    assert [c[0].params.seed for c in calls] == [sample_seed(5, p.id, 0) for p in problems]
    records, wall = evaluate_problems(model, tok, problems, cfg)
    summary = mode_summary(records, wall, latencies)
    assert summary["latency_median_s"] == sorted(latencies)[1]
    assert summary["tokens_per_s"] == pytest.approx(sum(r.total_tokens for r in records) / wall)
    assert summary["accuracy"] == summarize(records)["accuracy"] and summary["latencies_s"] == latencies


def test_the_toy_protocol_becomes_runner_settings_in_one_place() -> None:
    from npr_pipelines.toy.profiles import get_profile

    ev = get_profile("default").eval
    cfg = ev.runner_config(mode="parallel")
    assert isinstance(cfg, EvalConfig) and cfg.mode == "parallel"
    protocol = (ev.n_samples, ev.temperature, ev.top_p, ev.max_new_tokens, ev.seed)
    assert (cfg.n_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed) == protocol
    # The runner's own default (top-p 0.7) is not what a toy profile without top_p asks for (1.0).
    small = get_profile("small").eval
    assert small.runner_config().top_p == small.top_p == 1.0
    assert ev.runner_config(n_samples=4, seed=7).n_samples == 4 and ev.sampling(seed=7)["seed"] == 7
