"""The fast paths keep the engine's results: every attention layout (pure decode, a request's branches
together, gathered mixed batches, wide lanes), packed weights and their refresh after in-place
updates, batch-independence, replay of recorded traces in both modes, the bookkeeping that keeps the
step loop O(live streams), KV sharing figures, and the benchmark's own smoke run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.testing import (
    EOS_ID,
    CharCodec,
    ScriptHook,
    replay_script,
    tiny_qwen3,
    trace_script,
)
from npr_pipelines.structure import Trace, encode_trace

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cc() -> CharCodec:
    return CharCodec()


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 4))) for _ in range(n))


def _requests(cc: CharCodec, n: int, seed: int = 0) -> list[Request]:
    """Scripted parallel traces of varied shape, and free-sampling requests in both modes."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        if i % 3 == 2:
            mode = "sequential" if i % 2 else "parallel"
            params = SamplingParams(mode=mode, temperature=1.0, top_k=30, seed=i, max_tokens=30)
            reqs.append(Request(f"free{i}", cc.encode(f"free {i}: {_words(rng, 2)}\n"), params))
            continue
        blocks = []
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(1, 5)
            steps = [_words(rng, rng.randint(1, 8)) for _ in range(k)]
            blocks.append(([_words(rng, 1) for _ in range(k)], steps, _words(rng, 1)))
        trace = Trace.build(blocks, "\\boxed{1}")
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=1000)
        prompt = cc.encode(f"q{i}: {_words(rng, rng.choice([1, 12]))}\n")
        reqs.append(
            Request(f"r{i}", prompt, params, logits_hook=ScriptHook(trace_script(trace, cc.tags, cc.encode)))
        )
    return reqs


def _same(a, b) -> None:
    assert a.response_ids == b.response_ids, a.request_id
    assert a.finish_reason is b.finish_reason and a.positions == b.positions and a.inserted == b.inserted
    diff = max(
        (abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True) if x is not None), default=0.0
    )
    assert diff < TOL, (a.request_id, diff)


def test_every_attention_layout_gives_the_same_outputs(cc: CharCodec) -> None:
    model = tiny_qwen3(cc.vocab_size, seed=5)
    reqs = _requests(cc, 9)

    def run(config: EngineConfig, together: bool):
        engine = Engine(model, cc.codec(), cc.tags, config)
        outs = engine.generate(reqs) if together else [engine.generate([r])[0] for r in reqs]
        engine.check()
        assert engine.pool.num_free == engine.pool.num_blocks and engine.model.view_lanes == 0
        return outs

    base = EngineConfig(num_blocks=1024, block_size=4, check_invariants=True)
    alone = run(base, together=False)  # pure decode and one request's branches ("uniform")
    assert sum(o.triggered for o in alone) >= 5
    variants = {
        "batched (mixed phases: gathered queries)": (base, True),
        "every lane wide (one attention call per request)": (
            EngineConfig(num_blocks=1024, block_size=4, small_query_max=0),
            True,
        ),
        "unpacked weights": (EngineConfig(num_blocks=1024, block_size=4, pack_weights=False), True),
        "one request at a time, unpacked": (
            EngineConfig(num_blocks=1024, block_size=4, pack_weights=False),
            False,
        ),
        "block size 1": (EngineConfig(num_blocks=8192, block_size=1), True),
    }
    for name, (config, together) in variants.items():
        for a, b in zip(alone, run(config, together), strict=True):
            try:
                _same(a, b)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from exc


def test_packed_weights_follow_in_place_updates_and_replacement(cc: CharCodec) -> None:
    """A trainer sharing the module updates weights in place (optimizer step, load_state_dict) or swaps
    a parameter: the next step must use the new weights."""
    model = tiny_qwen3(cc.vocab_size, seed=7)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=256, block_size=4))
    assert engine.model.fuse
    req = _requests(cc, 1, seed=3)[0]
    before = engine.generate([req])[0]

    def fresh():
        return Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=256, block_size=4)).generate([req])[
            0
        ]

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # in place: versions change
    after = engine.generate([req])[0]
    _same(after, fresh())
    assert (
        max(abs(x - y) for x, y in zip(before.logprobs, after.logprobs, strict=True) if x is not None) > 1e-3
    )
    layer = model.model.layers[0]
    layer.mlp.up_proj.weight = torch.nn.Parameter(layer.mlp.up_proj.weight.detach() * 0.5)  # replaced
    layer.self_attn.k_norm.weight = torch.nn.Parameter(layer.self_attn.k_norm.weight.detach() + 0.5)
    _same(engine.generate([req])[0], fresh())


