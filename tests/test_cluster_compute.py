"""The cluster profile's building blocks, on one local Ray node (loopback, token auth):

- `ClusterCompute` (the layout a stage job gets) and how the Ray resource selects it;
- `EnginePool`: requests dealt to two engine replicas (Ray actors) come back in order and equal to what
  the in-process engine decodes for the same chunks; ``sync_weights`` pushes the trainer's weights
  (digests reported by the replicas equal the trainer's) and the next rollouts use them;
- `RayDeepSpeedStrategy`: ZeRO-2, and ZeRO-3 with optimizer and parameter offload, on two DeepSpeed
  actors driven through ``train_sequences`` matches `TorchStrategy` step for step (an odd batch is padded
  with target-free copies, which change nothing), and its checkpoint (files gathered from both ranks)
  reloads to the weights rank 0 reported.

The multi-node run of the whole pipeline is ``test_cluster_profile.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_training_strategy import CC, max_weight_diff, sft_sequences, tiny_model

from npr_pipelines.compute.cluster import ClusterCompute
from npr_pipelines.compute.engine_pool import split_balanced
from npr_pipelines.engine import Engine, EngineConfig, Request, SamplingParams
from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.storage.weights import state_digest
from npr_pipelines.training.ray_strategy import ModuleSource, pad_to_multiple
from npr_pipelines.training.strategy import (
    OptimizerConfig,
    SftObjective,
    TorchStrategy,
    count_targets,
    micro_batches,
)
from resources import RayResource

TOL = 1e-5


# A warmup schedule (a lambda: Ray pickles it by value; a test-module function would not import there).
OPTIMIZER = OptimizerConfig(lr=1e-2, max_grad_norm=1.0, schedule=lambda step: 1e-2 * min(1.0, (step + 1) / 2))


# ------------------------------------------------------------------------------ no cluster needed
def test_cluster_compute_round_trips_and_validates() -> None:
    compute = ClusterCompute(
        train_workers=2, zero_stage=3, offload_params=True, placement_strategy="STRICT_SPREAD"
    )
    assert ClusterCompute.from_json(compute.to_json()) == compute
    options = compute.deepspeed_options()
    assert (options.zero_stage, options.offload_params, options.offload_optimizer) == (3, True, False)
    with pytest.raises(ValueError, match="placement_strategy"):
        ClusterCompute(placement_strategy="ANYWHERE")
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        ClusterCompute(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="unknown cluster compute fields"):
        ClusterCompute.from_json({**compute.to_json(), "pickle_path": "/x"})


def test_ray_resource_selects_the_cluster_layout() -> None:
    assert RayResource().cluster_compute() is None  # embedded by default
    assert RayResource(job_submission_address="http://127.0.0.1:8265").cluster_compute() is None
    layout = RayResource(
        job_submission_address="http://127.0.0.1:8265", compute="cluster", placement_strategy="STRICT_SPREAD",
        zero_stage=1, engine_replicas=3,
    ).cluster_compute()  # fmt: skip
    assert (
        layout
        == ClusterCompute(placement_strategy="STRICT_SPREAD", zero_stage=1, engine_replicas=3).to_json()
    )
    with pytest.raises(ValueError, match="job_submission_address"):
        RayResource(compute="cluster").cluster_compute()  # the layout lives inside stage jobs
    with pytest.raises(ValueError, match="compute must be one of"):
        RayResource(compute="gpu").cluster_compute()


def test_split_balanced_keeps_order() -> None:
    assert split_balanced(list(range(7)), 2) == [[0, 1, 2], [3, 4, 5, 6]]
    assert split_balanced([1], 3) == [[], [], [1]]
    for n in range(12):
        chunks = split_balanced(list(range(n)), 3)
        assert [x for c in chunks for x in c] == list(range(n)) and max(map(len, chunks)) - min(
            map(len, chunks)
        ) <= 1


def test_target_free_padding_changes_nothing() -> None:
    seqs = sft_sequences(7, seed=3)
    padded = pad_to_multiple(seqs, 2)
    assert len(padded) == 8 and count_targets(padded) == count_targets(seqs)
    a, b = TorchStrategy(), TorchStrategy()
    a.setup(tiny_model(seed=2), OPTIMIZER)
    b.setup(tiny_model(seed=2), OPTIMIZER)
    objective = SftObjective(count_targets(seqs))
    out_a = a.train_step(objective, micro_batches(seqs, 1, 0))
    out_b = b.train_step(objective, micro_batches(padded, 1, 0))
    assert out_a["loss"] == out_b["loss"]
    assert max_weight_diff(a.unwrap(), b.unwrap()) == 0.0


def test_module_source_rebuilds_the_model_without_files() -> None:
    model = tiny_model(seed=4)
    rebuilt = ModuleSource.of(model)()
    assert state_digest(rebuilt.state_dict()) == state_digest(model.state_dict())
    assert rebuilt.config._attn_implementation == model.config._attn_implementation  # layout attention


# ------------------------------------------------------------------------------------ local Ray
@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    from npr_pipelines.compute import local_ray, shutdown_ray

    shutdown_ray()  # a Ray another module left attached would be reused instead
    with local_ray(num_cpus=3, log_to_driver=False):
        yield


def _requests(n: int) -> list[Request]:
    prompts = ["1+2=", "abc", "7*6=?", "hello", "x", "q: 3-1"]
    return [
        Request(f"r{i}", CC.encode(prompts[i % len(prompts)]), SamplingParams(mode="sequential", max_tokens=12,
                                                                               seed=100 + i))
        for i in range(n)
    ]  # fmt: skip


def _local(model: torch.nn.Module, chunks: list[list[Request]]) -> list:
    """The in-process engine decoding each chunk on its own (one thread, as each replica)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(model, CC.codec(), CC.tags, EngineConfig(num_blocks=256))
        return [out for chunk in chunks if chunk for out in engine.generate(chunk)]
    finally:
        torch.set_num_threads(threads)


