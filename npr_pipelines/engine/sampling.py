"""Batched sampling with per-stream state.

Each row (one live stream) has its own CPU ``torch.Generator`` (seeded from the request seed and the
stream's path, so a branch's draws do not depend on what else is in the batch or on the device), its
own token history for the repetition penalty, and its request's immutable ``SamplingParams``.

Order: log-probs are captured first, as ``log_softmax(logits / temperature)`` of the model's logits
(temperature 1 when greedy); then repetition penalty, the request's logits hook, temperature, top-k,
top-p; then one uniform draw per row and an inverse-CDF pick (argmax when greedy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from npr_pipelines.engine.flow import Stream, StreamKind
from npr_pipelines.engine.types import LogitsHook, SamplingParams


@dataclass(frozen=True)
class SampleRow:
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
    temps = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype, device=dev)
    greedy = temps == 0
    t_eff = torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    logp = torch.log_softmax(logits / t_eff, dim=-1)

    proc = logits.clone()
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if row.stream.kind is StreamKind.BRANCH and row.params.branch_repetition_penalty is not None:
            penalty = row.params.branch_repetition_penalty
        apply_repetition_penalty(proc[i], row.stream.tokens[row.stream.n_prompt :], penalty)
        if row.hook is not None:
            proc[i] = row.hook(row.stream, proc[i])
    proc = proc / t_eff

    top_k = [row.params.top_k for row in rows]
    top_p = [row.params.top_p for row in rows]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = proc.sort(dim=-1, descending=True)
        k = torch.tensor([kk if kk > 0 else v for kk in top_k], device=dev)
        remove = torch.arange(v, device=dev)[None, :] >= k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token: the first is always kept
        remove |= before > torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
        proc = torch.empty_like(proc).scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))

    chosen = proc.argmax(dim=-1)
    if not bool(greedy.all()):
        probs = torch.softmax(proc, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor(
            [
                0.0 if row.params.temperature == 0 else torch.rand((), generator=row.generator).item()
                for row in rows
            ],
            dtype=cdf.dtype,
            device=dev,
        )
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=v - 1)
        chosen = torch.where(greedy, chosen, drawn)
    lp = logp.gather(1, chosen[:, None])[:, 0]
    return chosen.tolist(), lp.tolist()
