"""Training strategies: how a stage driver turns micro-batches into optimizer steps.

Every stage driver talks to a `Strategy` only: ``setup`` once, ``train_step(loss_fn, batches)`` per
optimizer step, ``save``/``load`` for checkpoints and ``unwrap()`` for the HF model (``save_pretrained``,
weight sync to the rollout engine). `TorchStrategy` is the single-process default; the DeepSpeed
strategy (``deepspeed_strategy.py``) runs the same contract over data-parallel ranks.

Loss contract: ``loss_fn(model, micro_batch)`` returns ``loss`` or ``(loss, metrics)`` normalised by
the WHOLE optimizer step's denominator (e.g. target tokens over every micro-batch of every rank), so
the step's gradient is the plain sum of the micro-batch gradients. The strategy never rescales by the
number of micro-batches or ranks, which keeps gradient accumulation and data parallelism exact for
token-mean losses (``rl.losses.token_mean(denominator=...)`` is built for this). `SftObjective` and
`PolicyObjective` follow it; `count_targets` gives the denominator of a step's sequences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from npr_pipelines.rl import get_policy_loss
from npr_pipelines.storage.weights import read_safetensors
from npr_pipelines.training.batch import TokenBatch, TrainSequence, collate, token_logprobs
from npr_pipelines.training.checkpoint import load_optimizer_state, save_optimizer_state

LossOut = torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]
LossFn = Callable[[nn.Module, TokenBatch], LossOut]
STRATEGY_STATE = "strategy.json"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings; ``schedule(step) -> lr`` (pure, 0-based optimizer step) overrides ``lr``."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    schedule: Callable[[int], float] | None = None

    def lr_at(self, step: int) -> float:
        return self.lr if self.schedule is None else float(self.schedule(step))

    def adamw(self, params: Any) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            params, lr=self.lr_at(0), betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )


@runtime_checkable
class Strategy(Protocol):
    """What a stage driver needs from its training backend (see the module docstring for ``loss_fn``)."""

    world_size: int
    rank: int
    global_step: int

    def setup(self, model: nn.Module, optimizer_config: OptimizerConfig) -> None: ...
    def train_step(self, loss_fn: LossFn, batches: Sequence[TokenBatch]) -> dict[str, float]: ...
    def state_for_checkpoint(self) -> dict[str, Any]: ...
    def save(self, path: str | Path) -> Path: ...
    def load(self, path: str | Path, *, weights_only: bool = False) -> None: ...
    def unwrap(self) -> nn.Module: ...


@runtime_checkable
class ShardingStrategy(Strategy, Protocol):
    """A strategy whose ranks live in other processes (``ray_strategy.RayDeepSpeedStrategy``): it takes a
    step's GLOBAL sequences and shards them over its ranks, each collating micro-batches of
    ``micro_batch_size``; the result also carries ``padded_tokens`` (summed over ranks)."""

    def train_sequences(
        self, loss_fn: LossFn, seqs: Sequence[TrainSequence], micro_batch_size: int, pad_id: int
    ) -> dict[str, float]: ...


def split_loss(out: LossOut) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    return loss, {k: float(v) for k, v in metrics.items()}


def mean_metrics(per_batch: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over micro-batches (diagnostics only; the step's loss is the exact sum)."""
    keys = {k for m in per_batch for k in m}
    return {k: sum(m.get(k, 0.0) for m in per_batch) / len(per_batch) for k in sorted(keys)}


def count_targets(seqs: Sequence[TrainSequence]) -> int:
    """Loss targets in ``seqs`` as `collate` masks them (token 0 has no predecessor)."""
    return sum(sum(s.trainable[1:]) for s in seqs)


def shard(seqs: Sequence[TrainSequence], rank: int, world_size: int) -> list[TrainSequence]:
    """Rank ``rank``'s contiguous share; equal shares, because every rank must run the same collectives."""
    if len(seqs) % world_size:
        raise ValueError(f"{len(seqs)} sequences do not split evenly over {world_size} ranks")
    n = len(seqs) // world_size
    return list(seqs[rank * n : (rank + 1) * n])


