"""Sequence-level rewards (``method.md`` §2.3, §4.3) and DAPO's soft overlong punishment (§2.1).

Rewards are pure functions of per-sequence facts that other components establish: correctness (the
grader), the V1 format score (``npr_pipelines.structure``) and emptiness. ``B`` = sequences.
The thin text-level helpers at the bottom compute the format score from the decoded response and
route through the same tensor function, so text and tensor forms cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from npr_pipelines.rl.registry import register_reward
from npr_pipelines.structure import format_score_v1

EMPTY_REWARD_STAGE1 = -2.0
EMPTY_REWARD_STAGE3 = 0.0


def _check_batch(name: str, x: torch.Tensor, b: int) -> None:
    if x.dim() != 1 or x.shape[0] != b:
        raise ValueError(f"{name} must have shape [{b}], got {tuple(x.shape)}")


@register_reward("format_gated_accuracy")
def format_gated_accuracy(
    *,
    correct: torch.Tensor,
    format_scores: torch.Tensor | None = None,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage-1 (NPR-Zero) reward as intended (``method.md`` §2.3), which the release left commented out.

    - empty response        -> -2
    - V1 format score F != 0 -> F (in [-2, 0); correctness ignored)
    - F == 0                 -> +1 if correct else -1

    Note the ordering this implies, kept as specified: a wrong answer with a small format deduction
    (e.g. F = -0.2) scores higher than a perfectly formatted wrong answer (-1).

    Args:
        correct: ``[B]`` bool, the grader's verdict.
        format_scores: ``[B]`` float, ``format_score_v1`` of each response (0 = perfect). Required.
        empty: ``[B]`` bool, the decoded response is the empty string. ``None`` = none is empty.

    Returns:
        ``[B]`` float rewards.
    """
    if format_scores is None:
        raise ValueError("format_gated_accuracy needs format_scores (V1 format score per response)")
    b = correct.shape[0]
    _check_batch("correct", correct, b)
    _check_batch("format_scores", format_scores, b)
    format_scores = format_scores.detach().to(torch.get_default_dtype())
    accuracy = torch.where(correct.bool(), 1.0, -1.0).to(format_scores.dtype)
    reward = torch.where(format_scores != 0, format_scores, accuracy)
    if empty is not None:
        _check_batch("empty", empty, b)
        reward = torch.where(empty.bool(), EMPTY_REWARD_STAGE1, reward)
    return reward


@register_reward("accuracy")
def accuracy_reward(
    *,
    correct: torch.Tensor,
    format_scores: torch.Tensor | None = None,
    empty: torch.Tensor | None = None,
    empty_reward: float = EMPTY_REWARD_STAGE3,
) -> torch.Tensor:
    """Accuracy-only reward: +1 correct, -1 otherwise (stage 3, ``method.md`` §4.3).

    ``format_scores`` is accepted for a uniform call signature and ignored: in stage 3 the structure is
    enforced by the engine and the structural filter, not by the reward. An empty response scores
    ``empty_reward``: 0.0 in the stage-3 release; ``empty_reward=-2.0`` reproduces what the stage-1
    release actually ran (format term switched off).

    Args:
        correct: ``[B]`` bool.
        format_scores: ignored.
        empty: ``[B]`` bool or ``None``.
        empty_reward: reward of an empty response.

    Returns:
        ``[B]`` float rewards.
    """
    del format_scores
    b = correct.shape[0]
    _check_batch("correct", correct, b)
    reward = torch.where(correct.bool(), 1.0, -1.0).to(torch.get_default_dtype())
    if empty is not None:
        _check_batch("empty", empty, b)
        reward = torch.where(empty.bool(), empty_reward, reward)
    return reward


