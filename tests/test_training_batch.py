"""Training batches: the trainer's log-probs (npr_segments attention, batched with padding) reproduce
the engine's sampling-time log-probs; SFT targets skip unpredictable header labels."""

from __future__ import annotations

import random

import pytest
import torch

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.testing import CharCodec, ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.structure import Trace, encode_trace
from npr_pipelines.training.batch import (
    collate,
    rl_sequence,
    sft_loss,
    sft_sequence,
    token_logprobs,
    use_segment_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _trace(rng: random.Random, plans: list[int]) -> Trace:
    word = lambda: "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 9)))  # noqa: E731
    return Trace.build(
        [([word() for _ in range(k)], [word() for _ in range(k)], word()) for k in plans], "\\boxed{4}"
    )


def test_rl_batch_logprobs_match_engine_sampling_logprobs() -> None:
    cc = CharCodec()
    model = tiny_qwen3(cc.vocab_size, seed=2)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=512, block_size=4))
    rng = random.Random(3)
    plans = [[2], [3, 1], [5], [1, 4, 2]]
    requests = [
        Request(
            f"r{i}",
            cc.encode(f"question {i}?\n"),
            SamplingParams(temperature=1.0, seed=i, max_tokens=1000),
            logits_hook=ScriptHook(trace_script(_trace(rng, p), cc.tags, cc.encode)),
        )
        for i, p in enumerate(plans)
    ]
    outputs = engine.generate(requests)
    seqs = []
    for out in outputs:
        assert out.finish_reason is FinishReason.EOS
        lps = [0.0 if lp is None else lp for lp in out.logprobs]
        seqs.append(
            rl_sequence(out.prompt_ids, out.response_ids, out.layout(), out.inserted, lps, advantage=1.0)
        )
    batch = collate(seqs, pad_id=0)
    use_segment_attention(model)
    with torch.no_grad():
        logp = token_logprobs(model, batch)
    mask = batch.loss_mask.bool()
    assert mask.sum() == sum(sum(not x for x in o.inserted) for o in outputs)
    diff = (logp - batch.old_logprobs).abs()[mask]
    assert diff.max() < 1e-4, diff.max()
    # Inserted tokens are not targets.
    for i, out in enumerate(outputs):
        p = out.prompt_len
        for j, ins in enumerate(out.inserted):
            assert bool(mask[i, p + j]) == (not ins)


def test_sft_sequences_and_loss() -> None:
    cc = CharCodec()
    trace = Trace.build([(["x", "y"], ["aa", "b"], "t")], "\\boxed{1}")
    response = encode_trace(trace, cc.tags, cc.encode)
    prompt = cc.encode("q?\n")
    par = sft_sequence(prompt, response, layout="parallel", vocab=cc.tags, decode=cc.decode, encode=cc.encode)
    seq = sft_sequence(prompt, response, layout="sequential")
    # The header labels "1:" / "2:" after each <step> are not targets in the parallel layout only.
    untrained = [i for i, t in enumerate(par.trainable) if not t and i >= len(prompt)]
    assert [cc.decode([par.ids[i]]) for i in untrained] == ["1", ":", "2", ":"]
    assert all(seq.trainable[len(prompt) :])
    assert par.layout.position_ids != seq.layout.position_ids
    model = tiny_qwen3(cc.vocab_size, seed=0)
    use_segment_attention(model)
    batch = collate([par, seq], pad_id=0)
    loss = sft_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None
    with pytest.raises(ValueError, match="layout"):
        sft_sequence(prompt, response, layout="diagonal")
