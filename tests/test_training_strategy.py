"""Training strategies, single process: gradient accumulation is exact under the global-denominator
loss contract, save/load resumes bit-identically, the DeepSpeed config and the pickle guard.

The multi-process DeepSpeed/Ray checks are in ``test_training_strategy_ray.py`` (they reuse the data
builders here).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from npr_pipelines.engine.testing import CharCodec, tiny_qwen3
from npr_pipelines.storage.api import publish_dir
from npr_pipelines.storage.manifest import ArtifactError
from npr_pipelines.structure import Trace, encode_trace
from npr_pipelines.training.batch import TrainSequence, rl_sequence, sft_sequence, use_segment_attention
from npr_pipelines.training.checkpoint import weights_digest
from npr_pipelines.training.deepspeed_strategy import build_ds_config, verify_deepspeed_files
from npr_pipelines.training.strategy import (
    OptimizerConfig,
    PolicyObjective,
    SftObjective,
    Strategy,
    TorchStrategy,
    count_targets,
    micro_batches,
    shard,
)

CC = CharCodec()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 1) -> torch.nn.Module:
    model = tiny_qwen3(CC.vocab_size, seed=seed, hidden=32, layers=1)
    use_segment_attention(model)
    return model


def sft_sequences(n: int, seed: int = 0) -> list[TrainSequence]:
    """Parallel-layout SFT sequences of varied shapes (1-3 branches, varied lengths)."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 6)))  # noqa: E731
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        trace = Trace.build(
            [([word() for _ in range(k)], [word() for _ in range(k)], word())], f"\\boxed{{{i}}}"
        )
        response = encode_trace(trace, CC.tags, CC.encode)
        prompt = CC.encode(f"q{i}?\n")
        out.append(
            sft_sequence(
                prompt, response, layout="parallel", vocab=CC.tags, decode=CC.decode, encode=CC.encode
            )
        )
    return out


def rl_sequences(n: int, seed: int = 0) -> list[TrainSequence]:
    """RL sequences on parallel layouts; the untrained header labels stand in for engine-inserted tokens."""
    rng = random.Random(seed + 100)
    out = []
    for s in sft_sequences(n, seed):
        p = s.prompt_len
        response = s.ids[p:]
        inserted = [not t for t in s.trainable[p:]]
        old = [-rng.uniform(1.0, 5.0) for _ in response]
        out.append(
            rl_sequence(s.ids[:p], response, s.layout, inserted, old, advantage=rng.choice([-1.0, 0.5, 1.5]))
        )
    return out


def objective(kind: str, seqs: list[TrainSequence]):
    if kind == "sft":
        return SftObjective(count_targets(seqs))
    return PolicyObjective("papo", count_targets(seqs))


def max_weight_diff(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> float:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("kind", ["sft", "papo"])
def test_gradient_accumulation_equals_one_big_batch(kind: str) -> None:
    data = sft_sequences(24) if kind == "sft" else rl_sequences(24)
    steps = [data[i : i + 8] for i in range(0, 24, 8)]
    config = OptimizerConfig(lr=1e-2, max_grad_norm=0.2)
    whole, accum = TorchStrategy(), TorchStrategy()
    whole.setup(tiny_model(), config)
    accum.setup(tiny_model(), config)
    assert isinstance(whole, Strategy)
    for seqs in steps:
        a = whole.train_step(objective(kind, seqs), micro_batches(seqs, 8, pad_id=0))
        b = accum.train_step(objective(kind, seqs), micro_batches(seqs, 4, pad_id=0))
        # Relative above 1: the SFT loss is ~5, where 1e-6 is ~2 float32 ulps (measured 4.8e-7).
        assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-6 * max(1.0, a["grad_norm"])
    assert a["grad_norm"] > 0.2  # clipping was active
    assert whole.global_step == accum.global_step == 3
    # measured 6e-8 (sft), 1.2e-7 (papo) on AVX-512 kernels; 5.8e-6 (papo) on AVX2: Adam rescales tiny diffs
    assert max_weight_diff(whole.unwrap(), accum.unwrap()) < 2e-5


def test_save_load_resumes_to_identical_weights(tmp_path: Path) -> None:
    seqs = sft_sequences(16)
    steps = [seqs[i : i + 4] for i in range(0, 16, 4)]
    config = OptimizerConfig(lr=1e-2, schedule=lambda step: 1e-2 * min(1.0, (step + 1) / 3))
    run = TorchStrategy()
    run.setup(tiny_model(), config)
    for s in steps[:2]:
        run.train_step(SftObjective(count_targets(s)), micro_batches(s, 2, 0))
    saved = run.save(tmp_path / "ckpt")
    after = [run.train_step(SftObjective(count_targets(s)), micro_batches(s, 2, 0)) for s in steps[2:]]
    assert [m["lr"] for m in after] == [1e-2, 1e-2]

    resumed = TorchStrategy()
    resumed.setup(tiny_model(seed=7), config)
    resumed.load(saved)
    assert resumed.global_step == 2
    again = [resumed.train_step(SftObjective(count_targets(s)), micro_batches(s, 2, 0)) for s in steps[2:]]
    assert [m["loss"] for m in again] == [m["loss"] for m in after]
    assert weights_digest(resumed.unwrap()) == weights_digest(run.unwrap())
    # What the checkpoint holds: HF weights and optimizer state as safetensors + JSON, nothing pickled.
    names = {p.name for p in saved.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "strategy.json",
    } <= names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)


def test_weights_only_load(tmp_path: Path) -> None:
    source = tiny_model(seed=3)
    source.save_pretrained(tmp_path / "hf")
    strategy = TorchStrategy()
    strategy.setup(tiny_model(seed=4), OptimizerConfig())
    with pytest.raises(FileNotFoundError, match="weights_only"):
        strategy.load(tmp_path / "hf")
    strategy.load(tmp_path / "hf", weights_only=True)
    assert weights_digest(strategy.unwrap()) == weights_digest(source)
    assert strategy.global_step == 0


def test_shard_and_micro_batches() -> None:
    seqs = sft_sequences(8)
    parts = [shard(seqs, r, 2) for r in range(2)]
    assert parts[0] + parts[1] == seqs
    assert [b.input_ids.shape[0] for b in micro_batches(parts[1], 3, 0)] == [3, 1]
    with pytest.raises(ValueError, match="evenly"):
        shard(seqs[:7], 0, 2)


def test_build_ds_config() -> None:
    cfg = build_ds_config(zero_stage=2, micro_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"] == {"enabled": False}
    assert "optimizer" not in cfg  # the optimizer is a torch AdamW object, never a DeepSpeed op
    off = build_ds_config(
        zero_stage=3, max_grad_norm=None, bf16=True, offload_optimizer=True, offload_params=True
    )
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["gradient_clipping"] == 0.0 and off["bf16"]["enabled"]
    with pytest.raises(ValueError, match="stage 3"):
        build_ds_config(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="0-3"):
        build_ds_config(zero_stage=4)


def test_deepspeed_state_is_read_only_from_manifest_verified_dirs(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"not really a pickle")
    (ckpt / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="MANIFEST"):
        verify_deepspeed_files(ckpt)
    published = tmp_path / "published"
    publish_dir(ckpt, str(published))
    verify_deepspeed_files(published)
    (published / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"extra")
    with pytest.raises(ArtifactError, match="zero_pp_rank_1"):
        verify_deepspeed_files(published)
    (published / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (published / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="mp_rank_00"):
        verify_deepspeed_files(published)
