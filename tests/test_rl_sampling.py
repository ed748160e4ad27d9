"""DAPO dynamic sampling keeps exactly the mixed groups; accumulation, truncation, overlong filtering."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npr_pipelines.rl import (
    accumulate_groups,
    filter_mixed_groups,
    overlong_filter_mask,
    truncate_to_multiple,
)


def G(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def R(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_filter_hand_example() -> None:
    groups = G(0, 0, 0, 1, 1, 1, 2, 2, 2, 3)
    rewards = R(1, 1, 1, -1, 1, -1, -1, -1, -1, 1)  # all right, mixed, all wrong, singleton
    result = filter_mixed_groups(groups, rewards, target_groups=4)
    assert result.kept.tolist() == [3, 4, 5, 9]
    assert result.kept_groups.tolist() == [1, 3]
    assert result.dropped_groups.tolist() == [0, 2]
    assert (result.num_kept_groups, result.num_dropped_groups, result.refill) == (2, 2, 2)

    strict = filter_mixed_groups(groups, rewards, target_groups=1, keep_singletons=False)
    assert strict.kept.tolist() == [3, 4, 5]
    assert strict.dropped_groups.tolist() == [0, 2, 3]
    assert strict.refill == 0


def test_filter_interleaved_groups_and_graded_rewards() -> None:
    # Groups need not be contiguous; stage-1 rewards are not only ±1 (format deductions).
    result = filter_mixed_groups(G(5, 7, 5, 7, 9, 9), R(-0.2, 1, -0.4, 1, -0.2, -0.2))
    assert result.kept.tolist() == [0, 2]
    assert result.dropped_groups.tolist() == [7, 9]
    assert result.refill == 0
    assert filter_mixed_groups(G(5, 5), R(-0.2, -0.4), atol=0.5).kept.tolist() == []
    with pytest.raises(ValueError):
        filter_mixed_groups(G(0, 0), R(1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from([-1.0, 1.0, -0.4])), min_size=1, max_size=24),
    st.booleans(),
)
def test_filter_keeps_exactly_the_mixed_groups(rows: list[tuple[int, float]], keep_singletons: bool) -> None:
    groups = G(*(g for g, _ in rows))
    rewards = R(*(r for _, r in rows))
    members: dict[int, list[float]] = {}
    for g, r in rows:
        members.setdefault(g, []).append(r)
    keep = {g for g, rs in members.items() if len(set(rs)) > 1 or (keep_singletons and len(rs) == 1)}
    result = filter_mixed_groups(groups, rewards, target_groups=4, keep_singletons=keep_singletons)
    assert result.kept.tolist() == [i for i, (g, _) in enumerate(rows) if g in keep]
    assert result.kept_groups.tolist() == sorted(keep)
    assert result.dropped_groups.tolist() == sorted(set(members) - keep)
    assert result.refill == max(0, 4 - len(keep))


def batches(*specs: tuple[list[int], list[float]], pulled: list[int]) -> Iterator:
    for i, (g, r) in enumerate(specs):
        pulled.append(i)
        yield f"batch{i}", G(*g), R(*r)


def test_accumulate_until_target_and_no_further() -> None:
    pulled: list[int] = []
    specs = (
        ([0, 0, 1, 1], [1, -1, 1, 1]),  # 1 mixed group
        ([0, 0, 1, 1], [1, 1, -1, -1]),  # none
        ([0, 0, 1, 1], [-1, 1, 1, -1]),  # 2 mixed: target 3 reached, overshoot kept
        ([0, 0], [1, -1]),  # never pulled
    )
    acc = accumulate_groups(batches(*specs, pulled=pulled), target_groups=3)
    assert acc.reached and pulled == [0, 1, 2]
    assert [(p, k.tolist()) for p, k in acc.parts] == [
        ("batch0", [0, 1]),
        ("batch1", []),
        ("batch2", [0, 1, 2, 3]),
    ]
    assert (acc.num_batches, acc.num_groups, acc.num_dropped_groups, acc.num_rollouts) == (3, 3, 3, 6)


def test_accumulate_cap_and_exhaustion() -> None:
    specs = (([0, 0], [1, 1]), ([0, 0], [1, -1]))
    with pytest.raises(RuntimeError, match="max_batches=1"):
        accumulate_groups(batches(*specs, pulled=[]), target_groups=2, max_batches=1)
    acc = accumulate_groups(batches(*specs, pulled=[]), target_groups=2)
    assert not acc.reached and acc.num_groups == 1 and acc.num_batches == 2
    with pytest.raises(ValueError):
        accumulate_groups(iter(()), target_groups=0)


def test_truncate_to_multiple() -> None:
    idx = torch.arange(21)
    assert truncate_to_multiple(idx, 8).tolist() == list(range(16))
    assert truncate_to_multiple(idx, 1).tolist() == list(range(21))
    assert truncate_to_multiple(idx[:5], 8).tolist() == []
    with pytest.raises(ValueError):
        truncate_to_multiple(idx, 0)


def test_overlong_filter_mask() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = overlong_filter_mask(mask, torch.tensor([False, True]))
    assert got.tolist() == [[True, True, False], [False, False, False]]
    with pytest.raises(ValueError):
        overlong_filter_mask(mask, torch.tensor([True]))
