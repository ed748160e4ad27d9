"""`RayDeepSpeedStrategy`: the `Strategy` contract over a `DeepSpeedActorGroup` (the cluster profile).

The stage driver (``training.sft``) keeps its loop, its data order and its checkpoint layout; only the
optimizer steps move to the DeepSpeed ranks, Ray actors on a placement group (``STRICT_SPREAD`` puts
every rank on a different node). The driver's model travels to the ranks once, as its config and
weights through the object store (`ModuleSource`: no shared filesystem needed), and each step's GLOBAL
sequences are sharded over the ranks (`train_sequences`), so the steps are the ones `TorchStrategy`
takes on the whole batches (up to summation order).

Checkpoints: every rank writes its part of the `DeepSpeedStrategy.save` layout on its own node and
sends the files back; the driver writes them into one directory (HF weights from rank 0, every
rank's ZeRO shard under ``deepspeed/``). `state_digest` of the weights rank 0 held at the last save is
kept in `state_for_checkpoint` (``weights_sha256``), with the ranks' Ray node ids.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npr_pipelines.training.batch import TokenBatch, TrainSequence, use_segment_attention
from npr_pipelines.training.deepspeed_strategy import DS_SUBDIR, DeepSpeedOptions
from npr_pipelines.training.strategy import LossFn, OptimizerConfig


@dataclass(frozen=True)
class ModuleSource:
    """A model rebuilt on a Ray worker from its config and weights (picklable; no filesystem needed)."""

    config: Any  # a transformers PretrainedConfig
    state: dict[str, torch.Tensor]
    segment_attention: bool = True

    @classmethod
    def of(cls, model: nn.Module, *, segment_attention: bool = True) -> ModuleSource:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(copy.deepcopy(model.config), state, segment_attention)

    def __call__(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.config)
        config._attn_implementation = "eager"  # set again below when the layout attention is wanted
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        model.load_state_dict(self.state)
        if self.segment_attention:
            use_segment_attention(model)
        return model


def pad_to_multiple(seqs: Sequence[TrainSequence], world_size: int) -> list[TrainSequence]:
    """``seqs`` plus copies of the last one with no targets until the count splits over ``world_size``
    ranks: a sequence without targets adds nothing to the loss or the gradient (every rank must run the
    same collectives, so every rank needs a share)."""
    out = list(seqs)
    while out and len(out) % world_size:
        last = out[-1]
        out.append(replace(last, trainable=(False,) * len(last.trainable)))
    return out


class RayDeepSpeedStrategy:
    """DeepSpeed ZeRO on ``num_workers`` Ray actors; the driver process keeps the loop (see the module doc)."""

    rank = 0

    def __init__(
        self,
        options: DeepSpeedOptions | None = None,
        *,
        num_workers: int = 2,
        placement_strategy: str = "SPREAD",
        use_gpu: bool = False,
        cpus_per_worker: float = 1.0,
        seed: int = 0,
    ) -> None:
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.options = options or DeepSpeedOptions()
        self.world_size = num_workers
        self.placement_strategy = placement_strategy
        self.use_gpu = use_gpu
        self.cpus_per_worker = cpus_per_worker
        self.seed = seed
        self.global_step = 0
        self.group: Any = None
        self.model: nn.Module | None = None
        self.node_ids: list[str] = []
        self.weights_sha256: str | None = None

    # -- the Strategy contract -----------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer_config: OptimizerConfig) -> None:
        from npr_pipelines.training.ray_workers import DeepSpeedActorGroup

        self.model = model
        self.group = DeepSpeedActorGroup(
            self.world_size,
            placement_strategy=self.placement_strategy,
            use_gpu=self.use_gpu,
            cpus_per_worker=self.cpus_per_worker,
        )
        self.group.setup(ModuleSource.of(model), optimizer_config, self.options, self.seed)
        self.node_ids = self.group.node_ids()

    def train_sequences(
        self, loss_fn: LossFn, seqs: Sequence[TrainSequence], micro_batch_size: int, pad_id: int
    ) -> dict[str, float]:
        """One optimizer step on the GLOBAL ``seqs`` (``loss_fn`` normalised over all of them), each rank
        collating its contiguous share into micro-batches of ``micro_batch_size``."""
        padded = pad_to_multiple(seqs, self.world_size)
        per_rank = len(padded) // self.world_size
        micro = max(1, min(micro_batch_size, per_rank))
        out = self.group.train_step(loss_fn, padded, micro_batch_size=micro, pad_id=pad_id)
        self.global_step = int(out["step"])
        return out

    def train_step(self, loss_fn: LossFn, batches: Sequence[TokenBatch]) -> dict[str, float]:
        """One optimizer step over collated micro-batches, dealt round-robin (their count must split)."""
        import ray

        if len(batches) % self.world_size:
            raise ValueError(
                f"{len(batches)} micro-batches do not split over {self.world_size} ranks; use train_sequences"
            )
        refs = [
            actor.train_batches.remote(loss_fn, list(batches[r :: self.world_size]))
            for r, actor in enumerate(self.group.actors)
        ]
        out = ray.get(refs)[0]
        self.global_step = int(out["step"])
        return out

    def unwrap(self) -> nn.Module:
        """The driver's model with the ranks' current weights (gathered from rank 0)."""
        assert self.model is not None and self.group is not None, "call setup() first"
        self.model.load_state_dict(self.group.state_dict())
        return self.model

    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "kind": "deepspeed",
            "global_step": self.global_step,
            "world_size": self.world_size,
            "zero_stage": self.options.zero_stage,
            "offload_optimizer": self.options.offload_optimizer,
            "offload_params": self.options.offload_params,
            "placement_strategy": self.placement_strategy,
            "node_ids": list(self.node_ids),
            "weights_sha256": self.weights_sha256,
        }

    def save(self, path: str | Path) -> Path:
        """The `DeepSpeedStrategy.save` layout in ``path`` on this machine, from every rank's files."""
        path = Path(path)
        for rank, (files, digest) in enumerate(self.group.save_files()):
            if rank == 0:
                self.weights_sha256 = digest
            else:  # HF weights and strategy.json come from rank 0
                files = {rel: data for rel, data in files.items() if rel.startswith(f"{DS_SUBDIR}/")}
            write_files(path, files)
        return path

    def load(self, path: str | Path, *, weights_only: bool = False) -> None:
        """Resume every rank from a published checkpoint directory (``DeepSpeedStrategy.load`` rules:
        its ``MANIFEST.json`` must list the DeepSpeed files)."""
        if weights_only:
            raise ValueError("RayDeepSpeedStrategy: load HF weights into the model before setup()")
        self.global_step = self.group.load_files(read_files(path))

    # -- lifetime ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def __enter__(self) -> RayDeepSpeedStrategy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def write_files(root: str | Path, files: Mapping[str, bytes]) -> Path:
    """Write ``{relative path: bytes}`` under ``root``."""
    root = Path(root)
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def read_files(root: str | Path) -> dict[str, bytes]:
    """Every file under ``root`` as ``{relative path: bytes}`` (how checkpoints travel between nodes)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
