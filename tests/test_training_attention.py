"""The ``npr_segments`` attention: equal to the dense additive mask (logits and gradients), plain causal on
sequential layouts, every backend agreeing, FlexAttention's block mask following the same rule, and peak
memory linear in the sequence length."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from _support import CharCodec
from transformers import Qwen3Config, Qwen3ForCausalLM

from npr_pipelines.structure import Trace, encode_trace, parallel_layout, parse_tokens, sequential_layout
from npr_pipelines.training import attention as attn
from npr_pipelines.training.attention import (
    NPR_ATTENTION,
    SegmentBatch,
    layout_batch,
    npr_segments_attention,
    segment_attention,
)
from npr_pipelines.training.bench_attention import (
    MemoryProbe,
    batch_tensors,
    forward_backward_memory,
    long_trace,
    step_time_ratio,
    tiny_qwen3,
)

codec = CharCodec()
VOCAB = 97
PROMPT = 5


def random_trace(rng: random.Random, prompt_len: int = PROMPT) -> tuple[list[int], object]:
    """Token ids (mod VOCAB) and layout of a random multi-round trace with 1-5 plans and uneven steps."""
    blocks = []
    for _ in range(rng.randint(1, 3)):
        k = rng.randint(1, 5)
        steps = ["s" * rng.randint(1, 30) for _ in range(k)]
        blocks.append(([f"p{i}" for i in range(k)], steps, "t" * rng.randint(1, 4)))
    ids = [ord("q")] * prompt_len + encode_trace(Trace.build(blocks, "\\boxed{7}"), codec.vocab, codec.encode)
    table = parse_tokens(ids[prompt_len:], codec.vocab, codec.decode, offset=prompt_len)
    return [i % VOCAB for i in ids], parallel_layout(table, len(ids))


def make_batch(seed: int, n: int = 4, extra_pad: int = 3, chunk: int = attn.DEFAULT_CHUNK):
    """input_ids [B, L], completion labels [B, L] and the SegmentBatch of n random traces, right-padded."""
    rng = random.Random(seed)
    samples = [random_trace(rng) for _ in range(n)]
    pad_to = max(len(ids) for ids, _ in samples) + extra_pad
    batch = layout_batch([layout for _, layout in samples], pad_to=pad_to, chunk=chunk)
    input_ids = torch.zeros(n, pad_to, dtype=torch.long)
    labels = torch.full((n, pad_to), -100, dtype=torch.long)
    for i, (ids, _) in enumerate(samples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, PROMPT : len(ids)] = torch.tensor(ids[PROMPT:])
    return input_ids, labels, batch


def tiny_model(seed: int = 0, head_dim: int = 8) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    return Qwen3ForCausalLM(config)


def dense_forward(model, input_ids, batch: SegmentBatch, impl: str, labels=None):
    model.config._attn_implementation = impl
    return model(
        input_ids, attention_mask=batch.dense_reference_mask(), position_ids=batch.position_ids, labels=labels
    )


def segments_forward(model, input_ids, batch: SegmentBatch, labels=None):
    model.config._attn_implementation = NPR_ATTENTION
    return model(input_ids, labels=labels, **batch.model_kwargs())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine OpenMP's barriers make tiny ops 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 queries and splitting from 8 leading keys: every kind of chunk plan on short traces."""
    monkeypatch.setattr(attn, "MIN_SPLIT", 8)
    return 16


