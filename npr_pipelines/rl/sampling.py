"""Batch assembly: DAPO dynamic sampling (stage 1, ``method.md`` §2.1), DAPO overlong filtering and
the release's multiple-of-N truncation (§4.4, §7.16).

Dynamic sampling: a prompt group whose rollouts all got the same reward (all correct or all wrong)
has zero group-relative advantage and so contributes no gradient, only noise in the token count.
DAPO drops such groups and keeps generating until enough informative groups are collected.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class GroupFilter:
    """Result of :func:`filter_mixed_groups` on one batch of ``B`` rollouts."""

    kept: torch.Tensor
    """``[K]`` int64, ascending indices of the rollouts in kept groups."""
    kept_groups: torch.Tensor
    """``[G_kept]`` the group ids kept, ascending."""
    dropped_groups: torch.Tensor
    """``[G_dropped]`` the group ids dropped (zero reward variance), ascending."""
    refill: int
    """Groups still missing to reach the target (0 when met or no target was given)."""

    @property
    def num_kept_groups(self) -> int:
        return int(self.kept_groups.numel())

    @property
    def num_dropped_groups(self) -> int:
        return int(self.dropped_groups.numel())


def filter_mixed_groups(
    group_ids: torch.Tensor,
    rewards: torch.Tensor,
    *,
    target_groups: int = 0,
    keep_singletons: bool = True,
    atol: float = 0.0,
) -> GroupFilter:
    """Keep the groups whose rewards vary (DAPO "filter groups"); report how many groups to refill.

    A group is dropped when ``max - min <= atol`` over its rewards. A group of one rollout has no
    variance to speak of; it is kept by default, as verl does (its GRPO advantage is its reward).

    Args:
        group_ids: ``[B]`` int, equal ids = same prompt.
        rewards: ``[B]`` float, the metric filtered on (the final sequence reward).
        target_groups: groups wanted; ``refill = max(0, target_groups - kept groups)``.
        keep_singletons: keep groups of size one.
        atol: reward spread at or below which a group counts as uniform.

    Returns:
        A :class:`GroupFilter`.
    """
    if group_ids.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"group_ids and rewards must both be [B], got {tuple(group_ids.shape)} and {tuple(rewards.shape)}"
        )
    rewards = rewards.detach().to(torch.float64)
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    n = uniq.numel()
    hi = rewards.new_full((n,), -torch.inf).scatter_reduce(0, inverse, rewards, "amax")
    lo = rewards.new_full((n,), torch.inf).scatter_reduce(0, inverse, rewards, "amin")
    size = torch.zeros(n, dtype=torch.long).index_add(0, inverse, torch.ones_like(inverse))
    keep_group = (hi - lo) > atol
    if keep_singletons:
        keep_group |= size == 1
    kept = torch.nonzero(keep_group[inverse]).flatten()
    return GroupFilter(
        kept=kept,
        kept_groups=uniq[keep_group],
        dropped_groups=uniq[~keep_group],
        refill=max(0, target_groups - int(keep_group.sum())),
    )


@dataclass
class Accumulated(Generic[T]):
    """What :func:`accumulate_groups` collected: each batch with the indices kept from it."""

    parts: list[tuple[T, torch.Tensor]] = field(default_factory=list)
    num_batches: int = 0
    num_groups: int = 0
    num_dropped_groups: int = 0
    reached: bool = False

    @property
    def num_rollouts(self) -> int:
        return sum(int(kept.numel()) for _, kept in self.parts)


def accumulate_groups(
    batches: Iterable[tuple[T, torch.Tensor, torch.Tensor]],
    target_groups: int,
    *,
    max_batches: int = 0,
    keep_singletons: bool = True,
) -> Accumulated[T]:
    """Pull generation batches until at least ``target_groups`` mixed groups have been kept.

    Consumes ``batches`` lazily, so it can be a generator that runs rollouts on demand. Every kept
    rollout of every pulled batch is returned, so the result can overshoot the target (stage 1
    trains on all of them, §2.1); cut it with :func:`truncate_to_multiple` if needed.

    Args:
        batches: iterable of ``(payload, group_ids [B], rewards [B])``; the payload is opaque here.
            Group ids only need to be unique within their batch.
        target_groups: mixed groups wanted (32 prompts in stage 1).
        max_batches: give up after this many batches; 0 = no cap (the release's setting).
        keep_singletons: see :func:`filter_mixed_groups`.

    Returns:
        An :class:`Accumulated`; ``reached`` is False if ``batches`` ran out first.

    Raises:
        RuntimeError: ``max_batches`` batches were pulled without reaching the target (the data is
            too easy or too hard for the policy; verl raises here too).
    """
    if target_groups < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    acc: Accumulated[T] = Accumulated()
    for payload, group_ids, rewards in batches:
        result = filter_mixed_groups(group_ids, rewards, keep_singletons=keep_singletons)
        acc.parts.append((payload, result.kept))
        acc.num_batches += 1
        acc.num_groups += result.num_kept_groups
        acc.num_dropped_groups += result.num_dropped_groups
        if acc.num_groups >= target_groups:
            acc.reached = True
            return acc
        if max_batches and acc.num_batches >= max_batches:
            raise RuntimeError(
                f"dynamic sampling kept {acc.num_groups}/{target_groups} groups after {acc.num_batches} "
                f"batches (max_batches={max_batches}); {acc.num_dropped_groups} groups had uniform rewards"
            )
    return acc


def truncate_to_multiple(indices: torch.Tensor, multiple: int) -> torch.Tensor:
    """The first ``multiple * floor(len / multiple)`` of ``indices [K]``.

    The release cuts every RL batch to a multiple of 8 rollouts so it splits evenly over 8 GPUs,
    silently dropping up to 7 trailing rollouts (§4.4, §7.16). ``multiple=1`` keeps everything.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return indices[: indices.shape[0] // multiple * multiple]


def overlong_filter_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: train on no token of a rollout cut off by the length limit.

    A truncated response has no final answer, so its reward says nothing about its reasoning.
    NPR does not use this (stage 1 uses the soft penalty, ``rewards.overlong_penalty``; stage 3 drops
    over-length rollouts outright).

    Args:
        mask: ``[B, T]`` loss mask.
        truncated: ``[B]`` bool, the rollout hit the length limit.

    Returns:
        ``[B, T]`` bool.
    """
    if mask.dim() != 2 or truncated.shape != mask.shape[:1]:
        raise ValueError(
            f"need mask [B, T] and truncated [B], got {tuple(mask.shape)}, {tuple(truncated.shape)}"
        )
    return mask.bool() & ~truncated.bool()[:, None]