def micro_batches(seqs: Sequence[TrainSequence], size: int, pad_id: int) -> list[TokenBatch]:
    return [collate(seqs[i : i + size], pad_id) for i in range(0, len(seqs), size)]


@dataclass(frozen=True)
class SftObjective:
    """Cross-entropy summed over a micro-batch's targets / the step's target count."""

    denominator: float

    def __call__(self, model: nn.Module, batch: TokenBatch) -> LossOut:
        logp = token_logprobs(model, batch)
        return -(logp * batch.loss_mask).sum() / self.denominator


@dataclass(frozen=True)
class PolicyObjective:
    """A registered policy loss (``rl.get_policy_loss``) over per-sequence advantages.

    ``denominator``: `count_targets` of the step for ``token-mean``; for the ``seq-mean-*`` modes, the
    number of the step's sequences that have a target.
    """

    name: str
    denominator: float
    agg_mode: str = "token-mean"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module, batch: TokenBatch) -> LossOut:
        logp = token_logprobs(model, batch)
        adv = batch.advantages[:, None].expand_as(logp)
        return get_policy_loss(self.name)(
            logp,
            batch.old_logprobs,
            adv,
            batch.loss_mask,
            agg_mode=self.agg_mode,
            denominator=self.denominator,
            **self.kwargs,
        )


def load_hf_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``save_pretrained`` safetensors (single or sharded) into ``model``; strict up to tied weights."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))  # names a truncated/corrupt file
    missing, unexpected = model.load_state_dict(state, strict=False)
    by_ptr: dict[int, set[str]] = {}
    for name, t in model.state_dict().items():
        by_ptr.setdefault(t.data_ptr(), set()).add(name)
    tied_ok = {n for names in by_ptr.values() if names & state.keys() for n in names}
    if unexpected or set(missing) - tied_ok:
        raise KeyError(f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}")


class TorchStrategy:
    """Single-process AdamW with gradient accumulation and grad-norm clipping (the embedded default)."""

    world_size = 1
    rank = 0

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.config = OptimizerConfig()
        self.global_step = 0

    def setup(self, model: nn.Module, optimizer_config: OptimizerConfig) -> None:
        self.model, self.config = model.train(), optimizer_config
        self.optimizer = optimizer_config.adamw([p for p in model.parameters() if p.requires_grad])

    def unwrap(self) -> nn.Module:
        assert self.model is not None, "call setup() first"
        return self.model

    def train_step(self, loss_fn: LossFn, batches: Sequence[TokenBatch]) -> dict[str, float]:
        model, opt = self.unwrap(), self.optimizer
        lr = self.config.lr_at(self.global_step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        total, per_batch = 0.0, []
        for batch in batches:
            loss, metrics = split_loss(loss_fn(model, batch.to(device)))
            loss.backward()
            total += float(loss.detach())
            per_batch.append(metrics)
        max_norm = self.config.max_grad_norm or math.inf
        params = [p for g in opt.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        opt.step()
        self.global_step += 1
        return {
            **mean_metrics(per_batch),
            "loss": total,
            "grad_norm": grad_norm,
            "lr": lr,
            "step": self.global_step,
        }

    def state_for_checkpoint(self) -> dict[str, Any]:
        return {"kind": "torch", "global_step": self.global_step, "world_size": 1}

    def save(self, path: str | Path) -> Path:
        """HF weights (safetensors) + optimizer (safetensors + JSON) + ``strategy.json``; no pickles."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unwrap().save_pretrained(path)
        save_optimizer_state(path, self.optimizer)
        (path / STRATEGY_STATE).write_text(json.dumps(self.state_for_checkpoint()))
        return path

    def load(self, path: str | Path, *, weights_only: bool = False) -> None:
        """Restore weights, and unless ``weights_only`` the optimizer and step (which must be there)."""
        load_hf_weights(self.unwrap(), path)
        if weights_only:
            return
        if not (Path(path) / "optimizer.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no torch optimizer state (pass weights_only=True for weights)")
        load_optimizer_state(path, self.optimizer)
        self.global_step = int(json.loads((Path(path) / STRATEGY_STATE).read_text())["global_step"])
