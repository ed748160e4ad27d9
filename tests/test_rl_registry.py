"""The RL registries: what is registered, unknown names list the valid ones, duplicates are refused."""

from __future__ import annotations

import pytest

import npr_pipelines.rl as rl
from npr_pipelines.rl import Registry, UnknownNameError


def test_registered_names() -> None:
    assert rl.REWARDS.names() == ("accuracy", "format_gated_accuracy", "format_gated_accuracy_ranked")
    assert rl.ADVANTAGES.names() == ("grpo", "grpo_no_std", "papo")
    assert rl.POLICY_LOSSES.names() == ("dapo", "papo")
    assert rl.LOSS_AGGREGATIONS.names() == ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean")


def test_lookups_return_the_registered_functions() -> None:
    assert rl.get_reward("format_gated_accuracy") is rl.format_gated_accuracy
    assert rl.get_reward("accuracy") is rl.accuracy_reward
    assert rl.get_advantage("grpo") is rl.grpo_advantage
    assert rl.get_advantage("grpo_no_std") is rl.grpo_no_std_advantage
    assert rl.get_advantage("papo") is rl.papo_advantage
    assert rl.get_policy_loss("dapo") is rl.dapo_policy_loss
    assert rl.get_policy_loss("papo") is rl.papo_policy_loss
    assert rl.get_loss_agg("token-mean") is rl.token_mean


@pytest.mark.parametrize(
    ("getter", "registry"),
    [
        (rl.get_reward, rl.REWARDS),
        (rl.get_advantage, rl.ADVANTAGES),
        (rl.get_policy_loss, rl.POLICY_LOSSES),
        (rl.get_loss_agg, rl.LOSS_AGGREGATIONS),
    ],
)
def test_unknown_name_lists_valid_names(getter, registry: Registry) -> None:
    for exc_type in (KeyError, ValueError, UnknownNameError):
        with pytest.raises(exc_type):
            getter("no-such-thing")
    with pytest.raises(KeyError) as info:
        getter("no-such-thing")
    message = str(info.value)
    assert "'no-such-thing'" in message
    assert all(repr(name) in message for name in registry.names())


def test_duplicate_registration_of_another_function_is_refused() -> None:
    reg: Registry = Registry("widget")

    @reg.register("a")
    def a() -> int:
        return 1

    reg.register("a")(a)  # the same function again: a no-op (e.g. a module reload)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    assert reg.get("a") is a
    assert "a" in reg and "b" not in reg
    assert list(reg) == ["a"] and len(reg) == 1
