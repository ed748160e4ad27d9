"""The parallel layout: hand-computed positions and visibility, properties over generated traces,
and equivalence with independent forwards of a real Qwen3 model."""

from __future__ import annotations

import pytest
import torch
from _support import CharCodec
from hypothesis import given, settings
from hypothesis import strategies as st

from npr_pipelines.structure import (
    DENSE_MASK_MAX_TOKENS,
    LayoutError,
    Tag,
    Trace,
    encode_trace,
    parallel_layout,
    parse_tokens,
    sequential_layout,
    trace_metrics,
)

codec = CharCodec()


def layout_of(prompt: str, response: str):
    ids = codec.encode(prompt) + codec.encode_with_tags(response)
    table = parse_tokens(ids[len(prompt) :], codec.vocab, codec.decode, offset=len(prompt))
    return ids, table, parallel_layout(table, len(ids))


def test_hand_computed_two_rounds() -> None:
    # prompt "ab" = positions 0,1.
    response = (
        "<guideline><plan>1:x</plan><plan>2:y</plan></guideline>"  # idx 2..13, pos 2..13
        "<step>1:aaa</step>"  # idx 14..20, pos 14..20 (7 tokens)
        "<step>2:b</step>"  # idx 21..25, pos 14..18 (5 tokens)
        "<takeaway>t</takeaway>\n"  # idx 26..29, pos 21..24 (one past the longest sibling)
        "<guideline><plan>1:p</plan><plan>2:q</plan><plan>3:r</plan></guideline>"  # idx 30..46, pos 25..41
        "<step>1:c</step>"  # idx 47..51, pos 42..46
        "<step>2:dddd</step>"  # idx 52..59, pos 42..49
        "<step>3:ee</step>"  # idx 60..65, pos 42..47
        "<takeaway>u</takeaway>ans"  # idx 66..71, pos 50..55
    )
    ids, table, layout = layout_of("ab", response)
    assert len(ids) == 72
    expected = (
        list(range(0, 14))
        + list(range(14, 21))
        + list(range(14, 19))
        + list(range(21, 25))
        + list(range(25, 42))
        + list(range(42, 47))
        + list(range(42, 50))
        + list(range(42, 48))
        + list(range(50, 56))
    )
    assert layout.position_ids == expected

    vis = layout.visibility()
    step1, step2 = range(14, 21), range(21, 26)
    # Siblings never see each other, in either direction, tags included.
    assert not vis[21:26, 14:21].any() and not vis[14:21, 21:26].any()
    # A step sees the whole prefix and itself causally.
    assert vis[25, :14].all() and vis[25, 21:26].all()
    # The takeaway and everything after see every earlier token.
    for q in (26, 29, 47, 71):
        assert vis[q, : q + 1].all()
    # Steps of round 2 see round 1's steps but not their own siblings.
    assert vis[55, list(step1) + list(step2)].all()
    assert not vis[55, 47:52].any() and not vis[55, 60:66].any() and not vis[62, 52:60].any()
    # Causality holds everywhere.
    assert not vis.triu(1).any()

    metrics = trace_metrics(table, layout, prompt_len=2)
    assert metrics.rounds == 2 and metrics.plans_per_guideline == (2, 3)
    assert metrics.total_tokens == 70
    assert metrics.critical_path_tokens == 56 - 2


def test_separator_between_siblings_belongs_to_the_previous_step() -> None:
    _, _, layout = layout_of(
        "", "<guideline><plan>1:x</plan></guideline><step>1:a</step>\n<takeaway>t</takeaway>"
    )
    _, _, layout2 = layout_of(
        "",
        "<guideline><plan>1:x</plan><plan>2:y</plan></guideline><step>1:a</step>\n<step>2:b</step><takeaway>t</takeaway>",
    )
    vis = layout2.visibility()
    newline = 17  # the "\n" after the first </step>
    second_step = range(18, 23)
    assert not vis[list(second_step)][:, newline].any()
    assert layout2.position_ids[newline] == layout2.position_ids[newline - 1] + 1
    assert layout.segments[1].end - layout.segments[1].start == 6


@st.composite
def uneven_traces(draw) -> Trace:
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(1, 5))
        steps = [("s" * draw(st.integers(1, 25))) for _ in range(k)]
        blocks.append(([f"plan{i}" for i in range(k)], steps, "take" * draw(st.integers(1, 3))))
    return Trace.build(blocks, "\\boxed{7}")


