"""Rewards against hand-computed values: stage-1 format-gated accuracy, stage-3 accuracy, DAPO overlong."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from npr_pipelines.rl import (
    accuracy_reward,
    format_gated_accuracy,
    format_gated_reward_text,
    format_gated_rewards_text,
    get_reward,
    overlong_penalty,
)

# A perfectly formatted V1 trace (see tests/test_structure_scores.py) and a badly formatted one.
PERFECT = (
    "<guideline><plan>1: aaa</plan><plan>2: bbb</plan></guideline>"
    "<step>1: xxxxx</step><step>2: yyyyy</step><takeaway>merged it</takeaway>so \\boxed{5}"
)
NO_BLOCK = "just \\boxed{5}"  # V1 = -1.5
SHORT_TAKEAWAY = PERFECT.replace("merged it", "ok")  # V1 = -0.4


def B(*xs: bool) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.bool)


def F(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_format_gated_accuracy_hand_values() -> None:
    reward = format_gated_accuracy(
        correct=B(True, False, True, False, True, False),
        format_scores=F(0.0, 0.0, -0.2, -1.5, 0.0, -1.0),
        empty=B(False, False, False, False, True, True),
    )
    # perfect+correct, perfect+wrong, format deduction wins over correctness (both ways), empty twice.
    assert_close(reward, F(1.0, -1.0, -0.2, -1.5, -2.0, -2.0))


def test_format_gated_accuracy_without_empty_flags_and_via_registry() -> None:
    kwargs = {"correct": B(True, False), "format_scores": F(0.0, -0.4)}
    assert_close(format_gated_accuracy(**kwargs), F(1.0, -0.4))
    assert_close(get_reward("format_gated_accuracy")(**kwargs, empty=None), F(1.0, -0.4))


def test_format_gated_accuracy_input_checks() -> None:
    with pytest.raises(ValueError, match="format_scores"):
        format_gated_accuracy(correct=B(True))
    with pytest.raises(ValueError, match="shape"):
        format_gated_accuracy(correct=B(True, False), format_scores=F(0.0))
    with pytest.raises(ValueError, match="shape"):
        format_gated_accuracy(correct=B(True), format_scores=F(0.0), empty=B(True, True))


def test_accuracy_reward_hand_values() -> None:
    correct = B(True, False, True, False)
    assert_close(accuracy_reward(correct=correct), F(1.0, -1.0, 1.0, -1.0))
    # The format score is ignored in stage 3; an empty response scores 0 as in the stage-3 release.
    empty = B(False, False, True, True)
    assert_close(
        accuracy_reward(correct=correct, format_scores=F(-1, -1, -1, -1), empty=empty), F(1, -1, 0, 0)
    )
    # empty_reward=-2 is what the stage-1 release actually ran.
    assert_close(accuracy_reward(correct=correct, empty=empty, empty_reward=-2.0), F(1, -1, -2, -2))


def test_text_helper_calls_v1_and_matches_the_tensor_form() -> None:
    assert format_gated_reward_text(PERFECT, True) == 1.0
    assert format_gated_reward_text(PERFECT, False) == -1.0
    assert format_gated_reward_text(NO_BLOCK, True) == -1.5
    assert format_gated_reward_text(SHORT_TAKEAWAY, True) == pytest.approx(-0.4)
    assert format_gated_reward_text("", True) == -2.0
    rewards = format_gated_rewards_text([PERFECT, NO_BLOCK, "", SHORT_TAKEAWAY], [False, False, True, True])
    assert_close(rewards, F(-1.0, -1.5, -2.0, -0.4))
    with pytest.raises(ValueError, match="correctness"):
        format_gated_rewards_text([PERFECT], [True, False])


@pytest.mark.parametrize(
    ("length", "penalty"),
    [(0, 0.0), (29_990, 0.0), (29_991, -0.1), (29_995, -0.5), (30_000, -1.0), (30_050, -1.0)],
)
def test_overlong_penalty_npr_stage1_values(length: int, penalty: float) -> None:
    got = overlong_penalty(torch.tensor([length]), max_response_length=30_000, overlong_buffer=10)
    assert_close(got, F(penalty))


def test_overlong_penalty_dapo_paper_values_and_factor() -> None:
    lengths = torch.tensor([16_384, 18_432, 20_480])  # L_max 20,480, L_cache 4,096
    got = overlong_penalty(lengths, max_response_length=20_480, overlong_buffer=4_096)
    assert_close(got, F(0.0, -0.5, -1.0))
    got = overlong_penalty(lengths, max_response_length=20_480, overlong_buffer=4_096, penalty_factor=0.5)
    assert_close(got, F(0.0, -0.25, -0.5))
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_response_length=100, overlong_buffer=0)
