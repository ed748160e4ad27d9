"""Parallel-layout attention in linear memory: the ``npr_segments`` attention implementation.

The release trains parallel SFT with a dense [B, 1, L, L] additive mask (method.md §1.5), about 900 MB per
30k-token sample in bf16 and more in fp32. Here the layout (``structure.layout``) travels to attention as a
per-token description instead (``SegmentBatch``: block and branch index per token), and the mask is
rebuilt from it one query chunk at a time, so no tensor anywhere is O(L²):

* CPU: for each chunk of at most ``chunk`` queries [a, b), attend over keys [0, b) through PyTorch's CPU
  flash kernel. Keys before the earliest block start of the chunk's queries are visible to all of them and
  go without a mask; the rest get a [B, 1, b-a, b-split] additive mask (or plain ``is_causal`` when no
  query of the chunk is in a branch), and the two softmaxes are merged by their log-sum-exps. A custom
  autograd function keeps only q, k, v, the output and the log-sum-exp for backward and rebuilds each
  chunk's mask there, because the saved chunk masks would add up to the dense mask again.
* CUDA: FlexAttention with a ``BlockMask`` whose tiles are classified from the same per-token ids one
  query chunk at a time (FlexAttention has no CPU backward in torch 2.13, so CPU never takes this path).
* Elsewhere: per-chunk ``scaled_dot_product_attention`` under activation checkpointing (same memory
  bound, one extra forward per chunk).

The rule (identical to ``ParallelLayout.sees``): query q sees key k iff ``k <= q`` and not siblings, where
siblings are branch tokens of the same block with different branch indices. Right padding is a trailing
shared segment: causal, so no real token sees it and every pad row has a visible key (never NaN).

Use with a stock ``transformers`` model::

    register_npr_attention()                      # done on import, idempotent
    model.config._attn_implementation = NPR_ATTENTION
    batch = layout_batch(layouts, pad_to=L)
    out = model(input_ids, **batch.model_kwargs())  # position_ids + npr_segments=batch

``transformers`` builds no mask for an implementation it has no mask function for
(``masking_utils._preprocess_mask_arguments`` exits early with ``None``): deliberately none is registered,
which also keeps it from reading the parallel position ids (which restart at every branch) as packed
sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from npr_pipelines.structure.layout import DENSE_MASK_MAX_TOKENS, LayoutError, ParallelLayout

NPR_ATTENTION = "npr_segments"
DEFAULT_CHUNK = 512

FLEX_BLOCK = 128  # FlexAttention's default sparse block size
# Below this many always-visible leading keys, one masked call beats an unmasked call plus a merge.
MIN_SPLIT = 128
_SEGMENT_FIELDS = 5  # start, end, position, block, branch


class ChunkPlan(NamedTuple):
    """Queries [start, stop) attend to keys [0, split) without a mask (every one is visible to every query
    of the chunk) and to keys [split, stop) with a mask, or with plain ``is_causal`` when ``causal``."""

    start: int
    stop: int
    split: int
    causal: bool


@dataclass(frozen=True, eq=False)
class SegmentBatch:
    """The parallel layouts of a right-padded batch, as the O(L) tensors attention needs.

    Attributes:
        position_ids: [B, L] long, parallel position ids (pads: 0).
        block_ids: [B, L] long, block index of a branch token; -1 for shared tokens and padding.
        branch_ids: [B, L] long, sibling index of a branch token within its block; -1 for shared/padding.
        segments: [B, S, 5] long, each sample's segments (start, end, position, block, branch) with -1 for
            a shared segment's block/branch; rows past a sample's segment count are (0, 0, 0, -1, -1).
        lengths: [B] long, real (unpadded) tokens per sample.
        window_start: [B, L] long, for a branch token the index of its block's first step, else the token's
            own index: every key before it is visible to the token.
        layouts: the source layouts (for the dense reference and for callers).
        chunk: queries per attention call on the chunked paths (memory is O(chunk x L) per call).
    """

    position_ids: torch.Tensor
    block_ids: torch.Tensor
    branch_ids: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor
    window_start: torch.Tensor
    layouts: tuple[ParallelLayout, ...]
    chunk: int = DEFAULT_CHUNK
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.block_ids.shape[0]

    @property
    def padded_length(self) -> int:
        return self.block_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.block_ids.device

    def to(self, device: torch.device | str) -> SegmentBatch:
        """The same batch with its tensors on ``device``."""
        return SegmentBatch(
            self.position_ids.to(device),
            self.block_ids.to(device),
            self.branch_ids.to(device),
            self.segments.to(device),
            self.lengths.to(device),
            self.window_start.to(device),
            self.layouts,
            self.chunk,
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Forward kwargs for a model running ``NPR_ATTENTION``: ``position_ids`` and ``npr_segments``."""
        return {"position_ids": self.position_ids, NPR_ATTENTION: self}

    def visibility_chunk(self, start: int, stop: int, key_start: int = 0) -> torch.Tensor:
        """Boolean [B, stop-start, stop-key_start]: may query ``start..stop-1`` see key ``key_start..stop-1``."""
        return ~self._blocked(start, stop, key_start)

    def additive_chunk(self, start: int, stop: int, dtype: torch.dtype, key_start: int = 0) -> torch.Tensor:
        """Float [B, 1, stop-start, stop-key_start]: 0 where allowed, ``finfo(dtype).min`` where blocked."""
        blocked = self._blocked(start, stop, key_start)
        mask = torch.zeros(blocked.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(blocked, torch.finfo(dtype).min)[:, None]

    def plan_mask(self, plan: ChunkPlan, dtype: torch.dtype) -> torch.Tensor:
        """``additive_chunk`` of a plan's masked keys, [B, 1, stop-start, stop-split].

        When the whole batch is one chunk the mask is built once and kept for every layer, forward and
        backward: it is then at most chunk² per sample, the size every chunk's mask has anyway.
        """
        if len(self.chunk_plans()) > 1:
            return self.additive_chunk(plan.start, plan.stop, dtype, key_start=plan.split)
        key = ("mask", plan, dtype)
        if key not in self._cache:
            self._cache[key] = self.additive_chunk(plan.start, plan.stop, dtype, key_start=plan.split)
        return self._cache[key]

    def _blocked(self, start: int, stop: int, key_start: int) -> torch.Tensor:
        q_idx = torch.arange(start, stop, device=self.device)[:, None]
        k_idx = torch.arange(key_start, stop, device=self.device)[None, :]
        same_block = self.block_ids[:, start:stop, None] == self.block_ids[:, None, key_start:stop]
        other_branch = self.branch_ids[:, start:stop, None] != self.branch_ids[:, None, key_start:stop]
        # Shared tokens carry block -1 and branch -1: "same block" but never "other branch".
        return (same_block & other_branch) | (k_idx > q_idx)

    def chunk_plans(self) -> tuple[ChunkPlan, ...]:
        """How each query chunk is attended (computed once per batch, shared by all layers)."""
        if "plans" not in self._cache:
            plans = []
            for start, stop in _chunks(self.padded_length, self.chunk):
                lo = min(start, int(self.window_start[:, start:stop].min()))
                split = lo if lo >= MIN_SPLIT else 0
                causal = split == start and not bool((self.block_ids[:, start:stop] >= 0).any())
                plans.append(ChunkPlan(start, stop, split, causal))
            self._cache["plans"] = tuple(plans)
        return self._cache["plans"]

    def dense_reference_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense float [B, 1, L, L] mask from ``ParallelLayout.additive_mask`` (tests and small inputs only).

        Pad rows follow the same rule as here (a trailing shared segment), so whole outputs compare equal.
        """
        n = self.padded_length
        if n > DENSE_MASK_MAX_TOKENS:
            raise LayoutError(
                f"dense mask of {n} tokens refused (> {DENSE_MASK_MAX_TOKENS}); use the segments"
            )
        out = torch.full((self.batch_size, 1, n, n), torch.finfo(dtype).min, dtype=dtype)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i, layout in enumerate(self.layouts):
            m = layout.length
            out[i, 0].masked_fill_(causal, 0.0)
            out[i, 0, :m, :m] = layout.additive_mask(dtype)[0, 0]
        return out.to(self.device)

    def block_mask(
        self, device: torch.device | str | None = None, block: int = FLEX_BLOCK, tiles: int | None = None
    ):
        """FlexAttention ``BlockMask`` of this batch, built once per device.

        ``tiles``: for inputs padded to ``tiles * block`` positions (at least the batch's own tile count).
        Padding inside the last real tile attends causally (so no real query sees it); tiles wholly past
        the batch are empty, so padding costs the kernel nothing there.

        ``create_block_mask`` would materialise the dense [B, 1, L, L] mask unless compiled; here the
        block classification (empty / partial / full per ``block`` x ``block`` tile) is reduced from one
        query chunk at a time, so memory stays O(chunk x L) plus O((L/block)²) tiles.
        """
        from torch.nn.attention.flex_attention import _create_sparse_block_from_block_mask

        device = torch.device(device) if device is not None else self.device
        key = ("block_mask", str(device), block, tiles)
        if key in self._cache:
            return self._cache[key]
        on = self if self.device == device else self.to(device)
        n, b = self.padded_length, self.batch_size
        n_tiles = -(-n // block)
        partial = torch.zeros(b, 1, n_tiles, n_tiles, dtype=torch.int8, device=device)
        full = torch.zeros_like(partial)
        rows = block * max(1, self.chunk // block)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            q_tiles, k_tiles = -(-(stop - start) // block), -(-stop // block)
            vis = F.pad(
                on.visibility_chunk(start, stop),
                (0, k_tiles * block - stop, 0, q_tiles * block - stop + start),
            )
            count = vis.view(b, q_tiles, block, k_tiles, block).sum(dim=(2, 4))
            t0 = start // block
            full[:, 0, t0 : t0 + q_tiles, :k_tiles] = count == block * block
            partial[:, 0, t0 : t0 + q_tiles, :k_tiles] = (count > 0) & (count < block * block)
        # Padded to whole tiles so that the kernel may evaluate mask_mod past L without indexing out of range.
        pad = (0, (tiles or n_tiles) * block - n)
        block_ids = F.pad(on.block_ids, pad, value=-1)
        branch_ids = F.pad(on.branch_ids, pad, value=-1)

        def mask_mod(b, h, q_idx, kv_idx):
            same_block = block_ids[b, q_idx] == block_ids[b, kv_idx]
            other_branch = branch_ids[b, q_idx] != branch_ids[b, kv_idx]
            return (kv_idx <= q_idx) & ~(same_block & other_branch)

        length = n
        if tiles is not None:
            if tiles < n_tiles:
                raise ValueError(f"tiles={tiles} is fewer than the batch's {n_tiles} tiles of {block}")
            grow = (0, tiles - n_tiles, 0, tiles - n_tiles)
            partial, full, length = F.pad(partial, grow), F.pad(full, grow), tiles * block
        self._cache[key] = _create_sparse_block_from_block_mask(
            (partial, full), mask_mod, (length, length), block, block
        )
        return self._cache[key]


def layout_batch(
    layouts: Sequence[ParallelLayout], pad_to: int | None = None, chunk: int = DEFAULT_CHUNK
) -> SegmentBatch:
    """Stack layouts into a right-padded ``SegmentBatch`` of length ``pad_to`` (default: the longest)."""
    if not layouts:
        raise ValueError("layout_batch needs at least one layout")
    longest = max(layout.length for layout in layouts)
    pad_to = longest if pad_to is None else pad_to
    if pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest layout ({longest} tokens)")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    b = len(layouts)
    n_seg = max(1, max(len(layout.segments) for layout in layouts))
    position_ids = torch.zeros(b, pad_to, dtype=torch.long)
    block_ids = torch.full((b, pad_to), -1, dtype=torch.long)
    branch_ids = torch.full((b, pad_to), -1, dtype=torch.long)
    segments = torch.zeros(b, n_seg, _SEGMENT_FIELDS, dtype=torch.long)
    segments[..., 3:] = -1
    window_start = torch.arange(pad_to, dtype=torch.long).repeat(b, 1)
    block_first = 0
    for i, layout in enumerate(layouts):
        position_ids[i, : layout.length] = torch.tensor(layout.position_ids, dtype=torch.long)
        for j, seg in enumerate(layout.segments):
            blk = -1 if seg.block is None else seg.block
            br = -1 if seg.branch is None else seg.branch
            segments[i, j] = torch.tensor([seg.start, seg.end, seg.position, blk, br])
            if seg.is_branch:
                block_ids[i, seg.start : seg.end] = blk
                branch_ids[i, seg.start : seg.end] = br
                if seg.branch == 0:
                    block_first = seg.start
                window_start[i, seg.start : seg.end] = block_first
    lengths = torch.tensor([layout.length for layout in layouts], dtype=torch.long)
    return SegmentBatch(
        position_ids, block_ids, branch_ids, segments, lengths, window_start, tuple(layouts), chunk
    )


def _chunks(length: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, chunk):
        yield start, min(start + chunk, length)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _parts(
    plan: ChunkPlan, batch: SegmentBatch, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor | None, bool]]:
    """The key ranges of a chunk as (key_start, mask, is_causal); the last range ends at ``plan.stop``."""
    if plan.split > 0:
        yield 0, None, False
    if plan.causal:
        yield plan.split, None, True
    else:
        yield plan.split, batch.plan_mask(plan, dtype), False


class _CpuSegmentAttention(torch.autograd.Function):
    """Chunked masked attention on the CPU flash kernel.

    A chunk whose leading keys are visible to all its queries attends to them without a mask and to the
    rest with one, and the two softmaxes are merged by their log-sum-exps. Backward feeds every part the
    merged output and log-sum-exp, which makes each part's gradient that of the merged softmax, and
    rebuilds the masks instead of keeping them.
    """

    @staticmethod
    def forward(ctx, query, key, value, batch: SegmentBatch, scale: float | None):  # type: ignore[override]
        plans = batch.chunk_plans()
        outs, lses = [], []
        for plan in plans:
            q = query[:, :, plan.start : plan.stop]
            parts = list(_parts(plan, batch, query.dtype))
            bounds = [*(k0 for k0, _, _ in parts), plan.stop]
            pieces = [
                _FLASH_CPU(q, key[:, :, k0:k1], value[:, :, k0:k1], 0.0, causal, attn_mask=mask, scale=scale)
                for (k0, mask, causal), k1 in zip(parts, bounds[1:], strict=True)
            ]
            if len(pieces) == 1:
                out, lse = pieces[0]
            else:
                (o1, l1), (o2, l2) = pieces
                lse = torch.logaddexp(l1, l2)
                w1, w2 = (l1 - lse).exp()[..., None], (l2 - lse).exp()[..., None]
                out = (o1.float() * w1 + o2.float() * w2).to(query.dtype)
            outs.append(out)
            lses.append(lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.batch, ctx.scale = batch, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, out, *lses = ctx.saved_tensors
        batch: SegmentBatch = ctx.batch
        plans = batch.chunk_plans()
        grads: list[torch.Tensor] | None = None
        for plan, lse in zip(plans, lses, strict=True):
            rows = slice(plan.start, plan.stop)
            parts = list(_parts(plan, batch, query.dtype))
            bounds = [*(k0 for k0, _, _ in parts), plan.stop]
            for (k0, mask, causal), k1 in zip(parts, bounds[1:], strict=True):
                gq, gk, gv = _FLASH_CPU_BACKWARD(
                    grad_out[:, :, rows],
                    query[:, :, rows],
                    key[:, :, k0:k1],
                    value[:, :, k0:k1],
                    out[:, :, rows],
                    lse,
                    0.0,
                    causal,
                    attn_mask=mask,
                    scale=ctx.scale,
                )
                if len(plans) == 1 and len(parts) == 1:
                    return gq, gk, gv, None, None
                if grads is None:
                    grads = [torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)]
                grads[0][:, :, rows] += gq
                grads[1][:, :, k0:k1] += gk
                grads[2][:, :, k0:k1] += gv
        assert grads is not None
        grad_q, grad_k, grad_v = grads
        return grad_q, grad_k, grad_v, None, None


def _sdpa_chunks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: SegmentBatch, scale: float | None
) -> torch.Tensor:
    """Per-chunk SDPA; under autograd each chunk is checkpointed so its mask is not kept for backward."""
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = batch.additive_chunk(start, stop, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    tracking = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for start, stop in _chunks(query.shape[2], batch.chunk):
        args = (query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop], start, stop)
        outs.append(checkpoint(attend, *args, use_reentrant=False) if tracking else attend(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


_compiled_flex: Callable | None = None


def flex_tiles(n: int, block: int = FLEX_BLOCK) -> int:
    """Tiles of ``block`` positions that a length-``n`` batch is padded to for the compiled kernel:
    the next of 1, 2, 3, 4, 6, 8, 12, 16, ... (at most a third more), so that a run over many lengths
    compiles about twice per doubling of the length, within torch's recompile limit."""
    need = max(1, -(-n // block))
    low = 1 << max(0, (need - 1).bit_length() - 1)  # the power of two just below need (or need itself)
    if low >= need:
        return low
    return low * 3 // 2 if low >= 2 and low * 3 // 2 >= need else 2 * low


def _flex(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: SegmentBatch, scale: float | None
) -> torch.Tensor:
    """FlexAttention with the batch's ``BlockMask`` (CUDA).

    Compiled with static shapes over inputs padded to ``flex_tiles`` tiles: a dynamic-shape compile,
    which torch picks after the second length, has no lowering for flex attention on torch 2.11.
    Padded queries are sliced off; padded keys lie after every real query, so the causal rule hides them.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    n = query.shape[2]
    tiles = flex_tiles(n)
    pad = tiles * FLEX_BLOCK - n
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    out = _compiled_flex(
        query,
        key,
        value,
        block_mask=batch.block_mask(query.device, tiles=tiles),
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[:, :, :n] if pad else out


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: SegmentBatch,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of a batch under its parallel layouts, never materialising an L x L tensor.

    Args:
        query: [B, H, L, D]; key, value: [B, Hk, L, D] with H a multiple of Hk (GQA).
        batch: the layouts, padded to L.
        scale: softmax scale (default 1/sqrt(D)).
        backend: ``"auto"`` (CUDA: flex, CPU: cpu_flash, else sdpa_chunks), ``"flex"``, ``"cpu_flash"`` or
            ``"sdpa_chunks"``.

    Returns:
        [B, H, L, D].
    """
    if key.shape[2] != query.shape[2] or batch.padded_length != query.shape[2]:
        raise ValueError(
            f"segment attention needs queries, keys and the layout batch of one length, got "
            f"{query.shape[2]} queries, {key.shape[2]} keys, {batch.padded_length} layout tokens "
            "(decode with a cache through the engine, not this)"
        )
    if batch.device != query.device:
        moved = ("on", str(query.device))
        if moved not in batch._cache:
            batch._cache[moved] = batch.to(query.device)
        batch = batch._cache[moved]
    if backend == "auto":
        if query.device.type == "cuda":
            backend = "flex"
        elif query.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None:
            backend = "cpu_flash"
        else:
            backend = "sdpa_chunks"
    if backend == "cpu_flash":
        return _CpuSegmentAttention.apply(query, key, value, batch, scale)
    if backend == "sdpa_chunks":
        return _sdpa_chunks(query, key, value, batch, scale)
    if backend == "flex":
        return _flex(query, key, value, batch, scale)
    raise ValueError(f"unknown segment attention backend {backend!r}")


def npr_segments_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    npr_segments: SegmentBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function for ``NPR_ATTENTION``.

    Args:
        query: [B, H, L, D]; key, value: [B, Hk, L, D] (after RoPE).
        attention_mask: ignored; ``transformers`` passes None for this implementation.
        npr_segments: the ``SegmentBatch`` forwarded from ``model(..., npr_segments=batch)``. Without it the
            forward is plain causal attention (e.g. a sequential batch).

    Returns:
        ([B, L, H, D] attention output, None): no attention weights exist to return.
    """
    if dropout > 0.0:
        raise ValueError(
            "npr_segments attention has no dropout (parallel SFT trains with attention_dropout 0)"
        )
    if kwargs.get("sliding_window") is not None:
        raise ValueError("npr_segments attention does not implement sliding-window layers")
    if npr_segments is None:
        if key.shape[2] != query.shape[2]:
            raise ValueError("npr_segments attention without a layout only covers full causal forwards")
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
    else:
        out = segment_attention(query, key, value, npr_segments, scale=scaling)
    return out.transpose(1, 2), None


def register_npr_attention() -> str:
    """Register ``npr_segments_attention`` with ``transformers``' ``AttentionInterface``; returns its name.

    Deliberately no ``AttentionMaskInterface`` entry: that is what makes ``transformers`` skip mask building.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NPR_ATTENTION, npr_segments_attention)
    return NPR_ATTENTION


register_npr_attention()
