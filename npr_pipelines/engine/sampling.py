"""Batched sampling with per-stream state.

Each row (one live stream) has its own CPU ``torch.Generator`` (seeded from the request seed and the
stream's path, so a branch's draws do not depend on what else is in the batch or on the device), its
own token history for the repetition penalty, and its request's immutable ``SamplingParams``.

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


class SampleRow(NamedTuple):
    params: SamplingParams
    generator: torch.Generator
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
            sorted_logits, order = proc.sort(dim=-1, descending=True)
            k = torch.tensor([kk if kk > 0 else v for kk in top_k], device=dev)
            remove = torch.arange(v, device=dev)[None, :] >= k[:, None]
            probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token: the first is always kept
            remove |= before > torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
            proc = torch.empty_like(proc).scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
        probs = torch.softmax(proc, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor(
            [
                0.0 if gr else torch.rand((), generator=row.generator).item()
                for row, gr in zip(rows, greedy, strict=True)
            ],
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