def test_layout_batch_tensors_hand_example() -> None:
    _, layout = random_trace(random.Random(3))
    short = sequential_layout(4)
    batch = layout_batch([layout, short], pad_to=layout.length + 2)
    n = layout.length
    assert batch.position_ids.shape == (2, n + 2)
    assert batch.position_ids[0, :n].tolist() == layout.position_ids
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3] + [0] * (n - 2)
    assert batch.lengths.tolist() == [n, 4]
    for i, seg in enumerate(layout.segments):
        row = batch.segments[0, i].tolist()
        assert row == [
            seg.start,
            seg.end,
            seg.position,
            -1 if seg.block is None else seg.block,
            -1 if seg.branch is None else seg.branch,
        ]
        if seg.is_branch:
            assert (batch.block_ids[0, seg.start : seg.end] == seg.block).all()
            assert (batch.branch_ids[0, seg.start : seg.end] == seg.branch).all()
            first = min(s.start for s in layout.segments if s.block == seg.block)
            assert (batch.window_start[0, seg.start : seg.end] == first).all()
        else:
            assert (batch.block_ids[0, seg.start : seg.end] == -1).all()
    assert (batch.block_ids[:, n:] == -1).all() and (batch.block_ids[1] == -1).all()
    assert batch.segments[1, 1:].tolist() == [[0, 0, 0, -1, -1]] * (batch.segments.shape[1] - 1)
    # The chunk rule is the layout's rule, token for token (pads: causal).
    vis = batch.visibility_chunk(0, n + 2)
    assert torch.equal(vis[0, :n, :n], layout.visibility())
    assert torch.equal(vis[0, n:], torch.ones(n + 2, n + 2, dtype=torch.bool).tril()[n:])
    with pytest.raises(ValueError, match="shorter"):
        layout_batch([layout], pad_to=n - 1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunks"])
def test_forward_equals_dense_additive_mask(impl: str, chunked: bool, small_chunks: int) -> None:
    model = tiny_model().eval()
    for seed in range(3):
        input_ids, _, batch = make_batch(seed, chunk=small_chunks if chunked else attn.DEFAULT_CHUNK)
        if chunked:
            plans = batch.chunk_plans()
            assert len(plans) > 1 and any(p.split > 0 for p in plans) and any(not p.causal for p in plans)
        with torch.no_grad():
            dense = dense_forward(model, input_ids, batch, impl).logits
            seg = segments_forward(model, input_ids, batch).logits
        assert torch.isfinite(seg).all()
        torch.testing.assert_close(seg, dense, atol=1e-5, rtol=1e-5)
    # The layouts really are not causal: plain causal attention gives other logits.
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        causal = model(input_ids, position_ids=batch.position_ids).logits
    assert (causal - seg).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [512, 7])
def test_sequential_layout_equals_plain_causal_attention(chunk: int) -> None:
    model = tiny_model().eval()
    lengths = [40, 33, 12]
    batch = layout_batch([sequential_layout(n) for n in lengths], chunk=chunk)
    if chunk == attn.DEFAULT_CHUNK:
        assert all(p.causal for p in batch.chunk_plans())
    input_ids = torch.randint(
        0, VOCAB, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        seg = segments_forward(model, input_ids, batch).logits
        model.config._attn_implementation = "sdpa"
        for i, n in enumerate(lengths):
            plain = model(input_ids[i : i + 1, :n]).logits[0]
            torch.testing.assert_close(seg[i, :n], plain, atol=1e-5, rtol=1e-5)
        # Without a layout the implementation is plain causal attention.
        model.config._attn_implementation = NPR_ATTENTION
        torch.testing.assert_close(model(input_ids[:1, :40]).logits[0], seg[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunks"])
def test_parameter_gradients_equal_dense_path(chunked: bool, small_chunks: int) -> None:
    model = tiny_model().train()
    input_ids, labels, batch = make_batch(7, n=5, chunk=small_chunks if chunked else attn.DEFAULT_CHUNK)
    grads = {}
    for name, run in (
        ("dense", lambda: dense_forward(model, input_ids, batch, "eager", labels)),
        ("segments", lambda: segments_forward(model, input_ids, batch, labels)),
    ):
        model.zero_grad(set_to_none=True)
        loss = run().loss
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["segments"][0], grads["dense"][0], atol=1e-6, rtol=1e-6)
    for name, dense_grad in grads["dense"][1].items():
        torch.testing.assert_close(grads["segments"][1][name], dense_grad, atol=1e-5, rtol=1e-5, msg=name)
    assert any(g.abs().max() > 1e-4 for g in grads["dense"][1].values())


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa_chunks"])
@pytest.mark.parametrize("chunk", [512, 16])
def test_backends_equal_dense_sdpa_with_gqa(backend: str, chunk: int, small_chunks: int) -> None:
    _, _, batch = make_batch(11, n=3, chunk=chunk)
    b, n = batch.batch_size, batch.padded_length
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    g = torch.randn(b, 4, n, 8, generator=gen)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.dense_reference_mask(), enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = segment_attention(q, k, v, batch, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_stays_close_to_fp32() -> None:
    _, _, batch = make_batch(5, n=2, chunk=16)
    b, n = batch.batch_size, batch.padded_length
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, 8, generator=gen) for h in (4, 2, 2))
    ref = segment_attention(q, k, v, batch)
    low = segment_attention(*(t.bfloat16().requires_grad_() for t in (q, k, v)), batch)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)
    low.float().sum().backward()


