"""A pool of NPR engine replicas as Ray actors: data-parallel rollouts, weights synced from the trainer.

`EnginePool` creates ``replicas`` `EngineReplica` actors on one placement group (``SPREAD`` by default:
one replica per node where it can), each holding the in-process ``Engine`` over its own copy of the
policy. ``generate(requests)`` deals the requests to the replicas in contiguous, balanced chunks, runs
the chunks concurrently and returns the outputs in request order, so it stands in for ``Engine`` in
``training.rl_rollout.generate_rollouts``. Every request carries its own seed, so which replica serves
it does not change what it samples (up to floating-point batching differences).

``sync_weights(model)`` pushes the trainer's state dict once through the object store and every
replica loads it in place between rollout batches (the engine rebuilds its packed weight copies when
the parameters' versions change); each replica answers with `state_digest` of what it now holds, which
`describe` reports next to each replica's node id and request count.

Start Ray first (``compute.ensure_ray``); the model reaches the replicas as ``training.ray_strategy.
ModuleSource`` (config + weights) and the codec pickled (with its tokenizer), so no shared filesystem
is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from npr_pipelines.engine import Engine, EngineConfig, EngineOutput, Request, TokenCodec
from npr_pipelines.structure import TagVocab


class EngineReplica:
    """One engine replica (a Ray actor): its copy of the policy and an ``Engine`` over it."""

    def __init__(
        self,
        index: int,
        model: Any,
        codec: TokenCodec,
        tags: TagVocab | None,
        config: EngineConfig,
        threads: int,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.index = index
        self.model = model().eval()
        if torch.cuda.is_available():  # Ray exposes only this replica's GPUs
            self.model.to("cuda")
        self.engine = Engine(self.model, codec, tags, config)
        self.version = 0
        self.served = 0

    def info(self) -> dict[str, Any]:
        import os

        import ray

        return {"replica": self.index, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def generate(self, requests: Sequence[Request]) -> list[EngineOutput]:
        outputs = self.engine.generate(requests)
        for out in outputs:
            out.metadata.update(replica=self.index, weight_version=self.version)
        self.served += len(outputs)
        return outputs

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> str:
        """Load the trainer's weights in place (the engine is idle between rollout batches)."""
        from npr_pipelines.storage.weights import state_digest

        if self.engine.has_unfinished():
            raise RuntimeError("weights must not change while requests are in flight")
        with torch.no_grad():
            self.model.load_state_dict(state)
        self.version = version
        return state_digest(self.model.state_dict())


def split_balanced(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one (order kept)."""
    n, parts = len(items), max(1, parts)
    bounds = [n * i // parts for i in range(parts + 1)]
    return [list(items[bounds[i] : bounds[i + 1]]) for i in range(parts)]


class EnginePool:
    """``replicas`` `EngineReplica` actors on a placement group (none with ``cpus = gpus = 0``: the
    replicas then share their owner's CPUs); use as a context manager."""

    def __init__(
        self,
        model: nn.Module,
        codec: TokenCodec,
        tags: TagVocab | None = None,
        engine_config: EngineConfig | None = None,
        *,
        replicas: int = 2,
        cpus: float = 1.0,
        gpus: float = 0.0,
        placement_strategy: str = "SPREAD",
        threads: int = 1,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from npr_pipelines.storage.weights import state_digest
        from npr_pipelines.training.ray_strategy import ModuleSource

        if replicas < 1:
            raise ValueError("an engine pool needs at least one replica")
        if cpus < 0 or gpus < 0:
            raise ValueError(f"cpus and gpus must be >= 0, got {cpus}, {gpus}")
        source = ray.put(ModuleSource.of(model, segment_attention=False))
        remote = ray.remote(EngineReplica)
        args = (source, codec, tags, engine_config or EngineConfig(), threads)
        if cpus == 0 and gpus == 0:
            # Replicas that reserve nothing run on the CPUs their owner already holds (the embedded
            # layout: the stage task owns the machine and alternates rollouts with training).
            self.placement_group = None
            self.placement_strategy = "owner"
            self.replicas = [remote.options(num_cpus=0).remote(i, *args) for i in range(replicas)]
        else:
            bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
            self.placement_group = placement_group([bundle] * replicas, strategy=placement_strategy)
            ray.get(self.placement_group.ready())
            self.placement_strategy = placement_strategy
            self.replicas = [
                remote.options(
                    num_cpus=cpus,
                    num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=i
                    ),
                ).remote(i, *args)
                for i in range(replicas)
            ]
        self.infos: list[dict[str, Any]] = ray.get([r.info.remote() for r in self.replicas])
        self.requests = [0] * replicas
        self.calls = 0
        self.version = 0
        self.digests = [state_digest(model.state_dict())] * replicas

    def generate(self, requests: Sequence[Request]) -> list[EngineOutput]:
        """Every request decoded by one replica; outputs in request order."""
        import ray

        chunks = split_balanced(list(requests), len(self.replicas))
        refs = [
            (i, r.generate.remote(c)) for i, (r, c) in enumerate(zip(self.replicas, chunks, strict=True)) if c
        ]
        outputs: list[EngineOutput] = []
        for i, ref in refs:
            got = ray.get(ref)
            self.requests[i] += len(got)
            outputs.extend(got)
        self.calls += 1
        return outputs

    def sync_weights(self, model: nn.Module) -> list[str]:
        """Push ``model``'s weights to every replica (one object-store copy); returns their digests."""
        import ray

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.version += 1
        ref = ray.put(state)
        self.digests = ray.get([r.load_weights.remote(ref, self.version) for r in self.replicas])
        return list(self.digests)

    def describe(self) -> dict[str, Any]:
        """Replica ids, node ids, requests served, weight version and digests (JSON)."""
        return {
            "replicas": len(self.replicas),
            "replica_ids": [info["replica"] for info in self.infos],
            "node_ids": [info["node_id"] for info in self.infos],
            "placement_strategy": self.placement_strategy,
            "requests": list(self.requests),
            "generate_calls": self.calls,
            "weight_version": self.version,
            "weights_sha256": list(self.digests),
        }

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for replica in self.replicas:
            ray.kill(replica)
        self.replicas = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@dataclass
class EnginePoolFactory:
    """Builds the `EnginePool` of an RL run (``training.rl.run_rl(rollout_engine=...)``) and shuts down
    every pool it built on `close`."""

    replicas: int = 2
    cpus: float = 1.0
    gpus: float = 0.0
    placement_strategy: str = "SPREAD"
    threads: int = 1
    pools: list[EnginePool] = field(default_factory=list)

    def __call__(
        self, model: nn.Module, codec: TokenCodec, tags: TagVocab | None, engine_config: EngineConfig
    ) -> EnginePool:
        pool = EnginePool(
            model, codec, tags, engine_config, replicas=self.replicas, cpus=self.cpus, gpus=self.gpus,
            placement_strategy=self.placement_strategy, threads=self.threads,
        )  # fmt: skip
        self.pools.append(pool)
        return pool

    def close(self) -> None:
        while self.pools:
            self.pools.pop().shutdown()
