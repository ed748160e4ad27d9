"""Advantage estimators against hand-computed values, and the intended PAPO formula vs the release's."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from npr_pipelines.rl import (
    broadcast_to_tokens,
    get_advantage,
    group_index,
    group_stats,
    grpo_advantage,
    grpo_no_std_advantage,
    papo_advantage,
)

EPS = 1e-6


def R(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def G(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def test_group_index_numbers_keys_by_first_appearance() -> None:
    assert group_index(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_group_stats_hand_values() -> None:
    stats = group_stats(R(1, -1, 1, 1, 0.5), G(7, 7, 3, 3, 9))
    assert_close(stats.size, R(2, 2, 2, 2, 1))
    assert_close(stats.mean, R(0, 0, 1, 1, 0.5))
    assert_close(stats.std, R(math.sqrt(2), math.sqrt(2), 0, 0, 0))  # unbiased


def test_grpo_hand_values() -> None:
    # Mixed group, uniform group (advantage 0), singleton (mean 0, std 1: advantage = reward).
    adv = grpo_advantage(R(1, -1, 1, 1, 0.5), G(0, 0, 1, 1, 2))
    s = math.sqrt(2) + EPS
    assert_close(adv, R(1 / s, -1 / s, 0, 0, 0.5 / (1 + EPS)))
    # Groups need not be contiguous.
    assert_close(grpo_advantage(R(1, 1, -1, 1), G(4, 2, 4, 2)), R(1 / s, 0, -1 / s, 0))


def test_grpo_no_std_hand_values() -> None:
    adv = grpo_no_std_advantage(R(1, -1, 1, 1, 0.5, 1, 0, 0), G(0, 0, 1, 1, 2, 3, 3, 3))
    assert_close(adv, R(1, -1, 0, 0, 0.5, 2 / 3, -1 / 3, -1 / 3))


def test_papo_hand_values() -> None:
    # Group means 0, 1 and a singleton (baseline 0); ONE batch std: mean 0.2, SS 4.8, var 1.2.
    adv = papo_advantage(R(1, -1, 1, 1, -1), G(0, 0, 1, 1, 2))
    s = math.sqrt(1.2) + EPS
    assert_close(adv, R(1 / s, -1 / s, 0, 0, -1 / s))


def test_papo_degenerate_batch_scale_is_one() -> None:
    # One rollout: no std. All rewards equal: std 0, and the singleton's -1 / eps would be -1e6.
    assert_close(papo_advantage(R(1), G(0)), R(1 / (1 + EPS)))
    assert_close(papo_advantage(R(-1, -1, -1), G(0, 0, 1)), R(0, 0, -1 / (1 + EPS)))
    assert_close(papo_advantage(R(1, 1, 1, 1), G(0, 0, 1, 1)), R(0, 0, 0, 0))


def release_papo_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The release's loop as ``method.md`` §4.5 describes it: group means from the raw rewards, then
    an in-place division whose batch std is recomputed over the partly overwritten vector."""
    scores = rewards.clone()
    means = {}
    for g in group_ids.unique().tolist():
        members = rewards[group_ids == g]
        means[g] = members.mean() if members.numel() > 1 else torch.tensor(0.0)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - means[int(group_ids[i])]) / (torch.std(scores) + eps)
    return scores


def test_papo_uses_one_batch_std_unlike_the_release() -> None:
    # Two groups of four, as after structural filtering: 3/4 correct and 1/4 correct.
    rewards = R(1, 1, 1, -1, -1, -1, -1, 1)
    groups = G(0, 0, 0, 0, 1, 1, 1, 1)
    intended = papo_advantage(rewards, groups)
    # Batch mean 0, SS 8, unbiased var 8/7: every rollout shares this divisor.
    s = math.sqrt(8 / 7) + EPS
    assert_close(intended, R(0.5, 0.5, 0.5, -1.5, -0.5, -0.5, -0.5, 1.5) / s)

    release = release_papo_advantage(rewards, groups)
    assert_close(release[0], intended[0])  # the first division still sees the raw rewards
    assert not torch.allclose(release, intended, atol=1e-3)
    numerators = R(0.5, 0.5, 0.5, -1.5, -0.5, -0.5, -0.5, 1.5)
    release_divisors = numerators / release
    assert_close(numerators / intended, torch.full((8,), s))
    drift = (release_divisors.max() - release_divisors.min()) / s
    assert drift > 0.05  # the release's effective divisor wanders by more than 5 % across the batch


@pytest.mark.parametrize("name", ["grpo", "grpo_no_std", "papo"])
def test_advantages_are_detached_and_accept_int_rewards(name: str) -> None:
    rewards = R(1, -1, 1, 1).requires_grad_()
    adv = get_advantage(name)(rewards, G(0, 0, 1, 1))
    assert not adv.requires_grad
    assert_close(get_advantage(name)(torch.tensor([1, -1, 1, 1]), G(0, 0, 1, 1)), adv)
    with pytest.raises(ValueError):
        get_advantage(name)(rewards, G(0, 0, 1))


def test_broadcast_to_tokens() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = broadcast_to_tokens(R(2.0, -0.5, 3.0), mask)
    assert_close(got, torch.tensor([[0, 2.0, 2.0, 0], [-0.5, -0.5, -0.5, -0.5], [0, 0, 0, 0]]))
    assert_close(broadcast_to_tokens(R(2.0, -0.5, 3.0), mask.float()), got)
    with pytest.raises(ValueError):
        broadcast_to_tokens(R(1.0), mask)