def _same(got: list, want: list) -> None:
    assert [o.request_id for o in got] == [o.request_id for o in want]
    for g, w in zip(got, want, strict=True):
        assert g.response_ids == w.response_ids and g.logprobs == w.logprobs, g.request_id


def test_engine_pool_dispatches_and_syncs_weights(cluster) -> None:
    from npr_pipelines.compute.engine_pool import EnginePool

    model = tiny_qwen3(CC.vocab_size, seed=3, hidden=32, layers=1)
    requests = _requests(7)
    chunks = split_balanced(requests, 2)
    with EnginePool(model, CC.codec(), CC.tags, EngineConfig(num_blocks=256), replicas=2) as pool:
        got = pool.generate(requests)
        _same(got, _local(model, chunks))
        assert [o.metadata["replica"] for o in got] == [0] * 3 + [1] * 4
        assert not any(o.approximate for o in got)

        with torch.no_grad():  # an "update" of the trainer's weights
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        digests = pool.sync_weights(model)
        assert digests == [state_digest(model.state_dict())] * 2
        after = pool.generate(requests)
        _same(after, _local(model, chunks))
        assert [o.response_ids for o in after] != [o.response_ids for o in got]
        assert {o.metadata["weight_version"] for o in after} == {1}

        info = pool.describe()
        assert info["replica_ids"] == [0, 1] and len(info["node_ids"]) == 2
        assert info["requests"] == [6, 8] and info["weight_version"] == 1
        assert info["weights_sha256"] == digests
        placement_group = pool.placement_group
    from ray.util import placement_group_table

    assert placement_group_table(placement_group)["state"] == "REMOVED"  # released on exit


def test_owner_rollouts_share_the_cpus_of_a_task_that_holds_them_all(cluster) -> None:
    """The embedded layout: an RL stage task holds every CPU of the node; its replicas reserve none, so
    they start (a placement group would wait forever) and decode what the in-process engine decodes."""
    import ray

    from npr_pipelines.compute.cluster import ROLLOUTS, STRATEGY, owner_rollouts

    model = tiny_qwen3(CC.vocab_size, seed=3, hidden=32, layers=1)
    requests = _requests(5)

    def stage_task(model, codec, tags, requests):
        with owner_rollouts(STRATEGY, 2) as sft_extra, owner_rollouts(ROLLOUTS, 0) as in_process:
            assert sft_extra == {} and in_process == {}
        with owner_rollouts(ROLLOUTS, 2) as extra:
            pool = extra["rollout_engine"](model, codec, tags, EngineConfig(num_blocks=256))
            return pool.generate(requests), pool.describe()

    total = int(ray.cluster_resources()["CPU"])
    ref = ray.remote(num_cpus=total)(stage_task).remote(model, CC.codec(), CC.tags, requests)
    got, info = ray.get(ref, timeout=120)
    _same(got, _local(model, split_balanced(requests, 2)))
    assert info["placement_strategy"] == "owner" and info["requests"] == [2, 3]


def test_which_embedded_stages_roll_out_on_owner_replicas() -> None:
    from npr_pipelines.compute.cluster import ROLLOUTS, STRATEGY, owner_replicas
    from npr_pipelines.training.rl import RLConfig

    assert RayResource(num_cpus=2).embedded_rollout_replicas() == 2  # one per training CPU
    assert RayResource(num_cpus=1).embedded_rollout_replicas() == 0  # the in-process engine
    assert RayResource(num_cpus=4, rollout_replicas=0).embedded_rollout_replicas() == 0
    assert RayResource(num_cpus=1, rollout_replicas=3).embedded_rollout_replicas() == 3
    papo = RLConfig(prompts_per_step=64, group_size=8)
    assert owner_replicas(ROLLOUTS, papo, 2) == 2
    assert owner_replicas(ROLLOUTS, papo.replace(prompts_per_step=16), 2) == 0  # too small to pay off
    assert owner_replicas(ROLLOUTS, papo.replace(device="cuda"), 2) == 0  # the engine shares the GPU
    assert owner_replicas(STRATEGY, papo, 2) == 0 and owner_replicas(ROLLOUTS, papo, 0) == 0