@settings(max_examples=100, deadline=None)
@given(trace=uneven_traces(), prompt_len=st.integers(0, 6))
def test_layout_rule_holds_for_1_to_5_plans(trace: Trace, prompt_len: int) -> None:
    ids = [ord("p")] * prompt_len + encode_trace(trace, codec.vocab, codec.encode)
    table = parse_tokens(ids[prompt_len:], codec.vocab, codec.decode, offset=prompt_len)
    layout = parallel_layout(table, len(ids))
    pos, vis = layout.position_ids, layout.visibility()
    assert len(pos) == len(ids)
    for block in table.blocks:
        close = block.guideline.end - 1
        assert ids[close] == codec.vocab[Tag.GUIDELINE_END]
        starts = {pos[s.span.start] for s in block.steps}
        assert starts == {pos[close] + 1}
        assert pos[block.takeaway.span.start] == max(pos[s.span.end - 1] for s in block.steps) + 1
        for a in block.steps:
            for b in block.steps:
                if a is not b:
                    assert not vis[a.span.start : a.span.end, b.span.start : b.span.end].any()
            # Each step sees everything before its block's first step.
            assert vis[a.span.end - 1, : block.steps[0].span.start].all()
        assert vis[block.takeaway.span.start, : block.takeaway.span.start + 1].all()
    m = trace_metrics(table, layout, prompt_len)
    assert m.total_tokens == len(ids) - prompt_len
    assert m.critical_path_tokens == max(pos) + 1 - prompt_len
    assert m.critical_path_tokens <= m.total_tokens


def test_truncated_or_nested_traces_are_refused() -> None:
    for response in (
        "<guideline><plan>1:x</plan></guideline><step>1:a",
        "<guideline><plan>1:x</plan></guideline><step>1:a<guideline></step><takeaway>t</takeaway>",
    ):
        ids = codec.encode_with_tags(response)
        with pytest.raises(LayoutError):
            parallel_layout(parse_tokens(ids, codec.vocab, codec.decode))


def test_sequential_layout_is_causal_and_dense_mask_is_bounded() -> None:
    layout = sequential_layout(5)
    assert layout.position_ids == [0, 1, 2, 3, 4]
    assert torch.equal(layout.visibility(), torch.ones(5, 5, dtype=torch.bool).tril())
    mask = layout.additive_mask(torch.bfloat16)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bfloat16
    assert mask[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and mask[0, 0, 1, 0] == 0
    with pytest.raises(LayoutError):
        sequential_layout(DENSE_MASK_MAX_TOKENS + 1).visibility()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_shot_layout_forward_equals_token_by_token_decoding(attn: str) -> None:
    """One forward with the layout's mask and positions (the trainer) equals decoding the flattened
    trace one token at a time with a KV cache, each token attending only to the keys it may see
    (what a branching decoder computes: every cached key was computed under its own visibility)."""
    from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

    response = (
        "<guideline><plan>1:x</plan><plan>2:yy</plan><plan>3:z</plan></guideline>"
        "<step>1:aaaa</step><step>2:b</step><step>3:cc</step><takeaway>t</takeaway>"
        "<guideline><plan>1:w</plan><plan>2:v</plan></guideline><step>1:dd</step><step>2:eee</step>"
        "<takeaway>v</takeaway>=9"
    )
    ids, _, layout = layout_of("Q?", response)
    remap = {v: i for i, v in enumerate(sorted(set(ids)))}
    x = torch.tensor([[remap[i] for i in ids]])
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(remap),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    model = Qwen3ForCausalLM(config).eval()
    model.config._attn_implementation = attn
    pos = torch.tensor([layout.position_ids])
    neg = torch.finfo(torch.float32).min
    with torch.no_grad():
        full = model(x, attention_mask=layout.additive_mask(), position_ids=pos).logits[0]
        cache = DynamicCache(config=config)
        for t in range(len(ids)):
            row = torch.tensor([0.0 if layout.sees(t, k) else neg for k in range(t + 1)])
            step = model(
                x[:, t : t + 1],
                attention_mask=row[None, None, None],
                position_ids=pos[:, t : t + 1],
                cache=cache,
                use_cache=True,
                cache_position=torch.tensor([t]),
            )
            torch.testing.assert_close(step.logits[0, -1], full[t], atol=1e-5, rtol=1e-5)
    # The layout really differs from plain causal attention on this trace.
    with torch.no_grad():
        causal = model(x, position_ids=torch.arange(len(ids))[None]).logits[0]
    assert (causal - full).abs().max() > 1e-3
