"""Name -> function registries for the RL algorithm core, one per kind (after verl's ``core_algos.py``).

Every registered function is pure: tensors in, tensors out, no module state, no I/O. A trainer picks
its algorithm by name from the run config::

    reward_fn = get_reward("format_gated_accuracy")
    adv_fn = get_advantage("papo")
    loss_fn = get_policy_loss("papo")

Looking up an unknown name raises :class:`UnknownNameError` (both a ``KeyError`` and a
``ValueError``) whose message lists the valid names. Registering a *different* function under a name
that is taken raises ``ValueError``; re-registering the same function is a no-op (module reloads).

The call contracts (all shapes: ``B`` = sequences in the batch, ``T`` = padded response length):

- reward:      ``fn(*, correct [B] bool, format_scores [B] | None, empty [B] bool | None, **params) -> [B]``
- advantage:   ``fn(rewards [B], group_ids [B] int, *, eps, **params) -> [B]``
- policy loss: ``fn(logp [B,T], old_logp [B,T] | None, advantages [B,T], mask [B,T], *, agg_mode,
  denominator, **params) -> (scalar loss, metrics: dict[str, 0-d tensor])``. A token whose advantage is
  0 must add 0 to the gradient (no KL or entropy term): the trainer leaves zero-advantage sequences
  out of the backward pass (``RLConfig.skip_zero_advantage``).
- loss aggregation: ``fn(loss_mat [B,T], mask [B,T], *, denominator) -> scalar``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


class UnknownNameError(KeyError, ValueError):
    """An unregistered name was looked up. Catchable as ``KeyError`` or ``ValueError``."""

    def __str__(self) -> str:
        # KeyError's default __str__ repr-quotes the message, which garbles the list of names.
        return str(self.args[0])


class Registry(Generic[F]):
    """A name -> function table for one kind of algorithm component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged."""

        def decorator(fn: F) -> F:
            existing = self._fns.get(name)
            if existing is not None and existing is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered to {existing!r}; not {fn!r}")
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered under ``name``; raises :class:`UnknownNameError` listing valid names."""
        try:
            return self._fns[name]
        except KeyError:
            valid = ", ".join(repr(n) for n in self.names())
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._fns))

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._fns)


class RewardFn(Protocol):
    def __call__(
        self,
        *,
        correct: torch.Tensor,
        format_scores: torch.Tensor | None = None,
        empty: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class AdvantageFn(Protocol):
    def __call__(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = ...
    ) -> torch.Tensor: ...


class LossAggFn(Protocol):
    def __call__(
        self, loss_mat: torch.Tensor, mask: torch.Tensor, *, denominator: float | None = None
    ) -> torch.Tensor: ...


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        agg_mode: str = ...,
        denominator: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


REWARDS: Registry[RewardFn] = Registry("reward")
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
LOSS_AGGREGATIONS: Registry[LossAggFn] = Registry("loss aggregation mode")


def register_reward(name: str) -> Callable[[F], F]:
    """Register a reward function (see the module docstring for its contract)."""
    return REWARDS.register(name)  # type: ignore[arg-type, return-value]


def get_reward(name: str) -> RewardFn:
    """The reward function named ``name``; :class:`UnknownNameError` lists valid names."""
    return REWARDS.get(name)


def register_advantage(name: str) -> Callable[[F], F]:
    """Register an advantage estimator (see the module docstring for its contract)."""
    return ADVANTAGES.register(name)  # type: ignore[arg-type, return-value]


def get_advantage(name: str) -> AdvantageFn:
    """The advantage estimator named ``name``; :class:`UnknownNameError` lists valid names."""
    return ADVANTAGES.get(name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Register a policy loss (see the module docstring for its contract)."""
    return POLICY_LOSSES.register(name)  # type: ignore[arg-type, return-value]


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss named ``name``; :class:`UnknownNameError` lists valid names."""
    return POLICY_LOSSES.get(name)


def register_loss_agg(name: str) -> Callable[[F], F]:
    """Register a loss aggregation mode (see the module docstring for its contract)."""
    return LOSS_AGGREGATIONS.register(name)  # type: ignore[arg-type, return-value]


def get_loss_agg(name: str) -> LossAggFn:
    """The loss aggregation mode named ``name``; :class:`UnknownNameError` lists valid names."""
    return LOSS_AGGREGATIONS.get(name)