@pytest.mark.parametrize(
    "options", [{"zero_stage": 2}, {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}]
)
def test_ray_deepspeed_strategy_matches_torch(cluster, options: dict, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from npr_pipelines.storage.api import publish_dir
    from npr_pipelines.training.deepspeed_strategy import DeepSpeedOptions
    from npr_pipelines.training.ray_strategy import RayDeepSpeedStrategy

    data = sft_sequences(14, seed=6)
    steps = [data[:7], data[7:]]  # odd: each step is padded with one target-free copy
    reference = TorchStrategy()
    reference.setup(tiny_model(seed=1), OPTIMIZER)
    with RayDeepSpeedStrategy(
        DeepSpeedOptions(**options), num_workers=2, placement_strategy="PACK"
    ) as strategy:
        strategy.setup(tiny_model(seed=1), OPTIMIZER)
        assert len(strategy.node_ids) == 2
        for seqs in steps:
            objective = SftObjective(count_targets(seqs))
            got = strategy.train_sequences(objective, seqs, 2, 0)
            padded = pad_to_multiple(seqs, 2)
            want = reference.train_step(
                objective, micro_batches(padded[:4], 2, 0) + micro_batches(padded[4:], 2, 0)
            )
            assert abs(got["loss"] - want["loss"]) < TOL and got["step"] == want["step"]
            assert got["padded_tokens"] > 0
        assert max_weight_diff(strategy.unwrap(), reference.unwrap()) < TOL

        strategy.save(tmp_path / "ckpt")
        state = strategy.state_for_checkpoint()
        assert (state["kind"], state["world_size"], state["zero_stage"]) == (
            "deepspeed",
            2,
            options["zero_stage"],
        )
        assert state["offload_params"] == options.get("offload_params", False)
        shards = sorted(p.name.split("_mp_")[0] for p in (tmp_path / "ckpt/deepspeed/state").glob("*optim*"))
        assert shards == ["zero_pp_rank_0", "zero_pp_rank_1"]  # both ranks' files, gathered here
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", use_safetensors=True)
        assert state_digest(reloaded.state_dict()) == state["weights_sha256"]
        assert state["weights_sha256"] == state_digest(strategy.unwrap().state_dict())

        # Resume every rank from the published copy (DeepSpeed state is read only when manifested).
        publish_dir(tmp_path / "ckpt", str(tmp_path / "published"))
        strategy.train_sequences(SftObjective(count_targets(steps[0])), steps[0], 2, 0)
        strategy.load(tmp_path / "published")
        assert strategy.global_step == 2
        assert state_digest(strategy.unwrap().state_dict()) == state["weights_sha256"]


def test_deepspeed_sft_resumes_from_the_published_checkpoint(cluster, tmp_path: Path) -> None:
    """A cluster SFT killed after a checkpoint resumes its DeepSpeed ranks from the published copy (the
    stage job adopts it: local checkpoints carry no manifest, and DeepSpeed's pickles are read only from
    manifest-verified directories) and ends with the uninterrupted run's weights."""
    pytest.importorskip("deepspeed")
    from _support import byte_bpe_tokenizer
    from test_training_sft import CFG, corpus
    from transformers import AutoModelForCausalLM

    from npr_pipelines.compute.cluster import STRATEGY, stage_compute
    from npr_pipelines.compute.stage_job import adopt_published_resume_point
    from npr_pipelines.storage import Storage
    from npr_pipelines.training.sft import CHECKPOINTS, run_sft

    tok = byte_bpe_tokenizer(with_tags=False)
    base = tmp_path / "base"
    tiny_qwen3(len(tok), seed=3).save_pretrained(base)
    tok.save_pretrained(base)
    layout = ClusterCompute(train_workers=2, placement_strategy="PACK")
    store = Storage(str(tmp_path / "artifacts"))

    def sft(workdir: Path, **kwargs):
        with stage_compute(STRATEGY, layout) as extra:
            return run_sft(base, corpus(), CFG, workdir, **extra, **kwargs)

    full = sft(tmp_path / "full")
    assert full.metrics["strategy"]["kind"] == "deepspeed" and [s for s, _ in full.checkpoints] == [2, 4]

    class Crash(RuntimeError):
        pass

    def crash(step: int, path: Path) -> None:
        raise Crash  # killed right after writing step 2, before publishing it

    with pytest.raises(Crash):
        sft(tmp_path / "resumed", on_checkpoint=crash)
    with pytest.raises(Exception, match="MANIFEST"):  # the local copy alone is refused
        sft(tmp_path / "resumed")
    root = tmp_path / "resumed" / CHECKPOINTS
    assert adopt_published_resume_point(store, "npr_beta", "k", root) == root / "step-000002"
    assert store.is_published(store.uri("checkpoints", "npr_beta", "k", "step-000002"))
    assert adopt_published_resume_point(store, "npr_beta", "k", root) is None  # already verified
    resumed = sft(tmp_path / "resumed")
    assert resumed.metrics["resumed_from"] == 2 and resumed.final_step == 4
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    final = [AutoModelForCausalLM.from_pretrained(r.final_dir) for r in (full, resumed)]
    assert max_weight_diff(final[0], final[1]) < 1e-6
