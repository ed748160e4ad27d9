"""The cluster profile's compute layout: DeepSpeed ranks and engine replicas as Ray actors.

In the cluster profile every training stage runs as a Ray Job (``compute.stage_job``). Inside the job,
`ClusterCompute` says how the stage spreads over the cluster:

- SFT stages train with DeepSpeed ZeRO (``zero_stage``, ``offload_optimizer``, ``offload_params``) on
  ``train_workers`` ranks (``training.ray_strategy.RayDeepSpeedStrategy``), one Ray actor per
  placement-group bundle (``{"CPU": worker_cpus}`` plus ``{"GPU": 1}`` with ``use_gpu``), placed by
  ``placement_strategy`` (``STRICT_SPREAD``: every rank on a different node);
- RL stages roll out on ``engine_replicas`` engine replicas (``compute.engine_pool.EnginePool``,
  data-parallel dispatch, weights synced from the trainer after every update) while the trainer runs
  in the job's driver process.

``train_workers = 0`` or ``engine_replicas = 0`` keeps that part in the job's own process (the embedded
layout). The layout travels to the job as JSON in the stage spec and is part of the stage's run key.

`owner_rollouts` is the embedded layout's version of the replicas: an RL stage running as one Ray task
that holds the machine rolls out on replicas that reserve no CPUs of their own, one torch thread each.
The decode loop is mostly single-threaded host work, so on 2 cores two replicas decode a toy PAPO batch
(512 rollouts) ~1.5x faster than one process on 2 threads (6.0 s against 9.3 s, measured back to back),
with the same tokens; training still runs in the task on all its threads. Only batches of `MIN_OWNER_ROLLOUTS` or more get them (`owner_replicas`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: Driver kinds: what a stage driver can hand to the cluster.
STRATEGY, ROLLOUTS = "strategy", "rollouts"


@dataclass(frozen=True)
class ClusterCompute:
    """How a stage job uses the cluster (see the module docstring)."""

    train_workers: int = 2
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    placement_strategy: str = "SPREAD"
    use_gpu: bool = False
    worker_cpus: float = 1.0
    engine_replicas: int = 2
    engine_cpus: float = 1.0
    engine_gpus: float = 0.0
    engine_placement_strategy: str = "SPREAD"

    def __post_init__(self) -> None:
        for name in ("placement_strategy", "engine_placement_strategy"):
            if getattr(self, name) not in PLACEMENT_STRATEGIES:
                raise ValueError(f"{name} must be one of {PLACEMENT_STRATEGIES}, got {getattr(self, name)!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs ZeRO stage 3")
        if self.train_workers < 0 or self.engine_replicas < 0:
            raise ValueError("train_workers and engine_replicas must be >= 0")
        if self.worker_cpus <= 0 or self.engine_cpus <= 0 or self.engine_gpus < 0:
            raise ValueError("worker_cpus and engine_cpus must be > 0, engine_gpus >= 0")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterCompute:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown cluster compute fields {unknown}")
        return cls(**dict(data))

    def deepspeed_options(self) -> Any:
        from npr_pipelines.training.deepspeed_strategy import DeepSpeedOptions

        return DeepSpeedOptions(
            zero_stage=self.zero_stage,
            offload_optimizer=self.offload_optimizer,
            offload_params=self.offload_params,
        )


@contextmanager
def stage_compute(kind: str, compute: ClusterCompute | None, *, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Keyword arguments that put a stage driver's work on the cluster (attaching this process to Ray,
    ``RAY_ADDRESS`` in a job); every actor and placement group is released when the block ends.

    ``kind``: `STRATEGY` (an SFT driver: ``strategy=``) or `ROLLOUTS` (an RL driver: ``rollout_engine=``).
    """
    if compute is None:
        yield {}
        return
    if kind == STRATEGY and compute.train_workers > 0:
        from npr_pipelines.compute.ray_local import ensure_ray
        from npr_pipelines.training.ray_strategy import RayDeepSpeedStrategy

        ensure_ray()
        strategy = RayDeepSpeedStrategy(
            compute.deepspeed_options(),
            num_workers=compute.train_workers,
            placement_strategy=compute.placement_strategy,
            use_gpu=compute.use_gpu,
            cpus_per_worker=compute.worker_cpus,
            seed=seed,
        )
        with strategy:
            yield {"strategy": strategy}
    elif kind == ROLLOUTS and compute.engine_replicas > 0:
        with _rollout_engine(
            replicas=compute.engine_replicas,
            cpus=compute.engine_cpus,
            gpus=compute.engine_gpus,
            placement_strategy=compute.engine_placement_strategy,
            threads=max(1, int(compute.engine_cpus)),
        ) as extra:
            yield extra
    else:
        yield {}


@contextmanager
def _rollout_engine(**pool: Any) -> Iterator[dict[str, Any]]:
    """``rollout_engine=``: an `EnginePoolFactory` with ``pool`` settings, its pools shut down at the end."""
    from npr_pipelines.compute.engine_pool import EnginePoolFactory
    from npr_pipelines.compute.ray_local import ensure_ray

    ensure_ray()
    factory = EnginePoolFactory(**pool)
    try:
        yield {"rollout_engine": factory}
    finally:
        factory.close()


#: Fewest rollouts per RL step for which owner replicas pay for their start-up (a few seconds): NPR-Zero's
#: 128 sequential rollouts (~1.5 s a step) decode no faster on them.
MIN_OWNER_ROLLOUTS = 256


def owner_replicas(kind: str, config: Any, replicas: int) -> int:
    """How many owner replicas a stage driver of ``kind`` with ``config`` rolls out on: ``replicas`` for
    a CPU RL driver whose steps hold at least `MIN_OWNER_ROLLOUTS` rollouts, else 0 (in process; a GPU
    policy's in-process engine decodes on its GPU, which replicas that reserve nothing could not see)."""
    if kind != ROLLOUTS or replicas <= 0 or getattr(config, "device", "cpu") != "cpu":
        return 0
    rollouts = int(getattr(config, "prompts_per_step", 0)) * int(getattr(config, "group_size", 0))
    return replicas if rollouts >= MIN_OWNER_ROLLOUTS else 0


@contextmanager
def owner_rollouts(kind: str, replicas: int) -> Iterator[dict[str, Any]]:
    """``rollout_engine=`` for an RL driver (``kind`` `ROLLOUTS`) that runs in a Ray task or job holding
    the machine's CPUs: ``replicas`` engine replicas on those CPUs (`EnginePool` with ``cpus=0``), shut
    down when the block ends. Anything else (an SFT driver, ``replicas = 0``) gets no keyword arguments."""
    if kind != ROLLOUTS or replicas <= 0:
        yield {}
        return
    with _rollout_engine(replicas=replicas, cpus=0.0, threads=1) as extra:
        yield extra
