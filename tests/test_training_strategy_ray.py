"""DeepSpeed under Ray on the CPU (gloo), against the single-process torch strategy.

- SFT through Ray Train (``TorchTrainer``, 2 workers) with ZeRO-1 and ZeRO-2 on the same global
  batches: per-step losses match `TorchStrategy` within ``LOSS_TOL`` and the merged checkpoint loads
  into `TorchStrategy` with weights within ``WEIGHT_TOL``.
- One PAPO step in a 2-actor `DeepSpeedActorGroup` (ZeRO-3, placement group): the synced weights
  match `TorchStrategy`'s updated weights within ``WEIGHT_TOL``; a published checkpoint resumes the
  group exactly; an unpublished one is refused (DeepSpeed state is pickled).

All fp32 with the same AdamW arithmetic (``foreach=False``); measured differences are ~1e-7 (the
order in which partial gradients are summed differs between ranks and micro-batches).
One local Ray cluster (2 CPUs) serves the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_training_strategy import max_weight_diff, rl_sequences, sft_sequences, tiny_model

from npr_pipelines.compute import local_ray
from npr_pipelines.storage.api import publish_dir
from npr_pipelines.training.deepspeed_strategy import DeepSpeedOptions
from npr_pipelines.training.ray_workers import DeepSpeedActorGroup, HFModelSource, run_sft_deepspeed
from npr_pipelines.training.strategy import (
    OptimizerConfig,
    PolicyObjective,
    SftObjective,
    TorchStrategy,
    count_targets,
    micro_batches,
)

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5
# A warmup schedule, so a step with the wrong learning rate would show in the weights.
OPTIMIZER = OptimizerConfig(lr=1e-2, max_grad_norm=1.0, schedule=lambda step: 1e-2 * min(1.0, (step + 1) / 2))


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    with local_ray(num_cpus=2, log_to_driver=False):
        yield


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> HFModelSource:
    path = tmp_path_factory.mktemp("base") / "model"
    tiny_model(seed=1).save_pretrained(path)
    return HFModelSource(str(path))


def torch_reference(source: HFModelSource) -> TorchStrategy:
    strategy = TorchStrategy()
    strategy.setup(source(), OPTIMIZER)
    return strategy


@pytest.mark.parametrize("stage", [1, 2])
def test_sft_under_ray_train_matches_torch(cluster, base_model, stage: int, tmp_path: Path) -> None:
    data = sft_sequences(24, seed=stage)
    steps = [data[i : i + 8] for i in range(0, 24, 8)]
    result = run_sft_deepspeed(
        base_model,
        steps,
        optimizer=OPTIMIZER,
        options=DeepSpeedOptions(zero_stage=stage),
        storage_path=tmp_path / "ray",
        name=f"sft-zero{stage}",
        num_workers=2,
        micro_batch_size=2,  # 8 sequences per step = 2 ranks x 2 micro-batches x 2
    )
    reference = torch_reference(base_model)
    # Same micro-batches as the ranks (padding per micro-batch): only the summation order differs.
    expected = [reference.train_step(SftObjective(count_targets(s)), micro_batches(s, 2, 0)) for s in steps]
    assert [m["step"] for m in result.history] == [1, 2, 3]
    assert [m["lr"] for m in result.history] == [5e-3, 1e-2, 1e-2]
    for got, want in zip(result.history, expected, strict=True):
        assert abs(got["loss"] - want["loss"]) < LOSS_TOL, (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) < LOSS_TOL * max(1.0, want["grad_norm"])
    assert max(m["grad_norm"] for m in expected) > OPTIMIZER.max_grad_norm  # clipping was active

    # Ray Train merged both ranks' checkpoint directories: HF weights + every rank's optimizer shard.
    ckpt = result.checkpoint
    assert ckpt is not None and (ckpt / "model.safetensors").is_file()
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
    assert [s.split("_mp_")[0] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"]
    reloaded = TorchStrategy()
    reloaded.setup(tiny_model(seed=9), OPTIMIZER)
    reloaded.load(ckpt, weights_only=True)
    assert max_weight_diff(reloaded.unwrap(), reference.unwrap()) < WEIGHT_TOL


def test_papo_step_in_actor_group_matches_torch(cluster, base_model, tmp_path: Path) -> None:
    data = rl_sequences(16, seed=5)
    steps = [data[:8], data[8:]]
    reference = torch_reference(base_model)
    with DeepSpeedActorGroup(2, placement_strategy="PACK") as group:
        group.setup(base_model, OPTIMIZER, DeepSpeedOptions(zero_stage=3))
        got = group.train_step(PolicyObjective("papo", count_targets(steps[0])), steps[0], micro_batch_size=2)
        want = reference.train_step(
            PolicyObjective("papo", count_targets(steps[0])), micro_batches(steps[0], 2, 0)
        )
        assert abs(got["loss"] - want["loss"]) < LOSS_TOL
        synced = group.state_dict()  # what the rollout engine would receive
        assert max_weight_diff(synced, reference.unwrap()) < WEIGHT_TOL
        assert max_weight_diff(synced, base_model()) > 1e-3  # the step moved the weights

        # Resume: save after step 1, take step 2, reload step 1 from the published copy, redo step 2.
        group.save(tmp_path / "ckpt")
        with pytest.raises(ray.exceptions.RayTaskError, match="MANIFEST"):
            group.load(tmp_path / "ckpt")
        publish_dir(tmp_path / "ckpt", str(tmp_path / "published"))
        objective = PolicyObjective("papo", count_targets(steps[1]))
        first = group.train_step(objective, steps[1], micro_batch_size=2)
        after_two = group.state_dict()
        reference.train_step(objective, micro_batches(steps[1], 2, 0))  # lr 1e-2 now: set per step
        assert max_weight_diff(after_two, reference.unwrap()) < WEIGHT_TOL
        assert group.load(tmp_path / "published") == 1
        assert max_weight_diff(group.state_dict(), synced) == 0.0
        second = group.train_step(objective, steps[1], micro_batch_size=2)
        assert second["loss"] == first["loss"]
        assert max_weight_diff(group.state_dict(), after_two) < 1e-7
    reloaded = TorchStrategy()
    reloaded.setup(tiny_model(seed=9), OPTIMIZER)
    reloaded.load(tmp_path / "published", weights_only=True)
    assert max_weight_diff(reloaded.unwrap(), synced) == 0.0
    assert torch.isfinite(torch.tensor(got["grad_norm"]))
