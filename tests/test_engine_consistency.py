"""Train/inference consistency: the engine's captured log-probs equal ONE trainer-style forward of the
HF model over the flattened trace with ``parallel_layout(...).additive_mask()`` and its positions."""

from __future__ import annotations

import json
import random

import pytest
import torch

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.testing import EOS_ID, CharCodec, ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.structure import Trace, encode_trace, parallel_layout, parse_tokens, validate

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cc() -> CharCodec:
    return CharCodec()


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 4))) for _ in range(n))


def random_trace(rng: random.Random, rounds: int, plans: list[int] | None = None) -> Trace:
    blocks = []
    for r in range(rounds):
        k = plans[r] if plans else rng.randint(1, 5)
        steps = [_words(rng, rng.randint(1, 6)) for _ in range(k)]  # uneven branch lengths
        blocks.append(([_words(rng, rng.randint(1, 3)) for _ in range(k)], steps, _words(rng, 2)))
    return Trace.build(blocks, f"so \\boxed{{{rng.randint(0, 99)}}}")


def teacher_forced_logprobs(model, prompt, out, cc: CharCodec, temperature: float) -> list[tuple[int, float]]:
    """(response index, log-prob) for every sampled token, from one forward over the flattened trace."""
    full = list(prompt) + out.response_ids
    table = parse_tokens(out.response_ids, cc.tags, cc.decode, offset=len(prompt))
    layout = parallel_layout(table)
    assert layout.position_ids == list(range(len(prompt))) + out.positions
    with torch.no_grad():
        logits = (
            model(
                torch.tensor([full]),
                attention_mask=layout.additive_mask(model.dtype),
                position_ids=torch.tensor([layout.position_ids]),
            )
            .logits[0]
            .float()
        )
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    p = len(prompt)
    return [
        (i, logp[p + i - 1, full[p + i]].item()) for i in range(len(out.response_ids)) if not out.inserted[i]
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_teacher_forced_logprobs_match_engine(cc: CharCodec, attn: str) -> None:
    model = tiny_qwen3(cc.vocab_size, attn=attn, seed=1)
    engine = Engine(
        model, cc.codec(), cc.tags, EngineConfig(num_blocks=512, block_size=4, check_invariants=True)
    )
    rng = random.Random(7)
    traces = [
        random_trace(rng, 1, [1]),
        random_trace(rng, 3, [2, 5, 3]),
        random_trace(rng, 2, [4, 1]),
        random_trace(rng, 1, [5]),
    ]
    temps = [1.0, 0.7, 0.0, 1.3]
    requests = []
    for i, (trace, temp) in enumerate(zip(traces, temps, strict=True)):
        prompt = cc.encode(f"q{i}: {_words(rng, 3 if i % 2 else 25)}?\n")  # some > small_query_max
        params = SamplingParams(temperature=temp, top_p=0.9, top_k=20, seed=i, max_tokens=2000)
        requests.append(
            Request(f"r{i}", prompt, params, logits_hook=ScriptHook(trace_script(trace, cc.tags, cc.encode)))
        )
    assert max(len(r.prompt_ids) for r in requests) > engine.config.small_query_max  # both attention paths
    outputs = engine.generate(requests)

    worst = 0.0
    for req, trace, temp, out in zip(requests, traces, temps, outputs, strict=True):
        assert out.finish_reason is FinishReason.EOS, out.finish_detail
        assert out.response_ids == [*encode_trace(trace, cc.tags, cc.encode), EOS_ID]
        assert validate(out.span_table).valid
        assert out.structure_errors(cc.tags, cc.decode) == []
        assert out.triggered and len(out.forks) == len(trace.blocks)
        assert all(b.finish_reason is FinishReason.STEP_END for b in out.branches)
        # no branch recomputed at a join: only the prompt and the inserted tokens are prefilled
        assert out.prefill_tokens == len(req.prompt_ids) + sum(out.inserted)
        assert out.decode_tokens == sum(not x for x in out.inserted) - 1  # the final EOS is never fed
        for i, lp in teacher_forced_logprobs(model, req.prompt_ids, out, cc, temp):
            assert out.logprobs[i] is not None
            worst = max(worst, abs(out.logprobs[i] - lp))
        json.dumps(out.to_dict())
    assert worst < TOL, worst
    print(f"max |engine - teacher-forced| log-prob diff ({attn}): {worst:.2e}")
    engine.check()


def test_free_sampling_consistency_and_counters(cc: CharCodec) -> None:
    """Unscripted branches (the model samples freely inside scripted structure) stay consistent."""
    model = tiny_qwen3(cc.vocab_size, seed=3)
    engine = Engine(
        model, cc.codec(), cc.tags, EngineConfig(num_blocks=256, block_size=8, check_invariants=True)
    )
    trace = Trace.build([(["a", "b", "c"], ["-", "-", "-"], "t")], "\\boxed{1}")
    script = trace_script(trace, cc.tags, cc.encode)
    for k in range(3):
        del script[(0, k)]  # branches sample freely until the cap

    params = SamplingParams(temperature=1.0, seed=5, max_tokens=500, max_branch_tokens=12)
    prompt = cc.encode("free\n")
    [out] = engine.generate([Request("f", prompt, params, logits_hook=ScriptHook(script))])
    assert out.triggered
    assert out.finish_reason in (
        FinishReason.EOS,
        FinishReason.BRANCH_CAP,
        FinishReason.EOS_IN_BRANCH,
        FinishReason.NESTED_GUIDELINE,
    )
    assert out.prefill_tokens == len(prompt) + sum(out.inserted)
    # Every sampled token's log-prob matches a forward in which each branch sees the prefix and itself.
    full = prompt + out.response_ids
    positions = list(range(len(prompt))) + out.positions
    seg_of = []
    for seg in out.segments:
        seg_of += [(seg.block, seg.branch)] * (seg.end - seg.start)
    n = len(full)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    for q in range(n):
        for k in range(q):
            if seg_of[q][0] is not None and seg_of[k][0] == seg_of[q][0] and seg_of[k][1] != seg_of[q][1]:
                allowed[q, k] = False
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logits = model(
            torch.tensor([full]), attention_mask=mask, position_ids=torch.tensor([positions])
        ).logits[0]
    logp = torch.log_softmax(logits, -1)
    p = len(prompt)
    diffs = [
        abs(logp[p + i - 1, full[p + i]].item() - out.logprobs[i])
        for i in range(len(out.response_ids))
        if not out.inserted[i]
    ]
    assert max(diffs) < TOL


def test_sequential_mode_matches_plain_causal_forward(cc: CharCodec) -> None:
    """Sequential mode: one stream, no insertions; tags are multi-token text (no TagVocab needed)."""
    model = tiny_qwen3(cc.vocab_size, seed=2)
    engine = Engine(model, cc.codec(), tags=None, config=EngineConfig(num_blocks=128, block_size=4))
    text = "<guideline>\n<plan>1: a</plan>\n</guideline><step>1: b</step><takeaway>c</takeaway>\n\\boxed{2}"
    script = {(0,): [*cc.encode(text), EOS_ID]}
    prompt = cc.encode("seq\n")
    params = SamplingParams(mode="sequential", temperature=0.9, seed=0, max_tokens=500)
    [out] = engine.generate([Request("s", prompt, params, logits_hook=ScriptHook(script))])
    assert out.finish_reason is FinishReason.EOS
    assert cc.decode(out.response_ids[:-1]) == text
    assert not out.triggered and not any(out.inserted) and out.span_table is None
    assert out.positions == list(range(len(prompt), len(prompt) + len(out.response_ids)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.response_ids])).logits[0]
    logp = torch.log_softmax(logits / 0.9, -1)
    full = prompt + out.response_ids
    p = len(prompt)
    worst = max(abs(logp[p + i - 1, full[p + i]].item() - lp) for i, lp in enumerate(out.logprobs))
    assert worst < TOL
    assert out.prefill_tokens == len(prompt)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_within_rounding_noise(cc: CharCodec, dtype: torch.dtype, tol: float) -> None:
    model = tiny_qwen3(cc.vocab_size, seed=1).to(dtype)
    engine = Engine(
        model, cc.codec(), cc.tags, EngineConfig(num_blocks=256, block_size=4, check_invariants=True)
    )
    trace = random_trace(random.Random(3), 2, [3, 2])
    prompt = cc.encode("half?\n")
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=500)
    [out] = engine.generate(
        [Request("h", prompt, params, logits_hook=ScriptHook(trace_script(trace, cc.tags, cc.encode)))]
    )
    assert out.finish_reason is FinishReason.EOS
    worst = max(abs(out.logprobs[i] - lp) for i, lp in teacher_forced_logprobs(model, prompt, out, cc, 1.0))
    assert worst < tol, worst