def overlong_penalty(
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    overlong_buffer: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment: a linear penalty over the last ``overlong_buffer`` tokens.

    With ``L_exp = max_response_length - overlong_buffer``::

        penalty(L) = 0                                      if L <= L_exp
                   = -penalty_factor * (L - L_exp) / buffer  if L_exp < L <= max_response_length
                   = -penalty_factor                        if L > max_response_length

    Values: the DAPO paper uses ``max_response_length`` 20,480 with a 4,096-token buffer (factor 1);
    NPR stage 1 uses 30,000 with a 10-token buffer (factor 1), so only the last 10 tokens before the
    hard cap are penalised (≈ -1 for truncated samples); stage 3 disables it (``method.md`` §2.1, §4.3).

    Args:
        response_lengths: ``[B]`` int, response tokens generated (engine-inserted tokens included:
            they use up the same length budget).
        max_response_length: the hard cap on response tokens.
        overlong_buffer: width of the penalised zone, ``0 < overlong_buffer <= max_response_length``.
        penalty_factor: penalty at (and beyond) the hard cap, as a positive number.

    Returns:
        ``[B]`` float penalties in ``[-penalty_factor, 0]``; add them to the rewards.
    """
    if not 0 < overlong_buffer <= max_response_length:
        raise ValueError(f"need 0 < overlong_buffer <= max_response_length, got {overlong_buffer}")
    expected = max_response_length - overlong_buffer
    excess = response_lengths.to(torch.get_default_dtype()) - expected
    return -penalty_factor * (excess / overlong_buffer).clamp(min=0.0, max=1.0)


def format_gated_reward_text(response: str, correct: bool, *, release_bug: bool = False) -> float:
    """Stage-1 reward of one decoded response (special tokens skipped), given the grader's verdict.

    ``release_bug`` is passed to ``format_score_v1`` (the release's tag test on the last plan).
    """
    return float(format_gated_rewards_text([response], [correct], release_bug=release_bug)[0])


def format_gated_rewards_text(
    responses: Sequence[str], correct: Sequence[bool], *, release_bug: bool = False
) -> torch.Tensor:
    """Stage-1 rewards ``[B]`` of decoded responses; empty means exactly ``""`` as in the release."""
    if len(responses) != len(correct):
        raise ValueError(f"{len(responses)} responses but {len(correct)} correctness flags")
    scores = [0.0 if r == "" else format_score_v1(r, release_bug=release_bug) for r in responses]
    return format_gated_accuracy(
        correct=torch.tensor(list(correct), dtype=torch.bool).reshape(-1),
        format_scores=torch.tensor(scores, dtype=torch.get_default_dtype()).reshape(-1),
        empty=torch.tensor([r == "" for r in responses], dtype=torch.bool).reshape(-1),
    )


@register_reward("format_gated_accuracy_ranked")
def format_gated_accuracy_ranked(
    *,
    correct: torch.Tensor,
    format_scores: torch.Tensor | None = None,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """``format_gated_accuracy`` with every format failure ranked below every format-valid response.

    The stage-1 reward as specified puts a V1 deduction ``F`` in ``[-2, 0)`` on the scale of the
    accuracy term ``±1``, so a response with a small deduction (``F = -0.2``) out-earns a perfectly
    formatted wrong answer (-1), and a step-count failure (-1.0) earns the same. While the policy's
    accuracy inside the format is below ``(1 + F) / 2`` RL is then paid to break the format (on the
    toy world, whose base model is ~13% accurate in the format, validity rose then fell). Shifting
    failures by -1 (``F - 1`` in ``[-3, -1)``, empty -3) keeps V1's shaping among failures and the
    gate (accuracy counts only when the format passes) and restores: valid+correct (+1) > valid+wrong
    (-1) > any failure.

    Args:
        correct: ``[B]`` bool.
        format_scores: ``[B]`` float V1 scores (0 = perfect). Required.
        empty: ``[B]`` bool or None.

    Returns:
        ``[B]`` float rewards.
    """
    reward = format_gated_accuracy(correct=correct, format_scores=format_scores, empty=empty)
    failed = format_scores != 0
    if empty is not None:
        failed = failed | empty.bool()
    return torch.where(failed, reward - 1.0, reward)