def test_outputs_do_not_depend_on_batch_mates(cc: CharCodec) -> None:
    model = tiny_qwen3(cc.vocab_size, seed=9)
    reqs = _requests(cc, 6, seed=1)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=1024, block_size=8))
    together = {o.request_id: o for o in engine.generate(reqs)}
    staggered = {}
    for r in reqs:  # each request joins while the others are in other phases
        engine.add_request(r)
        for out in engine.step():
            staggered[out.request_id] = out
    while engine.has_unfinished():
        for out in engine.step():
            staggered[out.request_id] = out
    for r in reqs:
        _same(together[r.request_id], staggered[r.request_id])


def test_replay_reproduces_recorded_traces_in_both_modes(cc: CharCodec) -> None:
    model = tiny_qwen3(cc.vocab_size, seed=2)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=1024, block_size=4))
    recorded = [o for o in engine.generate(_requests(cc, 6, seed=4)) if o.triggered]
    assert recorded
    for out in recorded:
        for mode in ("parallel", "sequential"):
            params = SamplingParams(mode=mode, temperature=0.0, max_tokens=2000)
            hook = ScriptHook(replay_script(out, mode))
            [again] = engine.generate([Request(out.request_id, out.prompt_ids, params, logits_hook=hook)])
            assert again.response_ids == out.response_ids
            if mode == "parallel":
                assert again.positions == out.positions and again.inserted == out.inserted
                assert again.critical_path_tokens == out.critical_path_tokens
            else:
                assert not any(again.inserted) and again.critical_path_tokens == again.total_tokens


def test_step_bookkeeping_holds_only_streams_still_needed(cc: CharCodec) -> None:
    """The step loop walks ``active`` streams only: finished branches leave it at their join, earlier
    trunk segments once fed, so per-step work stays O(live streams) however long the request runs."""
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=32, seed=1)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=1024, block_size=4))
    blocks = [(["a", "b", "c", "d"], ["w" * (2 + k) for k in range(4)], "t") for _ in range(6)]
    trace = Trace.build(blocks, "\\boxed{1}")
    engine.add_request(
        Request(
            "long",
            cc.encode("q\n"),
            SamplingParams(seed=0, max_tokens=5000),
            ScriptHook(trace_script(trace, cc.tags, cc.encode)),
        )
    )
    worst = 0
    outs = []
    while engine.has_unfinished():
        for a in engine._running:
            waiting = sum(a.flow.awaiting_join(s) for s in a.flow.streams)
            live = sum(s.live for s in a.flow.streams)
            assert len(a.active) <= live + waiting + 1  # +1: a segment whose last token is still unfed
            worst = max(worst, len(a.active))
        outs += engine.step()
    [out] = outs
    assert out.finish_reason is FinishReason.EOS and len(out.forks) == 6
    assert len(out.branches) == 24 and worst <= 5
    assert out.response_ids == [*encode_trace(trace, cc.tags, cc.encode), EOS_ID]


def test_prefix_sharing_figures(cc: CharCodec) -> None:
    """Forked branches share the prefix blocks: the pool holds far less than private copies would."""
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=32, seed=1)
    engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=1024, block_size=4))
    trace = Trace.build([(["a"] * 5, ["x" * 10] * 5, "t")], "\\boxed{1}")
    prompt = cc.encode("a long shared prompt " * 8)
    [out] = engine.generate(
        [Request("s", prompt, SamplingParams(seed=0), ScriptHook(trace_script(trace, cc.tags, cc.encode)))]
    )
    st = engine.stats
    assert out.triggered
    assert st.peak_kv_tokens_held < 0.4 * st.peak_kv_tokens_unshared
    # the views hold every token once: never more than the flattened request
    assert st.peak_view_tokens <= len(prompt) + out.total_tokens


def test_bench_smoke(tmp_path) -> None:
    """``python -m npr_pipelines.bench`` end to end on the random-init toy-shaped model (tiny settings)."""
    from npr_pipelines import bench

    out = tmp_path / "engine.json"
    assert (
        bench.main(
            ["--model", "random", "--traces", "2", "--reps", "1", "--new-tokens", "8", "--out", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in (
        "critical_path_ratio",
        "parallel_speedup",
        "efficiency",
        "vs_hf_generate",
        "vs_hf_generate_b1",
        "kv_blocks_peak_ratio",
        "teacher_forced_max_abs_logprob_diff",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["critical_path_ratio"] > 1 and result["kv_blocks_peak_ratio"] < 1
    assert result["teacher_forced_max_abs_logprob_diff"] < 1e-4
    assert result["machine"]["torch_threads"] >= 1 and result["model"]["source"] == "random"
    assert result["hf_generate"]["batch16"]["greedy_sequences_identical"] == "16/16"
