"""`DeepSpeedStrategy`: the `Strategy` contract over data-parallel ranks with ZeRO stage 1-3.

The DeepSpeed config is built in code (`build_ds_config`), and a torch AdamW object is passed as the
optimizer, so no DeepSpeed op is JIT-compiled (its fused Adam costs ~60 s of compiling). On the CPU the
process group is gloo.

Gradient semantics match `TorchStrategy` exactly: each rank's loss is normalised by the whole step's
denominator (see ``strategy.py``), micro-batches accumulate under a manual accumulation boundary (so
a step may have any number of micro-batches, the same on every rank), and the loss is multiplied by
the world size before ``engine.backward(..., scale_wrt_gas=False)`` because DeepSpeed AVERAGES
gradients over data-parallel ranks where the contract needs their SUM.

Checkpoint layout written by `DeepSpeedStrategy.save` (every rank must call it)::

    config.json, model.safetensors   HF weights (ZeRO-3 parameters gathered first), from rank 0
    strategy.json                    kind, ZeRO stage, world size, global step
    deepspeed/state/*.pt             ``engine.save_checkpoint``: module + per-rank optimizer shards

Pickles: the ``deepspeed/`` ``.pt`` files are the only pickles this project ever reads (DeepSpeed's
``load_checkpoint`` uses ``torch.load(weights_only=False)``). `DeepSpeedStrategy.load` therefore only
reads them from a manifest-verified directory: ``MANIFEST.json`` (``storage.manifest``, written when the
project publishes a checkpoint, kept by ``fetch_dir``) must list every file under ``deepspeed/`` with
a matching SHA-256. The HF weights are safetensors and load anywhere (e.g. `TorchStrategy.load(...,
weights_only=True)`) without that check.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from npr_pipelines.training.batch import TokenBatch
from npr_pipelines.training.strategy import (
    STRATEGY_STATE,
    LossFn,
    OptimizerConfig,
    mean_metrics,
    split_loss,
)

DS_SUBDIR = "deepspeed"
DS_TAG = "state"


@dataclass(frozen=True)
class DeepSpeedOptions:
    """How to run DeepSpeed; the optimizer itself comes from `OptimizerConfig`.

    ``micro_batch_size`` and ``gradient_accumulation_steps`` only feed DeepSpeed's sample counters
    (the strategy sets the accumulation boundary itself). ``dist_backend`` None = gloo on the CPU,
    nccl on CUDA. ``build_shm_comm``: DeepSpeed JIT-compiles its shared-memory all-reduce op (~35-70 s
    on a fresh machine) at the first ``initialize``; only DeepSpeed *inference* tensor parallelism uses
    it, training collectives go through torch.distributed, so it is skipped unless asked for.
    """

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    dist_backend: str | None = None
    build_shm_comm: bool = False


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    bf16: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    pin_memory: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict (OpenRLHF's ``get_train_ds_config`` shape); fp32 unless ``bf16``."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # A torch AdamW object is the optimizer: allow it under ZeRO, and under offload do not swap in
        # DeepSpeedCPUAdam (a JIT-compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _skip_shm_comm_build() -> None:
    import deepspeed.ops

    # DeepSpeed keeps this probe result in one module-level dict and consults it before building.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def verify_deepspeed_files(path: str | Path) -> None:
    """Raise ``ArtifactError`` unless ``path/MANIFEST.json`` lists every ``deepspeed/`` file, hashes equal."""
    from npr_pipelines.storage.manifest import MANIFEST_NAME, ArtifactError, Manifest, hash_file

    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        raise ArtifactError(
            f"{path}: no {MANIFEST_NAME}; DeepSpeed state is read only from published checkpoints"
        )
    manifest = Manifest.from_json_bytes((path / MANIFEST_NAME).read_bytes(), source=str(path))
    files = [f for f in sorted((path / DS_SUBDIR).rglob("*")) if f.is_file()]
    if not files:
        raise ArtifactError(f"{path}: no DeepSpeed state under {DS_SUBDIR}/")
    for f in files:
        rel = f.relative_to(path).as_posix()
        if manifest.files.get(rel) != hash_file(str(f)):
            raise ArtifactError(f"{path}: {rel} is not in the manifest or differs from it", file=rel)


class DeepSpeedStrategy:
    """A DeepSpeed engine on this process's rank (env ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
    ``MASTER_PORT``, or an already-initialised process group such as Ray Train's)."""

    def __init__(self, options: DeepSpeedOptions | None = None) -> None:
        self.options = options or DeepSpeedOptions()
        self.engine: Any = None
        self.optimizer: torch.optim.AdamW | None = None
        self.config = OptimizerConfig()
        self.global_step = 0
        self.rank, self.world_size = 0, 1

    def setup(self, model: nn.Module, optimizer_config: OptimizerConfig) -> None:
        import deepspeed

        opts = self.options
        if not opts.build_shm_comm:
            _skip_shm_comm_build()
        backend = opts.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.config = optimizer_config
        self.optimizer = optimizer_config.adamw([p for p in model.parameters() if p.requires_grad])
        ds_config = build_ds_config(
            zero_stage=opts.zero_stage,
            micro_batch_size=opts.micro_batch_size,
            gradient_accumulation_steps=opts.gradient_accumulation_steps,
            max_grad_norm=optimizer_config.max_grad_norm,
            bf16=opts.bf16,
            offload_optimizer=opts.offload_optimizer,
            offload_params=opts.offload_params,
            pin_memory=torch.cuda.is_available(),
        )
        self.engine, *_ = deepspeed.initialize(
            model=model.train(), optimizer=self.optimizer, config=ds_config
        )

    def unwrap(self) -> nn.Module:
        """The HF model; under ZeRO-3 its parameters are partitioned (use `full_state_dict` to read them)."""
        assert self.engine is not None, "call setup() first"
        return self.engine.module

    def train_step(self, loss_fn: LossFn, batches: Sequence[TokenBatch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; metrics are global (summed loss, mean rest)."""
        engine = self.engine
        lr = self.config.lr_at(self.global_step)
        # ZeRO steps the AdamW object passed in, on its own param_groups (now holding flat partitions).
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, per_batch = torch.zeros((), dtype=torch.float64), []
        for i, batch in enumerate(batches):
            engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            loss, metrics = split_loss(loss_fn(engine, batch.to(engine.device)))
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            total += loss.detach().double().cpu()
            per_batch.append(metrics)
        engine.step()
        self.global_step += 1
        local = mean_metrics(per_batch)
        keys = sorted(local)
        stats = torch.tensor([float(total), *(local[k] for k in keys)], dtype=torch.float64)
        dist.all_reduce(stats)
        out = {k: float(v) / self.world_size for k, v in zip(keys, stats[1:].tolist(), strict=True)}
        norm = engine.get_global_grad_norm()
        return {
            **out,
            "loss": float(stats[0]),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "lr": lr,
            "step": self.global_step,
        }

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """CPU copy of the full HF state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
        model = self.unwrap()
        state = model.state_dict()
        if self.options.zero_stage < 3:
            return {k: v.detach().cpu().clone() for k, v in state.items()} if self.rank == 0 else None
        import deepspeed

        params = dict(model.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if name not in params:  # buffers are not partitioned
                out[name] = value.detach().cpu().clone()
                continue
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                if self.rank == 0:
                    out[name] = params[name].detach().cpu().clone()
        return out if self.rank == 0 else None

    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "kind": "deepspeed",
            "global_step": self.global_step,
            "world_size": self.world_size,
            "zero_stage": self.options.zero_stage,
        }

    def save(self, path: str | Path) -> Path:
        """Write the layout in the module docstring; every rank must call it (``path`` may be rank-local)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.full_state_dict()
        if self.rank == 0:
            self.unwrap().save_pretrained(path, state_dict=state)
            (path / STRATEGY_STATE).write_text(json.dumps(self.state_for_checkpoint()))
        self.engine.save_checkpoint(
            str(path / DS_SUBDIR),
            tag=DS_TAG,
            client_state={"global_step": self.global_step},
            save_latest=False,
        )
        dist.barrier()
        return path

    def load(self, path: str | Path, *, weights_only: bool = False) -> None:
        """Resume weights, optimizer and step from a published checkpoint (see the module docstring).

        ``weights_only`` is not supported: ZeRO keeps its own master copy of the weights, so load HF
        weights into the model before `setup` instead.
        """
        if weights_only:
            raise ValueError("DeepSpeedStrategy: load HF weights into the model before setup()")
        verify_deepspeed_files(path)
        _, client = self.engine.load_checkpoint(
            str(Path(path) / DS_SUBDIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if client is None:
            raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load")
        self.global_step = int(client["global_step"])