def test_flex_block_mask_equals_create_block_mask_and_the_layout_rule() -> None:
    """The chunk-wise BlockMask has the tiles ``create_block_mask`` derives from the dense mask, and
    FlexAttention's forward (which runs on the CPU; its backward needs CUDA) under it equals the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    samples = [long_trace(700, seed=0), long_trace(450, seed=1), random_trace(random.Random(0))]
    batch = layout_batch([layout for _, layout in samples], pad_to=700, chunk=256)
    b, n = batch.batch_size, batch.padded_length
    ours = batch.block_mask("cpu")
    allowed = batch.dense_reference_mask() == 0
    reference = create_block_mask(lambda b, h, q, k: allowed[b, 0, q, k], b, None, n, n, device="cpu")
    assert torch.equal(ours.to_dense(), reference.to_dense())
    assert torch.equal(ours.kv_num_blocks, reference.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks)
    assert int(ours.full_kv_num_blocks.sum()) > 0 and int(ours.kv_num_blocks.sum()) > 0

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, h, n, 8, generator=gen) for h in (4, 2, 2))
    with torch.no_grad(), pytest.warns(UserWarning):
        out = flex_attention(q, k, v, block_mask=ours, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.dense_reference_mask(), enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # The padded variant the compiled CUDA path uses (static shapes): inputs padded to whole tiles, here
    # two more than the batch needs (tiles wholly past the batch are empty).
    tiles = -(-n // attn.FLEX_BLOCK) + 2
    qp, kp, vp = (F.pad(t, (0, 0, 0, tiles * attn.FLEX_BLOCK - n)) for t in (q, k, v))
    padded_mask = batch.block_mask("cpu", tiles=tiles)
    assert int(padded_mask.kv_num_blocks[:, :, -2:].sum()) == 0
    with torch.no_grad(), warnings.catch_warnings():  # the eager-flex warning is only given once
        warnings.simplefilter("ignore")
        padded = flex_attention(qp, kp, vp, block_mask=padded_mask, enable_gqa=True)
    torch.testing.assert_close(padded[:, :, :n], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        batch.block_mask("cpu", tiles=1)


def test_flex_tiles_buckets_lengths() -> None:
    """Lengths are padded to 1, 2, 3, 4, 6, 8, 12, ... tiles: never less than needed, at most a half more
    (a third past 3 tiles), about two compiles per doubling of the length."""
    sizes = [attn.flex_tiles(n) for n in range(1, 64 * attn.FLEX_BLOCK)]
    for n, t in zip(range(1, 64 * attn.FLEX_BLOCK), sizes, strict=True):
        need = -(-n // attn.FLEX_BLOCK)
        assert need <= t <= max(need * 3 // 2, need + 1)
    assert sorted(set(sizes)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention training needs CUDA")
def test_flex_attention_on_cuda_equals_dense_with_gradients() -> None:
    model = tiny_model(head_dim=16).train().cuda()  # FlexAttention's kernels need head_dim >= 16
    input_ids, labels, batch = make_batch(17, n=4)
    input_ids, labels = input_ids.cuda(), labels.cuda()
    batch = batch.to("cuda")
    out = {}
    for name, run in (
        ("dense", lambda: dense_forward(model, input_ids, batch, "sdpa", labels)),
        ("segments", lambda: segments_forward(model, input_ids, batch, labels)),
    ):
        model.zero_grad(set_to_none=True)
        result = run()
        result.loss.backward()
        out[name] = (result.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out["segments"][0], out["dense"][0], atol=1e-4, rtol=1e-4)
    for name, grad in out["dense"][1].items():
        torch.testing.assert_close(out["segments"][1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_transformers_builds_no_mask_for_npr_segments() -> None:
    from transformers.masking_utils import create_causal_mask

    model = tiny_model()
    model.set_attn_implementation(NPR_ATTENTION)
    assert model.config._attn_implementation == NPR_ATTENTION
    _, _, batch = make_batch(1, n=2)
    embeds = torch.zeros(2, batch.padded_length, 32)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=torch.ones(2, batch.padded_length, dtype=torch.long),
        cache=None,
        position_ids=batch.position_ids,
    )
    assert mask is None


def test_refuses_dropout_and_mismatched_lengths() -> None:
    _, _, batch = make_batch(2, n=1)
    n = batch.padded_length
    q, k = torch.zeros(1, 4, n, 8), torch.zeros(1, 2, n, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="dropout"):
        npr_segments_attention(module, q, k, k, None, dropout=0.1, npr_segments=batch)
    with pytest.raises(ValueError, match="one length"):
        segment_attention(q[:, :, :-1], k[:, :, :-1], k[:, :, :-1], batch)
    out, weights = npr_segments_attention(module, q, k, k, None, npr_segments=batch)
    assert out.shape == (1, n, 4, 8) and weights is None


def test_memory_grows_linearly_with_length() -> None:
    """One forward + backward of a one-layer model on a long trace: the segment path's peak doubles when the
    length doubles, and its largest tensor is at most a chunk's mask, far below the dense mask (L² x 4 bytes: 1 GiB at 16k,
    never built here). The same probe sees the dense path grow ~4x between 512 and 1024 tokens."""
    model = tiny_qwen3(128, layers=1)
    model.config._attn_implementation = NPR_ATTENTION
    peaks = {}
    for n in (8192, 16384):
        ids, layout = long_trace(n)
        input_ids, labels, batch = batch_tensors([(ids, layout)], 128, prompt_len=64)
        assert batch.padded_length == n
        peaks[n] = forward_backward_memory(model, input_ids, labels, batch.model_kwargs)
        # Nothing bigger than a chunk's mask, chunk x L x 4 bytes (the logits are 128 x L x 4).
        assert peaks[n]["largest_tensor_bytes"] <= batch.chunk * n * 4
    assert peaks[16384]["peak_bytes"] < 2.5 * peaks[8192]["peak_bytes"]
    assert peaks[16384]["peak_bytes"] < 16384**2 * 4 / 8

    model.config._attn_implementation = "sdpa"
    dense = {}
    for n in (512, 1024):
        ids, layout = long_trace(n)
        input_ids, labels, batch = batch_tensors([(ids, layout)], 128, prompt_len=64)

        def kwargs(batch: SegmentBatch = batch) -> dict:
            return {"attention_mask": batch.dense_reference_mask(), "position_ids": batch.position_ids}

        dense[n] = forward_backward_memory(model, input_ids, labels, kwargs)["peak_bytes"]
    assert dense[1024] > 3 * dense[512]


def test_memory_probe_counts_fresh_tensors_only() -> None:
    x = torch.ones(1000)
    with MemoryProbe() as probe:
        y = x * 2  # 4000 bytes
        z = y.view(10, 100)  # a view: nothing new
        del y, z
        w = x + 1  # the first buffer is gone by now
    assert probe.peak == 4000 and probe.largest == 4000
    assert w.sum() == 2000


def test_bench_smoke() -> None:
    result = step_time_ratio(batch_size=2, steps=1, warmup=0)
    assert result["parallel_sft_step_time_ratio"] > 0 and result["batch_size"] == 2
    assert 0 < result["branch_token_fraction"] < 1
