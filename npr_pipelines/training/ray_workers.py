"""DeepSpeed across Ray workers: SFT through Ray Train, RL through an explicit actor group.

- SFT (`run_sft_deepspeed`): a Ray Train ``TorchTrainer`` (gloo on the CPU) runs `sft_worker_loop` on
  N workers. Every worker sees the same global steps and takes its contiguous `shard` of each, so the
  optimizer steps are those `TorchStrategy` takes on the whole batches. The final checkpoint (the
  `DeepSpeedStrategy.save` layout) is reported by every worker and merged by Ray Train into one
  directory under ``storage_path``.
- RL (`DeepSpeedActorGroup`, OpenRLHF's pattern): the driver creates a placement group in code
  (``PACK``/``SPREAD``, one ``{"CPU": c}`` or ``{"GPU": 1, "CPU": c}`` bundle per rank), rank 0 first
  to learn the rendezvous address, then ranks 1..N-1; each `DeepSpeedWorker` actor holds one engine.
  The driver calls ``train_step`` with the global sequences (each actor collates its shard) and
  ``state_dict()`` to sync weights into the rollout engine.

Start Ray with ``npr_pipelines.compute.ensure_ray`` (loopback, token auth) before using either. Models
reach the workers as picklable factories (`HFModelSource`: a ``save_pretrained`` directory), and losses
as picklable objects (``strategy.SftObjective`` / ``PolicyObjective``), never as closures over tests.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npr_pipelines.training.batch import TokenBatch, TrainSequence, use_segment_attention
from npr_pipelines.training.deepspeed_strategy import DeepSpeedOptions, DeepSpeedStrategy
from npr_pipelines.training.strategy import (
    LossFn,
    OptimizerConfig,
    SftObjective,
    count_targets,
    micro_batches,
    shard,
)

ModelFactory = Callable[[], nn.Module]
Steps = Sequence[Sequence[TrainSequence]] | Callable[[], Iterable[Sequence[TrainSequence]]]


@dataclass(frozen=True)
class HFModelSource:
    """Load a ``save_pretrained`` directory on the worker (in ``dtype``, with the parallel-layout attention)."""

    path: str
    dtype: str = "float32"
    segment_attention: bool = True

    def __call__(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
        if self.segment_attention:
            use_segment_attention(model)
        return model


# ---------------------------------------------------------------------------------------------- SFT


@dataclass(frozen=True)
class SftRunResult:
    history: list[dict[str, float]]
    """Per-step global metrics (rank 0's view of the all-reduced values)."""
    checkpoint: Path | None
    """The merged final checkpoint in Ray Train storage (HF weights + ``deepspeed/``), if saved."""


def sft_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: DeepSpeed SFT over this worker's shard of every step."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    strategy = DeepSpeedStrategy(config["options"])
    strategy.setup(config["model"](), config["optimizer"])
    if config["resume_from"] is not None:
        strategy.load(config["resume_from"])
    steps = config["steps"]
    history = []
    for i, seqs in enumerate(steps() if callable(steps) else steps):
        if i < strategy.global_step:
            continue
        batches = micro_batches(shard(seqs, rank, world), config["micro_batch_size"], config["pad_id"])
        history.append(strategy.train_step(SftObjective(count_targets(seqs)), batches))
    metrics = {"history": history, "global_step": strategy.global_step}
    if not config["save"]:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix=f"npr-sft-rank{rank}-") as tmp:
        strategy.save(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_sft_deepspeed(
    model: ModelFactory,
    steps: Steps,
    *,
    optimizer: OptimizerConfig,
    options: DeepSpeedOptions,
    storage_path: str | Path,
    name: str = "npr-sft",
    num_workers: int = 2,
    use_gpu: bool = False,
    micro_batch_size: int = 1,
    pad_id: int = 0,
    resume_from: str | Path | None = None,
    save: bool = True,
    seed: int = 0,
) -> SftRunResult:
    """Run DeepSpeed SFT on ``num_workers`` Ray Train workers; ``steps`` are the GLOBAL batches.

    Each step's sequences must split evenly over the workers (and then into micro-batches of
    ``micro_batch_size``). ``resume_from`` is a published checkpoint (see `DeepSpeedStrategy.load`);
    steps before its global step are skipped.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        sft_worker_loop,
        train_loop_config={
            "model": model,
            "steps": steps,
            "optimizer": optimizer,
            "options": options,
            "micro_batch_size": micro_batch_size,
            "pad_id": pad_id,
            "resume_from": None if resume_from is None else str(resume_from),
            "save": save,
            "seed": seed,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage_path)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    result = trainer.fit()
    metrics = result.metrics or {}
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return SftRunResult(list(metrics.get("history", [])), checkpoint)


# ---------------------------------------------------------------------------------------- RL actors


class DeepSpeedWorker:
    """One rank of a `DeepSpeedActorGroup` (a Ray actor): sets the rendezvous env, holds the engine."""

    def __init__(self, rank: int, world_size: int, master_addr: str | None, master_port: int | None) -> None:
        import os

        if master_addr is None:  # rank 0 picks the rendezvous address on its own node
            master_addr, master_port = self.get_master_addr_port()
        self.master = (master_addr, int(master_port))
        # LOCAL_RANK 0: Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0.
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        self.strategy: DeepSpeedStrategy | None = None

    @staticmethod
    def get_master_addr_port() -> tuple[str, int]:
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def master_addr_port(self) -> tuple[str, int]:
        return self.master

    def setup(
        self, model: ModelFactory, optimizer: OptimizerConfig, options: DeepSpeedOptions, seed: int
    ) -> None:
        torch.manual_seed(seed)
        self.strategy = DeepSpeedStrategy(options)
        self.strategy.setup(model(), optimizer)

    def train_step(
        self, loss_fn: LossFn, seqs: Sequence[TrainSequence], micro_batch_size: int, pad_id: int
    ) -> dict[str, float]:
        batches = micro_batches(seqs, micro_batch_size, pad_id)
        out = self.strategy.train_step(loss_fn, batches)
        return {**out, "padded_tokens": float(sum(b.input_ids.numel() for b in batches))}

    def train_batches(self, loss_fn: LossFn, batches: Sequence[TokenBatch]) -> dict[str, float]:
        return self.strategy.train_step(loss_fn, batches)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.strategy.full_state_dict()

    def save(self, path: str) -> str:
        return str(self.strategy.save(path))

    def load(self, path: str) -> int:
        self.strategy.load(path)
        return self.strategy.global_step

    def save_files(self) -> tuple[dict[str, bytes], str | None]:
        """Save into a directory on this node and return its files (and, on rank 0, `state_digest` of
        the weights saved): for drivers that share no filesystem with the ranks."""
        from npr_pipelines.storage.weights import state_digest
        from npr_pipelines.training.ray_strategy import read_files

        state = self.strategy.full_state_dict()  # collective under ZeRO-3: every rank calls it
        digest = state_digest(state) if state is not None else None
        with tempfile.TemporaryDirectory(prefix="npr-ds-save-") as tmp:
            self.strategy.save(tmp)
            return read_files(tmp), digest

    def load_files(self, files: dict[str, bytes]) -> int:
        """`load` from a checkpoint's files (``MANIFEST.json`` included), written on this node first."""
        from npr_pipelines.training.ray_strategy import write_files

        with tempfile.TemporaryDirectory(prefix="npr-ds-load-") as tmp:
            self.strategy.load(write_files(tmp, files))
        return self.strategy.global_step


@dataclass
class DeepSpeedActorGroup:
    """N `DeepSpeedWorker` actors on a placement group created here; use as a context manager.

    ``save``/``load`` paths must be visible to every actor (one machine, or shared storage).
    """

    num_workers: int
    placement_strategy: str = "PACK"
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    actors: list[Any] = field(default_factory=list, init=False)
    placement_group: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}
        self.placement_group = placement_group([bundle] * self.num_workers, strategy=self.placement_strategy)
        ray.get(self.placement_group.ready())
        remote = ray.remote(DeepSpeedWorker)

        def make(rank: int, addr: str | None, port: int | None) -> Any:
            return remote.options(
                num_cpus=self.cpus_per_worker,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=rank
                ),
            ).remote(rank, self.num_workers, addr, port)

        self.actors = [make(0, None, None)]
        addr, port = ray.get(self.actors[0].master_addr_port.remote())
        self.actors += [make(rank, addr, port) for rank in range(1, self.num_workers)]

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def setup(
        self, model: ModelFactory, optimizer: OptimizerConfig, options: DeepSpeedOptions, seed: int = 0
    ) -> None:
        """Build one engine per actor (a collective: all actors at once)."""
        self._all("setup", model, optimizer, options, seed)

    def train_step(
        self, loss_fn: LossFn, seqs: Sequence[TrainSequence], *, micro_batch_size: int = 1, pad_id: int = 0
    ) -> dict[str, float]:
        """One optimizer step on the GLOBAL ``seqs`` (``loss_fn`` normalised over all of them); rank 0's
        metrics, with ``padded_tokens`` summed over the ranks."""
        import ray

        refs = [
            a.train_step.remote(loss_fn, shard(seqs, rank, self.num_workers), micro_batch_size, pad_id)
            for rank, a in enumerate(self.actors)
        ]
        outs = ray.get(refs)
        return {**outs[0], "padded_tokens": sum(o["padded_tokens"] for o in outs)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights (gathered under ZeRO-3) for the rollout engine; from rank 0."""
        return self._all("state_dict")[0]

    def save(self, path: str | Path) -> Path:
        self._all("save", str(path))
        return Path(path)

    def load(self, path: str | Path) -> int:
        """Resume from a published checkpoint; returns the global step."""
        return self._all("load", str(path))[0]

    def node_ids(self) -> list[str]:
        """The Ray node id of each rank, in rank order."""
        return self._all("node_id")

    def save_files(self) -> list[tuple[dict[str, bytes], str | None]]:
        """Every rank's checkpoint files (and rank 0's weights digest), saved on its own node."""
        return self._all("save_files")

    def load_files(self, files: dict[str, bytes]) -> int:
        """Resume every rank from a published checkpoint's files; returns the global step."""
        import ray

        ref = ray.put(files)
        return self._all("load_files", ref)[0]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> DeepSpeedActorGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
