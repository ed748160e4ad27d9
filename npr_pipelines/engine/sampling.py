"""Batched sampling with per-stream state.

Each row (one live stream) has its own CPU ``torch.Generator``, read through ``UniformDraws`` (seeded
from the request seed and the stream's path, so a branch's draws do not depend on what else is in the
batch or on the device), its own token history for the repetition penalty, and its request's immutable
``SamplingParams``.

Order: log-probs are captured first, as ``log_softmax(logits / temperature)`` of the model's logits
(temperature 1 when greedy); then repetition penalty, the request's logits hook, temperature, top-k,
top-p; then one uniform draw per non-greedy row and an inverse-CDF pick (argmax when greedy).

Everything is one set of tensor ops over ``[R, V]``; per row there is only a generator draw (for
non-greedy rows) and, where used, the repetition penalty and the hook. A hook that only forces a token
can say so through ``forced_token(stream) -> int | None``: the forced id is then applied to the whole
batch at once (the result is the same as editing the logits to allow just that token, which is what
calling the hook does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from npr_pipelines.engine.flow import Stream, StreamKind
from npr_pipelines.engine.types import LogitsHook, SamplingParams


class UniformDraws:
    """A stream's uniform draws from its own CPU ``torch.Generator``, fetched ``block`` at a time: the
    same numbers in the same order as one ``torch.rand((), generator=g)`` per draw (the CPU generator
    fills a vector draw by draw; a test holds that), for a fraction of the per-row cost."""

    __slots__ = ("_buffer", "_next", "block", "generator")

    def __init__(self, generator: torch.Generator, block: int = 32) -> None:
        self.generator = generator
        self.block = block
        self._buffer: list[float] = []
        self._next = 0

    def next(self) -> float:
        if self._next == len(self._buffer):
            self._buffer = torch.rand(self.block, generator=self.generator).tolist()
            self._next = 0
        self._next += 1
        return self._buffer[self._next - 1]


class SampleRow(NamedTuple):
    params: SamplingParams
    draws: UniformDraws
    stream: Stream
    hook: LogitsHook | None = None


def apply_repetition_penalty(logits: torch.Tensor, tokens: Sequence[int], penalty: float) -> None:
    """In place on ``logits [V]``: positive logits of seen tokens divided by ``penalty``, negative multiplied."""
    if penalty == 1.0 or not tokens:
        return
    ids = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=logits.device)
    vals = logits[ids]
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> tuple[list[int], list[float]]:
    """Sample one token per row of ``logits [R, V]`` (float32); return tokens and their log-probs."""
    v = logits.shape[1]
    dev = logits.device
    params = [row.params for row in rows]
    temps = [p.temperature for p in params]
    greedy = [t == 0 for t in temps]
    all_greedy = all(greedy)
    if all_greedy or all(t == 1.0 for t in temps):
        t_eff = None
        logp = torch.log_softmax(logits, dim=-1)
    else:
        t_eff = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=logits.dtype, device=dev)[:, None]
        logp = torch.log_softmax(logits / t_eff, dim=-1)

    proc = logits
    forced: list[tuple[int, int]] = []  # (row, token)
    for i, row in enumerate(rows):
        p, st = row.params, row.stream
        penalty = p.repetition_penalty
        if st.kind is StreamKind.BRANCH and p.branch_repetition_penalty is not None:
            penalty = p.branch_repetition_penalty
        if penalty != 1.0 and len(st.tokens) > st.n_prompt:
            if proc is logits:
                proc = logits.clone()
            apply_repetition_penalty(proc[i], st.tokens[st.n_prompt :], penalty)
        hook = row.hook
        if hook is not None:
            force = getattr(hook, "forced_token", None)
            if force is not None:
                tok = force(st)
                if tok is not None:
                    forced.append((i, tok))
            else:
                if proc is logits:
                    proc = logits.clone()
                proc[i] = hook(st, proc[i])

    if all_greedy:
        chosen = proc.argmax(dim=-1)
    else:
        if t_eff is not None:
            proc = proc / t_eff
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(tp < 1.0 for tp in top_p):
            proc = truncate(proc, top_k, top_p)
        probs = torch.softmax(proc, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor(
            [0.0 if gr else row.draws.next() for row, gr in zip(rows, greedy, strict=True)],
            dtype=cdf.dtype,
            device=dev,
        )
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=v - 1)
        chosen = drawn
        if any(greedy):
            chosen = torch.where(torch.tensor(greedy, device=dev), proc.argmax(dim=-1), drawn)
    if forced:
        idx = torch.tensor([i for i, _ in forced], dtype=torch.long, device=dev)
        chosen = chosen.index_put((idx,), torch.tensor([t for _, t in forced], dtype=torch.long, device=dev))
    lp = logp.gather(1, chosen[:, None])[:, 0]
    return chosen.tolist(), lp.tolist()


#: Candidates ranked per row before a full sort is needed: a nucleus (or top-k) that ends within the
#: first this-many tokens is found from them alone (sorting all of a [R, V] batch costs ~10 us per row
#: on a CPU for a 400-token vocabulary; ranking 16 candidates a fifth of that).
NUCLEUS_CANDIDATES = 16


def truncate(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """``logits [R, V]`` with every token outside its row's top-k, then outside its top-p nucleus, set
    to -inf (``top_k[r]`` 0: off; ``top_p[r]`` 1.0: off). The nucleus keeps the tokens, by descending
    logit, whose probability mass strictly above them (within the top-k) is at most top-p, so the most
    likely token is always kept.

    On the CPU each row is ranked by its first ``NUCLEUS_CANDIDATES`` tokens; a row whose top-k or
    nucleus reaches past them is sorted whole. Which path a row takes depends on that row alone, so a
    row's result never depends on the rest of the batch (ties at the cut aside, both paths keep the
    same tokens). On an accelerator the whole batch is sorted: a sort is one cheap kernel there, and
    choosing rows would wait for the device in the middle of the step.
    """
    v = logits.shape[1]
    dev = logits.device
    k = torch.tensor([kk if 0 < kk < v else v for kk in top_k], device=dev)
    # top-p 1.0 is off: compared with a cumulative sum that can round past 1.0 it would not be.
    p = torch.tensor([pp if pp < 1.0 else float("inf") for pp in top_p], dtype=logits.dtype, device=dev)
    c = NUCLEUS_CANDIDATES
    if c >= v or dev.type != "cpu":
        return truncate_sorted(logits, k, p)
    ranked, order = logits.topk(c, dim=-1)
    within_k = torch.arange(c, device=dev)[None, :] < k[:, None]
    # Each candidate's probability under its row's softmax (restricted to the top-k when k <= c).
    norm = torch.where(
        k >= v,
        torch.logsumexp(logits, dim=-1),
        torch.logsumexp(ranked.masked_fill(~within_k, float("-inf")), dim=-1),
    )
    probs = torch.exp(ranked - norm[:, None]).masked_fill_(~within_k, 0.0)
    cum = probs.cumsum(dim=-1)
    keep = within_k & (cum - probs <= p[:, None])  # mass strictly above: the first is always kept
    untouched = (k >= v) & p.isinf()  # neither top-k nor top-p
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, keep) | untouched[:, None]
    out = logits.masked_fill(~kept, float("-inf"))
    # Decided by the candidates: a top-k that ends among them, or a nucleus whose next token already
    # has more than top-p above it. The other rows are sorted whole.
    wide = ~((k <= c) | untouched | ((k >= v) & (cum[:, -1] > p)))
    if bool(wide.any()):
        rows = wide.nonzero().squeeze(1)
        out[rows] = truncate_sorted(logits[rows], k[rows], p[rows])
    return out


def truncate_sorted(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``truncate`` by sorting whole rows (``k [R]`` effective top-k, ``p [R]`` top-p, inf: off)."""
    v = logits.shape[1]
    ranked, order = logits.sort(dim=-1, descending=True)
    within_k = torch.arange(v, device=logits.device)[None, :] < k[:, None]
    probs = torch.softmax(ranked.masked_fill(~within_k, float("-inf")), dim=-1)
    keep = within_k & (probs.cumsum(dim=-1) - probs <= p[:, None])
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, keep)
    return logits.masked_fill(~kept, float("-inf"))
