"""The RL algorithm core: rewards, advantages, policy losses and batch assembly as pure tensor
functions behind name registries (in the style of verl's ``core_algos.py``).

Stage 1 (NPR-Zero, DAPO): reward ``format_gated_accuracy`` (+ ``overlong_penalty``), dynamic sampling
(``filter_mixed_groups`` / ``accumulate_groups``), advantage ``grpo``, loss ``dapo`` with ``token-mean``.
Stage 3 (PAPO): reward ``accuracy``, advantage ``papo``, loss ``papo``.
"""

from npr_pipelines.rl.advantages import (
    GroupStats,
    broadcast_to_tokens,
    group_index,
    group_stats,
    grpo_advantage,
    grpo_no_std_advantage,
    papo_advantage,
)
from npr_pipelines.rl.losses import (
    dapo_policy_loss,
    loss_mask,
    masked_mean,
    papo_policy_loss,
    seq_mean_token_mean,
    seq_mean_token_sum,
    token_mean,
)
from npr_pipelines.rl.registry import (
    ADVANTAGES,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    REWARDS,
    Registry,
    UnknownNameError,
    get_advantage,
    get_loss_agg,
    get_policy_loss,
    get_reward,
    register_advantage,
    register_loss_agg,
    register_policy_loss,
    register_reward,
)
from npr_pipelines.rl.rewards import (
    accuracy_reward,
    format_gated_accuracy,
    format_gated_accuracy_ranked,
    format_gated_reward_text,
    format_gated_rewards_text,
    overlong_penalty,
)
from npr_pipelines.rl.sampling import (
    Accumulated,
    GroupFilter,
    accumulate_groups,
    filter_mixed_groups,
    overlong_filter_mask,
    truncate_to_multiple,
)

__all__ = [
    "ADVANTAGES",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "REWARDS",
    "Accumulated",
    "GroupFilter",
    "GroupStats",
    "Registry",
    "UnknownNameError",
    "accumulate_groups",
    "accuracy_reward",
    "broadcast_to_tokens",
    "dapo_policy_loss",
    "filter_mixed_groups",
    "format_gated_accuracy",
    "format_gated_accuracy_ranked",
    "format_gated_reward_text",
    "format_gated_rewards_text",
    "get_advantage",
    "get_loss_agg",
    "get_policy_loss",
    "get_reward",
    "group_index",
    "group_stats",
    "grpo_advantage",
    "grpo_no_std_advantage",
    "loss_mask",
    "masked_mean",
    "overlong_filter_mask",
    "overlong_penalty",
    "papo_advantage",
    "papo_policy_loss",
    "register_advantage",
    "register_loss_agg",
    "register_policy_loss",
    "register_reward",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "token_mean",
    "truncate_to_multiple",
]
