"""Training sequences and batches: token ids in the layout's order, the layout, and the loss mask.

The same batch serves SFT (cross-entropy on trainable tokens) and RL (log-probs recomputed with the
layout's mask and positions, advantages per sequence). Logits at flattened index t-1 predict token t:
for every token the model sampled, t-1 is its true predecessor in its own context (the token before a
branch's first sampled token is that branch's header; the token before the first takeaway token is
``<takeaway>``). The tokens whose flattened predecessor is NOT their context (a sibling's ``<step>``,
``<takeaway>``) are engine-inserted, and RL masks them out of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from npr_pipelines.structure import (
    ParallelLayout,
    SpanTable,
    TagVocab,
    parallel_layout,
    parse_tokens,
    sequential_layout,
    step_header_ids,
)
from npr_pipelines.training.attention import NPR_ATTENTION, SegmentBatch, layout_batch

Decode = Callable[[Sequence[int]], str]
Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class TrainSequence:
    """One sequence: ``ids`` = prompt + flattened response; ``trainable[t]`` = token t is a target."""

    ids: tuple[int, ...]
    prompt_len: int
    layout: ParallelLayout
    trainable: tuple[bool, ...]
    advantage: float = 0.0
    old_logprobs: tuple[float, ...] | None = None  # per token, aligned to ids (0 for the prompt)

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.trainable) == self.layout.length):
            raise ValueError(
                f"sequence lengths disagree: ids {len(self.ids)}, trainable {len(self.trainable)}, "
                f"layout {self.layout.length}"
            )

    def __len__(self) -> int:
        return len(self.ids)


def header_number_positions(
    table: SpanTable, ids: Sequence[int], vocab: TagVocab, encode: Encode
) -> list[int]:
    """Flattened indices of each step's header label tokens (the ``"k:"`` after ``<step>``).

    Under the parallel layout every sibling's ``<step>`` has the same context, so which label follows
    it cannot be predicted there; SFT does not train these targets in the parallel layout.
    """
    out: list[int] = []
    for block in table.blocks:
        for step in block.steps:
            header = step_header_ids(step.number or "", vocab, encode)
            start = step.span.start
            if list(ids[start : start + len(header)]) == header:
                out.extend(range(start + 1, start + len(header)))
    return out


def sft_sequence(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    layout: str,
    vocab: TagVocab | None = None,
    decode: Decode | None = None,
    encode: Encode | None = None,
) -> TrainSequence:
    """An SFT sequence; ``layout`` is ``"parallel"`` (tags must be single tokens) or ``"sequential"``.

    Raises ``LayoutError`` for a response that cannot be laid out in parallel (truncated, nested).
    """
    ids = tuple(int(i) for i in (*prompt_ids, *response_ids))
    p = len(prompt_ids)
    trainable = [False] * p + [True] * len(response_ids)
    if layout == "sequential":
        return TrainSequence(ids, p, sequential_layout(len(ids)), tuple(trainable))
    if layout != "parallel":
        raise ValueError(f"layout must be 'parallel' or 'sequential', got {layout!r}")
    if vocab is None or decode is None or encode is None:
        raise ValueError("a parallel SFT sequence needs the tag vocab, decode and encode")
    table = parse_tokens(list(response_ids), vocab, decode, offset=p)
    lay = parallel_layout(table, len(ids))
    for t in header_number_positions(table, ids, vocab, encode):
        trainable[t] = False
    return TrainSequence(ids, p, lay, tuple(trainable))


def rl_sequence(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    layout: ParallelLayout,
    inserted: Sequence[bool],
    logprobs: Sequence[float],
    advantage: float,
) -> TrainSequence:
    """An RL sequence from an engine output: engine-inserted tokens are not trained (the model did not
    sample them); ``logprobs`` are the sampling-time log-probs of the response tokens."""
    p = len(prompt_ids)
    ids = tuple(int(i) for i in (*prompt_ids, *response_ids))
    trainable = tuple([False] * p + [not flag for flag in inserted])
    old = tuple([0.0] * p + [float(x) for x in logprobs])
    return TrainSequence(ids, p, layout, trainable, float(advantage), old)


@dataclass
class TokenBatch:
    """A right-padded batch.

    Attributes:
        input_ids: [B, L] long.
        loss_mask: [B, L] float, 1 where token t is a target (its logit comes from t-1).
        advantages: [B] float.
        old_logprobs: [B, L] float (zeros when absent).
        segments: the ``SegmentBatch`` carrying positions and visibility to ``npr_segments`` attention.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    segments: SegmentBatch

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device),
            self.loss_mask.to(device),
            self.advantages.to(device),
            self.old_logprobs.to(device),
            self.segments.to(device),
        )


def collate(seqs: Sequence[TrainSequence], pad_id: int, pad_to: int | None = None) -> TokenBatch:
    length = pad_to or max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, length)
    old = torch.zeros(b, length)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s.ids, dtype=torch.long)
        loss_mask[i, : len(s)] = torch.tensor(s.trainable, dtype=torch.float)
        if s.old_logprobs is not None:
            old[i, : len(s)] = torch.tensor(s.old_logprobs)
    loss_mask[:, 0] = 0.0  # no predecessor
    advantages = torch.tensor([s.advantage for s in seqs], dtype=torch.float)
    return TokenBatch(input_ids, loss_mask, advantages, old, layout_batch([s.layout for s in seqs], length))


def use_segment_attention(model: torch.nn.Module) -> None:
    """Switch a ``transformers`` model to the linear-memory parallel-layout attention."""
    model.config._attn_implementation = NPR_ATTENTION


def token_logprobs(model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, L] log p(token t | its visible context) under the batch's layout; column 0 is 0.

    The model must use ``npr_segments`` attention (see ``use_segment_attention``).
    """
    out = model(input_ids=batch.input_ids, **batch.segments.model_kwargs())
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def sft_loss(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Token-mean cross-entropy over the batch's targets."""
    logp = token_logprobs(model, batch)
    return -(logp * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1.0)
