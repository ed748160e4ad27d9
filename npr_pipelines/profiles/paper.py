"""The ``paper`` profile: the paper's setup for Qwen3-4B-Instruct-2507 (``spec/method.md`` §2-5).

Every number the release states is written out here, stage by stage, even where it equals a driver
default, so the profile stays the paper's if a default moves. Where the release fixes no value the
choice is ours and says so:

- RL step counts: not fixed by the release; its draft checkpoint names hint NPR-Zero step 90 and the
  final PAPO checkpoint at step 30 (§2.2, §4.8, §7.15). SR (the sequential-RL ablation) uses PAPO's.
- Prompts (§1.2): one user message with the NPR instruction; the release joins question and
  instruction with one newline in stage 1 and two elsewhere, and so does this profile.
- Seeds: the release seeds SFT and rejection sampling with 521; here they get ``521 + seed`` (the
  release's value at the pipeline's default seed 0) and the RL stages get ``seed``.
- Stage-1 reward: the V1-gated accuracy the paper describes (§2.3; the release had it commented out,
  §7.1).
- Engine KV pool: 16,384 blocks of 16 tokens = 262,144 tokens, i.e. 36 GiB for Qwen3-4B in bf16
  (36 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 144 KiB per token); sized for an 80 GB
  GPU. It changes memory and speed only; lower it for smaller cards.

The weights, the training problems and the benchmark files are not hyper-parameters: they come from
the environment or Dagster config when the assets run (``npr_pipelines.profiles.sources``), so this
module holds no paths, and the stage configs (what run keys hash) do not depend on where data lives.

``compute`` records the paper's hardware per stage (8 GPUs on one node each; FSDP with parameter and
optimizer offload for RL, full sharding for SFT) as the equivalent DeepSpeed ZeRO settings and the
rollout engines' tensor parallelism. The stage drivers' configs take ``device`` and ``dtype`` (set
here); the ZeRO stage and offload are what ``DeepSpeedStrategy(DeepSpeedOptions)`` takes when a
stage trains through DeepSpeed on Ray workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from npr_pipelines.tokenization import NPR_INSTRUCTION, PromptConfig
from npr_pipelines.training.deepspeed_strategy import DeepSpeedOptions
from npr_pipelines.training.distill import RejectionConfig
from npr_pipelines.training.rl import RLConfig, npr_zero_config, papo_config
from npr_pipelines.training.sft import SFTConfig

#: The model the paper trains (a label: the weights come from ``NPR_BASE_MODEL_URI``).
PAPER_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
#: The release's seed for SFT and rejection sampling (``sft_math.sh``, ``sampling.sh``).
RELEASE_SEED = 521

#: Stage 1 joins question and instruction with one newline; stages 2-3 and evaluation with two (§1.2).
STAGE1_PROMPT = PromptConfig(instruction=NPR_INSTRUCTION, separator="\n")
PROMPT = PromptConfig(instruction=NPR_INSTRUCTION, separator="\n\n")

#: 16,384 blocks x 16 tokens (see the module docstring); memory only.
ENGINE_BLOCKS = 16_384


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation decoding (§5.2): avg@8 at T = 1.0, top-p 0.7, no top-k, 30k new tokens, seed 0.

    ``latency_problems`` is this project's concurrency-1 latency measure (not in the paper)."""

    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 30_000
    seed: int = 0
    latency_problems: int = 16


@dataclass(frozen=True)
class StageCompute:
    """The paper's hardware for one stage: GPUs on one node, the ZeRO equivalent of its FSDP set-up,
    and the rollout/serving engines' tensor parallelism x replicas (0 where the stage decodes nothing)."""

    gpus: int
    deepspeed: DeepSpeedOptions | None = None
    engine_tp: int = 0
    engine_replicas: int = 0


@dataclass(frozen=True)
class PaperProfile:
    """Every stage's driver config for a real model, plus the paper's compute per stage."""

    name: str
    model: str
    npr_zero: RLConfig
    rejection: RejectionConfig
    rejection_problems: int  # problems offered to the sampler (the release: --max_problems 65536 = all)
    sft: SFTConfig  # npr_beta; sr_beta is the same with the causal layout
    papo: RLConfig
    sr: RLConfig
    eval: EvalSettings
    compute: Mapping[str, StageCompute]
    train_problems: int | None = None  # problems taken from the train file (None: all of them)
    notes: tuple[str, ...] = field(default=())

    def prompt(self) -> PromptConfig:
        """The prompt of rejection sampling, SFT, PAPO and evaluation (stage 1 joins with one newline)."""
        return self.sft.prompt

    def stage_configs(self, seed: int = 0) -> dict[str, Any]:
        """The same keys as the toy profiles' ``assets.configs.stage_configs``."""
        sft = dataclasses.replace(self.sft, seed=RELEASE_SEED + seed)
        return {
            "npr_zero": self.npr_zero.replace(seed=seed),
            "rejection": dataclasses.replace(self.rejection, seed=RELEASE_SEED + seed),
            "rejection_problems": self.rejection_problems,
            "npr_beta": dataclasses.replace(sft, layout="parallel"),
            "sr_beta": dataclasses.replace(sft, layout="sequential", sequential_share=0.0),
            "npr": self.papo.replace(seed=seed),
            "sr": self.sr.replace(seed=seed),
        }


def _rl_common() -> dict[str, Any]:
    """What every RL stage of the release shares (§2.2, §4.8), on a GPU in bf16."""
    return {
        "betas": (0.9, 0.999),
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 30_000,
        "truncate_multiple": 8,  # §7.16: batches cut to a multiple of 8 rollouts
        "micro_batch_size": 1,  # one sequence per forward (memory only; the gradient is exact)
        "device": "cuda",
        "dtype": "bfloat16",
        "engine_blocks": ENGINE_BLOCKS,
    }


