"""Outcome advantages from one scalar reward per sequence (``method.md`` §2.1, §4.5).

All estimators map ``rewards [B]`` and ``group_ids [B]`` (which prompt each rollout answers) to
``advantages [B]``; :func:`broadcast_to_tokens` then puts each sequence's value on its response
tokens. Advantages carry no gradient. Stds are unbiased (torch's default, as in verl).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from npr_pipelines.rl.registry import register_advantage

DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class GroupStats:
    """Per-rollout view of its group's statistics, all ``[B]``."""

    size: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def group_index(keys: Sequence[Hashable]) -> torch.Tensor:
    """``[B]`` int64 group ids from arbitrary keys (e.g. prompt uids), numbered by first appearance."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def _as_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    rewards = rewards.detach()
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Size, mean and unbiased std of each rollout's group, gathered back to ``[B]``.

    A group of one has std 0 here; the estimators decide what a singleton means.

    Args:
        rewards: ``[B]`` float.
        group_ids: ``[B]`` int, equal ids = same prompt.
    """
    rewards = _as_rewards(rewards, group_ids)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = rewards.new_zeros(n_groups)
    size = zeros.index_add(0, inverse, torch.ones_like(rewards))
    mean = zeros.index_add(0, inverse, rewards) / size
    sq_dev = zeros.index_add(0, inverse, (rewards - mean[inverse]) ** 2)
    std = (sq_dev / (size - 1).clamp(min=1)).sqrt()
    return GroupStats(size=size[inverse], mean=mean[inverse], std=std[inverse])


@register_advantage("grpo")
def grpo_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """GRPO group normalisation: ``(r - group mean) / (group std + eps)`` (stage 1, ``method.md`` §2.1).

    A singleton group uses mean 0 and std 1 (verl's convention), so its advantage is its reward.
    A group with identical rewards gets 0 (the numerator is exactly 0).

    Args:
        rewards: ``[B]`` float.
        group_ids: ``[B]`` int.
        eps: added to the std.

    Returns:
        ``[B]`` advantages.
    """
    rewards = _as_rewards(rewards, group_ids)
    stats = group_stats(rewards, group_ids)
    single = stats.size == 1
    mean = torch.where(single, 0.0, stats.mean)
    std = torch.where(single, 1.0, stats.std)
    return (rewards - mean) / (std + eps)


@register_advantage("grpo_no_std")
def grpo_no_std_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """GRPO without the std scale: ``r - group mean`` (Dr. GRPO, arXiv 2503.20783).

    A singleton group uses mean 0. ``eps`` is unused (uniform signature).

    Args:
        rewards: ``[B]`` float.
        group_ids: ``[B]`` int.

    Returns:
        ``[B]`` advantages.
    """
    del eps
    rewards = _as_rewards(rewards, group_ids)
    stats = group_stats(rewards, group_ids)
    return rewards - torch.where(stats.size == 1, 0.0, stats.mean)


@register_advantage("papo")
def papo_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """PAPO "batch-level normalisation": ``(r - group mean) / (batch std + eps)`` (``method.md`` §4.5).

    The baseline is per group (0 for a group of one); the scale is ONE number, the unbiased std of
    the raw rewards of the whole (filtered) batch, computed once before any division. The release
    divides in place inside a loop and recomputes the std over the partly overwritten vector, so its
    divisor drifts across the batch (§7.6); this is the intended formula, not that.

    Structural filtering removes rollouts unevenly, leaving small or uniform groups whose own std is
    0 or noisy; the shared batch scale keeps advantages comparable across groups (§4.1).

    Degenerate scale: when the batch std is 0 (all rewards equal) or undefined (one rollout), only
    singleton groups have a nonzero numerator, and dividing it by ``eps`` would make a ±1e6
    advantage (the release does that); the scale is 1 instead, so the advantage is the reward.

    Args:
        rewards: ``[B]`` float, the rewards of the rollouts that survived filtering.
        group_ids: ``[B]`` int.
        eps: added to the batch std (1e-6 in the release).

    Returns:
        ``[B]`` advantages.
    """
    rewards = _as_rewards(rewards, group_ids)
    stats = group_stats(rewards, group_ids)
    baseline = torch.where(stats.size == 1, 0.0, stats.mean)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    batch_std = torch.where(batch_std > 0, batch_std, 1.0)
    return (rewards - baseline) / (batch_std + eps)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's advantage on its response tokens.

    Args:
        advantages: ``[B]``.
        mask: ``[B, T]`` bool or 0/1 float, the tokens that carry the advantage.

    Returns:
        ``[B, T]``: ``advantages[b]`` where ``mask[b, t]``, else 0.
    """
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"need advantages [B] and mask [B, T], got {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    return torch.where(mask.bool(), advantages.detach()[:, None], 0.0).to(advantages.dtype)