def test_real_bpe_tokenizer_end_to_end() -> None:
    """A byte-level BPE tokenizer with the tags added: ids equal ``encode_trace`` (headers are encoded
    on their own, exactly where the engine inserts them) and log-probs match the trainer forward."""
    from _support import byte_bpe_tokenizer

    from npr_pipelines.engine import TokenCodec
    from npr_pipelines.structure import TagVocab

    tok = byte_bpe_tokenizer()
    tags = TagVocab.from_tokenizer(tok)
    codec = TokenCodec.from_tokenizer(tok)
    encode = codec.encode
    model = tiny_qwen3(len(tok), seed=6)
    engine = Engine(model, codec, tags, EngineConfig(num_blocks=128, block_size=16, check_invariants=True))
    trace = Trace.build(
        [(["compute a*b", "compute c*d"], ["a*b=12", "c*d=30"], "sum"), (["add"], ["12+30=42"], "done")],
        "the answer \\boxed{42}",
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "sum of products?"}], add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"])
    script = trace_script(trace, tags, encode, end=[tok.eos_token_id])
    params = SamplingParams(temperature=0.8, seed=2, max_tokens=500)
    [out] = engine.generate([Request("bpe", prompt, params, logits_hook=ScriptHook(script))])
    assert out.finish_reason is FinishReason.EOS
    assert out.response_ids == [*encode_trace(trace, tags, encode), tok.eos_token_id]
    assert out.structure_errors(tags, codec.decode) == []
    assert validate(out.span_table).valid
    full = prompt + out.response_ids
    layout = parallel_layout(out.span_table)
    with torch.no_grad():
        logits = model(
            torch.tensor([full]),
            attention_mask=layout.additive_mask(),
            position_ids=torch.tensor([layout.position_ids]),
        ).logits[0]
    logp = torch.log_softmax(logits / 0.8, -1)
    p = len(prompt)
    worst = max(
        abs(logp[p + i - 1, full[p + i]].item() - out.logprobs[i])
        for i in range(len(out.response_ids))
        if not out.inserted[i]
    )
    assert worst < TOL