def _npr_zero() -> RLConfig:
    """Stage 1 (§2.1-2.3): ``npr_zero_config``'s paper defaults (DAPO with clip-higher 0.2 / 0.28 and
    dual-clip 10, GRPO advantage, V1-gated reward, 32 prompts x 16, lr 1e-6 cosine with 10 warmup steps,
    dynamic sampling without a cap, one prompt per optimiser step, overlong buffer 10) on the GPU."""
    return npr_zero_config(
        **_rl_common(),
        save_every=10,  # the release validates every 10 steps (§2.2); a checkpoint each time
        prompt=STAGE1_PROMPT,
    )


def _papo() -> RLConfig:
    """Stage 3 (§4.2-4.8): ``papo_config``'s paper defaults (parallel rollouts, structural failures
    dropped, group mean / batch std advantage, ratio-free loss, lr 1e-7 constant, 16 prompts x 16, one
    prompt-worth per optimiser step, repetition penalty 1.02 in branches) on the GPU."""
    return papo_config(
        **_rl_common(),
        max_total_tokens=30_000,  # flattened length limit of a rollout (V4, §1.4)
        clip_ratio_high=0.2,  # §4.6: passed to the loss in the release but inert (ratio = 1); logged only
        save_every=5,  # validation / checkpoint every 5 steps (§4.8)
        prompt=PROMPT,
    )


def _sr(papo: RLConfig) -> RLConfig:
    """The sequential-RL ablation (Table 1 "SR"): PAPO's settings with sequential rollouts."""
    return papo.replace(stage="sr", mode="sequential", branch_repetition_penalty=None, max_total_tokens=None)


def _sft() -> SFTConfig:
    """Parallel SFT (§3.2, ``sft_math.sh``): lr 1e-6, 5% warmup, cosine to 0, AdamW (0.9, 0.95), wd 0.1,
    global batch 8 (1 per GPU), 1 epoch, 32k tokens, corpus order, pure parallel layout."""
    return SFTConfig(
        layout="parallel",
        sequential_share=0.0,
        lr=1e-6,
        warmup_ratio=0.05,
        min_lr_ratio=0.0,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        grad_clip=1.0,
        batch_size=8,
        micro_batch_size=1,
        epochs=1,
        max_steps=None,
        max_length=32_768,
        seed=RELEASE_SEED,
        shuffle=False,
        group_by_length=0,
        plan_balance=0.0,
        save_every=1000,
        prompt=PROMPT,
        device="cuda",
    )


def _rejection() -> RejectionConfig:
    """Rejection sampling (§3.1): up to 8 tries per problem, T = 1, top-p 1, 32,768 new tokens, a
    rolling pool of 1,024 problems; the first correct AND format-perfect trace is kept."""
    return RejectionConfig(
        max_tries=8,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=32_768,
        batch_size=1024,
        seed=RELEASE_SEED,
        prompt=PROMPT,
        num_blocks=ENGINE_BLOCKS,
    )


def _offloaded() -> DeepSpeedOptions:
    """FSDP with parameter + optimizer offload (§2.2, §4.8) as ZeRO-3 with both offloads, bf16."""
    return DeepSpeedOptions(zero_stage=3, offload_optimizer=True, offload_params=True, bf16=True)


def _compute() -> Mapping[str, StageCompute]:
    return MappingProxyType(
        {
            # §2.2: 8 GPUs, FSDP param+optimizer offload; SGLang rollouts TP 8.
            "npr_zero": StageCompute(gpus=8, deepspeed=_offloaded(), engine_tp=8, engine_replicas=1),
            # §3.1: SGLang, TP = #GPUs (the release does not say how many GPUs; 8 like the other stages).
            "rejection": StageCompute(gpus=8, engine_tp=8, engine_replicas=1),
            # §3.2: 8 GPUs, FSDP full_shard (no offload), per-device batch 1.
            "npr_beta": StageCompute(gpus=8, deepspeed=DeepSpeedOptions(zero_stage=3, bf16=True)),
            "sr_beta": StageCompute(gpus=8, deepspeed=DeepSpeedOptions(zero_stage=3, bf16=True)),
            # §4.8: 8 GPUs, FSDP2 param+optimizer offload; NPR engine TP 4 x 2 replicas.
            "npr": StageCompute(gpus=8, deepspeed=_offloaded(), engine_tp=4, engine_replicas=2),
            "sr": StageCompute(gpus=8, deepspeed=_offloaded(), engine_tp=4, engine_replicas=2),
            # §5.2: TP 2 x DP 4 on 8 GPUs.
            "eval": StageCompute(gpus=8, engine_tp=2, engine_replicas=4),
        }
    )


def paper_profile() -> PaperProfile:
    papo = _papo()
    return PaperProfile(
        name="paper",
        model=PAPER_MODEL,
        npr_zero=_npr_zero(),
        rejection=_rejection(),
        rejection_problems=65_536,
        sft=_sft(),
        papo=papo,
        sr=_sr(papo),
        eval=EvalSettings(),
        compute=_compute(),
        train_problems=None,
        notes=(
            "Train problems: ORZ-57k converted to id/question/answer rows (NPR_TRAIN_PROBLEMS).",
            "RL step counts are hints from the release's draft checkpoint names (NPR-Zero 90, PAPO 30).",
        ),
    )


PAPER = paper_profile()
