"""Benchmark of the ``npr_segments`` attention: parallel-SFT step time against causal SDPA, and peak memory
against sequence length.

``run_attention_bench()`` returns the figures (``make bench`` writes them to ``.npr/bench/training.json``):

* ``parallel_sft_step_time_ratio``: forward + backward + AdamW step of the toy model on a batch of
  synthetic parallel traces through ``npr_segments``, divided by the same step on the same tokens with
  plain causal ``sdpa`` (goal <= 1.15).
* peak memory of one forward + backward of a one-layer model at two long lengths L and 2L, measured with
  ``MemoryProbe`` (goal: linear, i.e. growth ~2x), next to the dense mask the release would build
  (L² x 4 bytes per sample in fp32), which is only measured at short lengths to show the probe sees it.

Run as ``python -m npr_pipelines.training.bench_attention`` to print the JSON.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen3Config, Qwen3ForCausalLM

from npr_pipelines.structure import (
    ParallelLayout,
    Tag,
    TagVocab,
    Trace,
    encode_trace,
    parallel_layout,
    parse_tokens,
)
from npr_pipelines.training.attention import NPR_ATTENTION, SegmentBatch, layout_batch

# Synthetic traces are written with one id per character; tags sit above the character range.
_VOCAB = TagVocab({t: 0x110000 + i for i, t in enumerate(Tag)})
_BY_ID = _VOCAB.by_id


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _decode(ids) -> str:
    return "".join(_BY_ID[i].value if i in _BY_ID else chr(i) for i in ids)


def _random_block(rng: random.Random, step_len: tuple[int, int], max_plans: int) -> tuple:
    k = rng.randint(1, max_plans)
    steps = ["s" * rng.randint(*step_len) for _ in range(k)]
    return [f"p{i}" for i in range(k)], steps, "t" * rng.randint(1, 6)


def _trace(blocks: list[tuple], answer: str, prompt_len: int) -> tuple[list[int], ParallelLayout]:
    ids = [ord("q")] * prompt_len + encode_trace(Trace.build(blocks, answer), _VOCAB, _encode)
    table = parse_tokens(ids[prompt_len:], _VOCAB, _decode, offset=prompt_len)
    return ids, parallel_layout(table, len(ids))


def synthetic_trace(
    rng: random.Random, prompt_len: int, rounds: int, step_len: tuple[int, int], max_plans: int = 5
) -> tuple[list[int], ParallelLayout]:
    """A random well-formed parallel trace: its token ids (characters and tag ids) and its layout.

    Each round has 1..``max_plans`` plans and steps of uneven lengths drawn from ``step_len``; the layout
    comes from the structure module's parser and ``parallel_layout`` (the one layout rule).
    """
    return _trace([_random_block(rng, step_len, max_plans) for _ in range(rounds)], "\\boxed{42}", prompt_len)


def long_trace(length: int, seed: int = 0, prompt_len: int = 64) -> tuple[list[int], ParallelLayout]:
    """A synthetic trace of exactly ``length`` tokens: rounds of 1-5 branches of ~L/40..L/20 tokens, then an
    answer that fills the rest."""
    rng = random.Random(seed)
    step_len = (max(1, length // 40), max(1, length // 20))
    blocks: list[tuple] = []
    while True:
        candidate = [*blocks, _random_block(rng, step_len, 5)]
        if len(_trace(candidate, "", prompt_len)[0]) > length - 16:
            break
        blocks = candidate
    base = len(_trace(blocks, "", prompt_len)[0])
    answer = "\\boxed{42}"
    return _trace(blocks, answer + "a" * (length - base - len(answer)), prompt_len)


def tiny_qwen3(
    vocab_size: int,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate_size: int = 64,
    max_positions: int = 32768,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised ``Qwen3ForCausalLM`` (fp32, train mode, ``sdpa``)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.train()


def batch_tensors(
    samples: list[tuple[list[int], ParallelLayout]],
    vocab_size: int,
    prompt_len: int,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SegmentBatch]:
    """Right-padded ``input_ids`` [B, L], completion-only ``labels`` [B, L] (-100 elsewhere) and the layouts."""
    batch = layout_batch([layout for _, layout in samples], pad_to=pad_to)
    n = batch.padded_length
    input_ids = torch.zeros(len(samples), n, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    for i, (ids, _) in enumerate(samples):
        row = torch.tensor(ids) % vocab_size
        input_ids[i, : len(ids)] = row
        labels[i, prompt_len : len(ids)] = row[prompt_len:]
    return input_ids, labels, batch


class MemoryProbe(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and still alive) inside the ``with`` block, and the largest one.

    Counts every aten op's fresh outputs (forward and autograd backward), freeing them when their storage
    dies; tensors that existed before the block (parameters, inputs) and views are not counted. Kernel
    scratch space that never becomes a tensor is not seen (the CPU flash kernel's is per thread and fixed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs)) if _is_dense(t)
        }
        for t in tree_leaves(out):
            if not _is_dense(t):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata in inputs or ref.cdata in self.live:
                continue
            nbytes = t.untyped_storage().nbytes()
            self.live[ref.cdata] = (ref, nbytes)
            self.current += nbytes
            self.largest = max(self.largest, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def _is_dense(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta


def forward_backward_memory(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    make_kwargs: Callable[[], dict[str, Any]],
) -> dict[str, int]:
    """``MemoryProbe`` figures (bytes) of building the attention inputs with ``make_kwargs`` (inside the
    probe, so a dense mask counts) and one forward + backward."""
    model.zero_grad(set_to_none=True)
    with MemoryProbe() as probe:
        model(input_ids, labels=labels, **make_kwargs()).loss.backward()
    model.zero_grad(set_to_none=True)
    return {"peak_bytes": probe.peak, "largest_tensor_bytes": probe.largest}


def _sft_step(
    model: Qwen3ForCausalLM, optimizer: torch.optim.Optimizer, step: Callable[[], torch.Tensor]
) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    step().backward()
    optimizer.step()
    return time.perf_counter() - start


def step_time_ratio(
    batch_size: int = 32, steps: int = 6, warmup: int = 2, seed: int = 0
) -> dict[str, float | int]:
    """Parallel (``npr_segments``) over causal (``sdpa``) SFT step time on the toy model, same tokens.

    Steps alternate between the two so that load from other processes hits both alike; medians are used.
    """
    rng = random.Random(seed)
    prompt_len = 24
    samples = [
        synthetic_trace(rng, prompt_len, rng.randint(1, 3), (4, 24), max_plans=4) for _ in range(batch_size)
    ]
    vocab_size = 600
    input_ids, labels, batch = batch_tensors(samples, vocab_size, prompt_len)
    causal_positions = torch.arange(batch.padded_length)[None].expand(batch_size, -1)
    # The toy model's shape (npr_pipelines.toy.model.ModelConfig).
    model = tiny_qwen3(
        vocab_size, hidden_size=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate_size=512
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def parallel() -> torch.Tensor:
        model.config._attn_implementation = NPR_ATTENTION
        return model(input_ids, labels=labels, **batch.model_kwargs()).loss

    def causal() -> torch.Tensor:
        model.config._attn_implementation = "sdpa"
        return model(input_ids, labels=labels, position_ids=causal_positions).loss

    times: dict[str, list[float]] = {"parallel": [], "causal": []}
    for i in range(warmup + steps):
        for name, fn in (
            (("parallel", parallel), ("causal", causal))
            if i % 2
            else (("causal", causal), ("parallel", parallel))
        ):
            elapsed = _sft_step(model, optimizer, fn)
            if i >= warmup:
                times[name].append(elapsed)
    par, cau = statistics.median(times["parallel"]), statistics.median(times["causal"])
    lengths = [len(ids) for ids, _ in samples]
    return {
        "parallel_sft_step_time_ratio": par / cau,
        "parallel_step_s": par,
        "causal_step_s": cau,
        "batch_size": batch_size,
        "mean_tokens": statistics.mean(lengths),
        "max_tokens": max(lengths),
        "branch_token_fraction": float((batch.block_ids >= 0).sum() / sum(lengths)),
    }


def long_memory(
    lengths: tuple[int, int] = (8192, 16384), dense_lengths: tuple[int, int] = (1024, 2048)
) -> dict:
    """Peak memory of one forward + backward of a one-layer tiny model: segments at ``lengths``, the dense
    additive mask under ``sdpa`` at the short ``dense_lengths`` (it would be L² x 4 bytes at the long ones)."""
    vocab_size = 128
    model = tiny_qwen3(vocab_size, layers=1)
    out: dict[str, Any] = {"segments": {}, "dense_measured": {}, "dense_mask_bytes_formula": {}}
    for n in lengths:
        ids, layout = long_trace(n)
        input_ids, labels, batch = batch_tensors([(ids, layout)], vocab_size, prompt_len=64)
        model.config._attn_implementation = NPR_ATTENTION
        out["segments"][str(batch.padded_length)] = forward_backward_memory(
            model, input_ids, labels, batch.model_kwargs
        )
        out["dense_mask_bytes_formula"][str(batch.padded_length)] = batch.padded_length**2 * 4
    for n in dense_lengths:
        ids, layout = long_trace(n)
        input_ids, labels, batch = batch_tensors([(ids, layout)], vocab_size, prompt_len=64)
        model.config._attn_implementation = "sdpa"

        def dense(batch: SegmentBatch = batch) -> dict[str, Any]:
            return {"attention_mask": batch.dense_reference_mask(), "position_ids": batch.position_ids}

        out["dense_measured"][str(batch.padded_length)] = forward_backward_memory(
            model, input_ids, labels, dense
        )
    seg = list(out["segments"].items())
    (l1, m1), (l2, m2) = seg[0], seg[-1]
    out["segments_peak_growth"] = m2["peak_bytes"] / m1["peak_bytes"]
    out["segments_length_growth"] = int(l2) / int(l1)
    dense = list(out["dense_measured"].values())
    out["dense_peak_growth"] = dense[-1]["peak_bytes"] / dense[0]["peak_bytes"]
    return out


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave as is), restoring the setting afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_attention_bench(batch_size: int = 32, steps: int = 6, threads: int | None = 1) -> dict[str, Any]:
    """All figures of this benchmark (JSON-serialisable).

    ``threads`` defaults to 1: on a shared machine OpenMP barriers between busy cores dominate small ops
    and make two-thread timings noise; the ratio is about the attention path, not about scaling.
    """
    with intra_op_threads(threads):
        result: dict[str, Any] = dict(step_time_ratio(batch_size=batch_size, steps=steps))
        result["memory"] = long_memory()
        result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from npr_pipelines.storage import write_json_report

    ap = argparse.ArgumentParser(description="parallel-SFT attention benchmark (step time, peak memory)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here (atomically)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    result = run_attention_bench(threads=args.threads)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        write_json_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
