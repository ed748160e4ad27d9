"""Toy profiles: every stage's knobs for the ~1M-parameter toy world.

These are NOT the paper's values. The paper's settings (``spec/method.md``: NPR-Zero lr 1e-6, parallel
SFT lr 1e-6, PAPO lr 1e-7, 32k-token responses, 16x16 rollouts) would not move a 1M-parameter model at
all; ``PAPER`` keeps them for reference only. The toy values are starting points from
``spec/toy-notes.md`` (RL at lr 1e-4 is stable, 2e-4 degrades, 5e-4 collapses; a fresh SFT needs ~2e-3)
and are expected to be tuned by the stages that use them.

Two profiles: ``default`` (the embedded ``make run``: minutes on 2 CPU cores) and ``small`` (a smaller
model and a few steps per stage, for tests: the whole graph, end to end, in about a minute).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from npr_pipelines.toy.bootstrap import BootstrapConfig, MixtureConfig, TrainConfig
from npr_pipelines.toy.model import ModelConfig
from npr_pipelines.toy.problems import ProblemConfig
from npr_pipelines.toy.tokenizer import TokenizerConfig

if TYPE_CHECKING:  # the runner pulls in the engine; profiles stay importable without it
    from npr_pipelines.eval.runner import EvalConfig as RunnerEvalConfig


@dataclass(frozen=True)
class RLStageConfig:
    """An RL stage (NPR-Zero with sequential rollouts; PAPO with parallel rollouts)."""

    lr: float
    steps: int
    prompts_per_step: int
    group_size: int  # rollouts per prompt
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    mini_batches_per_step: int = 1  # optimiser steps per rollout batch
    clip_ratio_low: float = 0.2  # DAPO clip-higher (NPR-Zero); PAPO is ratio-free
    clip_ratio_high: float = 0.28
    max_gen_batches: int = 4  # DAPO dynamic sampling (NPR-Zero): cap on generation batches per step
    drop_schema_failures: bool = False  # also drop clean rollouts that are not format-valid (``RLConfig``)
    skip_zero_advantage: bool = True  # leave zero-advantage rollouts out of the backward pass (exact)
    save_every: int = 0  # 0: final checkpoint only


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """Stage-2 self-distillation: at most ``max_tries`` samples per problem, first accepted one kept."""

    max_tries: int
    n_problems: int  # train-split problems offered to the sampler
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256


@dataclass(frozen=True)
class SFTStageConfig:
    """Parallel SFT (and the sequential SFT ablation) on the self-distilled corpus."""

    lr: float
    epochs: int
    batch_size: int
    max_length: int
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int | None = None  # cap on optimiser steps (None: epochs decide)
    shuffle: bool = True  # a seeded permutation per epoch (the paper: corpus order)
    group_by_length: int = 0  # sort windows of this many batches by length (less padding)
    # Share of visits trained under the causal layout: the parallel layout never trains the step
    # labels, which sequential-mode decoding must write itself (``training/sft.py``). Paper: 0.
    sequential_share: float = 0.0
    plan_balance: float = 0.0  # weight visits by plans-per-guideline group (``training/sft.py``). Paper: 0.


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of every checkpoint on the held-out toy split."""

    n_problems: int
    n_samples: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 320
    seed: int = 0
    batch_size: int = 256
    # Latency speedup: the first this-many problems, one request at a time, in each mode (cheap: ~seconds).
    latency_problems: int = 16

    def sampling(self, **overrides: Any) -> dict[str, Any]:
        """The evaluation runner's sampling settings (``eval.runner.EvalConfig`` keywords), ``overrides``
        on top: the one place the toy protocol becomes runner settings."""
        kwargs = dict(n_samples=self.n_samples, temperature=self.temperature, top_p=self.top_p,
                      max_new_tokens=self.max_new_tokens, seed=self.seed)  # fmt: skip
        return {**kwargs, **overrides}

    def runner_config(self, **overrides: Any) -> RunnerEvalConfig:
        """``eval.runner.EvalConfig`` for this protocol (e.g. ``runner_config(mode="parallel")``)."""
        from npr_pipelines.eval.runner import EvalConfig as RunnerEvalConfig

        return RunnerEvalConfig(**self.sampling(**overrides))


@dataclass(frozen=True)
class ToyProfile:
    """Every knob of the embedded toy pipeline, stage by stage."""

    name: str
    bootstrap: BootstrapConfig
    npr_zero: RLStageConfig
    rejection_sampling: RejectionSamplingConfig
    parallel_sft: SFTStageConfig
    papo: RLStageConfig
    eval: EvalConfig
    train_problems: int  # size of the train_problems asset (drawn from the train split)
    # The stage-1 reward. The specified V1-gated one ("format_gated_accuracy") pays a toy model that is
    # ~13% accurate inside the format to break it (``rl/rewards.py``); the ranked variant keeps the gate.
    npr_zero_reward: str = "format_gated_accuracy_ranked"
    sr: RLStageConfig | None = None  # the sequential-RL ablation (None: PAPO's entry)
    eval_split: str = "test"
    notes: tuple[str, ...] = field(default=())


DEFAULT = ToyProfile(
    name="default",
    bootstrap=BootstrapConfig(),
    # Sized so `make run` (bootstrap included) fits 600 s on 2 cores (the earlier machines; ~1,400 s on
    # a 2-core AVX2 EPYC, README). Measured at seed 0, stage by stage:
    # NPR-Zero lifts held-out format validity from 0.05 to ~0.99 (top-p 0.7) in 15 steps (~4 s each:
    # dynamic sampling needs a second batch about half the time); rejection sampling accepts ~50% of
    # the problems offered within 8 tries; 400 steps of parallel SFT on the ~300 traces (~45 s) give
    # format validity ~0.99 in parallel mode and ~0.96 in sequential mode. SFT's causal share, on one
    # corpus: 0 -> parallel accuracy 0.26 but sequential validity 0.0 (the parallel layout never trains
    # step labels); 0.25 -> 0.23 / 0.91; 0.4 -> 0.24 / 0.96; 0.55 -> 0.18 / 0.93; 0.75 -> 0.23 / 0.96.
    npr_zero=RLStageConfig(
        lr=1e-4,
        steps=15,
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=256,
        warmup_steps=3,
        max_gen_batches=2,
        # Dynamic sampling leaves few zero advantages here (0-11 of ~128 rows a step, ties of the ranked
        # reward); skipping them would only reorder float sums, which re-rolls every figure downstream
        # of this profile as measured (a run whose NPR-Zero rolled out on engine replicas, another
        # float-level change, moved NPR-Beta's sequential-mode validity from 0.94 to 0.88).
        skip_zero_advantage=False,
    ),
    # Rejection sampling at the evaluation's top-p (the paper samples stage 2 at top-p 1.0): the corpus
    # size is what makes NPR-Beta format-valid when it writes the step labels itself (sequential mode).
    # Measured on an AVX2 machine from one NPR-Zero (dev split, 300 problems; NPR-Beta parallel acc /
    # valid, sequential acc / valid): 400 problems at top-p 1.0 (before) accept 0.49, 195 traces ->
    # 0.227 / 0.99, 0.237 / 0.91; at top-p 0.7 0.53, 211 -> 0.187 / 0.99, 0.207 / 0.89; 600 problems
    # at top-p 1.0 0.46, 277 -> 0.213 / 0.99, 0.207 / 0.97; 600 at top-p 0.7 0.51, 304 -> 0.260 / 1.0,
    # 0.247 / 0.98. Longer SFT did not help (487 steps, all 20 epochs: sequential valid 0.88), nor a
    # causal share of 0.5 (0.90).
    rejection_sampling=RejectionSamplingConfig(max_tries=8, n_problems=600, max_new_tokens=320, top_p=0.7),
    parallel_sft=SFTStageConfig(
        lr=2e-3,
        epochs=20,
        batch_size=8,
        max_length=512,
        max_steps=400,
        group_by_length=8,
        sequential_share=0.4,
        plan_balance=1.0,
    ),
    # PAPO: one optimiser step per batch of 64 prompts x 8 rollouts, and the paper's schema-level filter
    # (format-invalid or non-parallel rollouts dropped, ``RLConfig.drop_schema_failures``). Smaller
    # batches (16 x 8, 1-4 optimiser steps) gave a random walk at lr 5e-5 and lost accuracy at 1e-4;
    # 64 x 8 at lr 1e-4 gains steadily but slowly (see the notes). 24 steps take the wall time 12 did
    # before zero-advantage rows left the backward pass (train 4.1 -> 1.9 s a step) and the rollouts moved
    # to one engine replica per core (``RayResource.rollout_replicas``): dev +0.025 [-0.011, +0.062] after
    # 24 (+0.022 after 12), within noise; `make papo-study` runs 128.
    papo=RLStageConfig(
        lr=1e-4,
        steps=24,
        prompts_per_step=64,
        group_size=8,
        max_new_tokens=320,
        drop_schema_failures=True,
    ),
    sr=RLStageConfig(
        lr=5e-5,
        steps=10,
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=320,
        mini_batches_per_step=4,
        drop_schema_failures=True,
    ),
    # The paper's protocol (method.md §5.2): T = 1.0, top-p 0.7.
    # Latency: the median of 32 requests decoded one at a time (16 moved it 1.26-1.65 between runs).
    eval=EvalConfig(n_problems=300, n_samples=1, top_p=0.7, latency_problems=32),
    train_problems=8000,
    notes=(
        "RL lrs follow toy-notes §4: 1e-4 is stable, 2e-4 degrades, 5e-4 collapses on this model.",
        "Rejection sampling needs NPR-Zero to raise the format first: the base model writes the "
        "parallel format in ~5% of its samples.",
        "PAPO from this NPR-Beta (parallel accuracy ~0.20 at top-p 0.7, n = 2 x 300 problems), final "
        "checkpoints: lr 5e-5 x 20 steps -0.013; 1e-4 x 40 +0.035 (trigger 0.99); 2e-4 x 20 -0.017; "
        "5e-5 x 4 mini-batches x 15 steps +0.037 (seed 0) / -0.020 (seed 1), x 30 steps +0.012; "
        "32 prompts x 15 steps -0.015. Its errors are in reading the branches' results after the "
        "join (greedy decoding is no better: 0.21), which RL at these budgets does not move.",
        "Later, from the make-run NPR-Beta (dev split, n = 4 x 300, paired bootstrap): this profile's "
        "PAPO +0.010 [-0.025, +0.047]; rollouts at top-p 0.7 (the evaluation's) -0.019, with lr 1e-4 "
        "-0.033, x 40 steps -0.092; 160 steps (8x the budget), every 20: +0.010, -0.028, -0.003, "
        "+0.017, +0.024, -0.015, +0.014, +0.018 (none above 0 at 95%): a random walk, not a trend.",
        "Batch size is what mattered (same NPR-Beta, dev, n = 4 x 300): 16 x 8 rollouts with 4 optimiser "
        "steps at lr 1e-4 lost 0.05 in 10 steps and broke the format by step 30 (validity 0.01; 0.81 "
        "with the schema filter). 64 x 8 with one optimiser step, lr 1e-4, schema filter: +0.007, "
        "+0.020, +0.029, +0.040, +0.046 [+0.006, +0.085], +0.045 at steps 8-48 (at top-p 1.0: +0.019 "
        "... +0.060 [+0.027, +0.093]); lr 2e-4 -0.023 and T = 0.7 rollouts -0.007 at step 16; Adam eps "
        "1e-5 no different. make papo-study (test split, final checkpoint): 64 steps +0.033 [-0.012, "
        "+0.079]; 128 steps +0.110 [+0.061, +0.159], matched SFT control -0.011.",
        "24 steps (dev, n = 4 x 300): +0.025 [-0.011, +0.062]; format validity 0.990, trigger 0.9975 "
        "(NPR-Beta: 0.993 / 0.9975). The stage-1 style ranked format-gated reward instead of the schema "
        "filter (invalid rollouts kept and ranked below every valid one): +0.028 [-0.007, +0.065], "
        "validity 0.998, trigger 0.9975: the same gain; not adopted (the paper's PAPO reward is accuracy "
        "only).",
    ),
)

SMALL = ToyProfile(
    name="small",
    # Small enough for tests, trained enough that the whole graph runs: rejection sampling must accept
    # some traces (strictly: format-perfect AND correct), so the bootstrap teaches only the easiest
    # problems (k = 2, both families), only in the parallel format (a few corrupted), with little
    # teacher noise; one thread (tiny matrices, a shared 2-core machine). Measured in the pipeline at
    # seed 0: 178 rejection-sampling attempts at T=1, 58% format-valid, 8 of 48 problems accepted.
    bootstrap=BootstrapConfig(
        num_threads=1,
        problems=ProblemConfig(k_values=(2,), k_weights=(1.0,)),
        tokenizer=TokenizerConfig(vocab_size=320, corpus_problems=300),
        model=ModelConfig(
            hidden_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=192,
        ),
        mixture=MixtureConfig(parallel_share=1.0, corrupt_share=0.1, noise_rate=0.05),
        train=TrainConfig(steps=240, batch_size=32, lr=3e-3, warmup_steps=24, log_every=48),
    ),
    # Tag strings are several tokens each before stage 2: a k=2 parallel trace is ~100 tokens.
    npr_zero=RLStageConfig(lr=1e-4, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=128),
    # ~200 samples at ~5% acceptable: about 9 accepted problems expected (none at all: < 1e-4).
    rejection_sampling=RejectionSamplingConfig(max_tries=4, n_problems=48, max_new_tokens=128, batch_size=64),
    parallel_sft=SFTStageConfig(lr=2e-3, epochs=1, batch_size=4, max_length=256, max_steps=4),
    papo=RLStageConfig(lr=5e-5, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=128),
    eval=EvalConfig(n_problems=8, n_samples=2, max_new_tokens=128, batch_size=16),
    train_problems=64,
    notes=("For tests: exercises every code path end to end in about a minute; its numbers mean little.",),
)

PROFILES: dict[str, ToyProfile] = {p.name: p for p in (DEFAULT, SMALL)}

#: The paper's real-model values (``spec/method.md`` §2, §3, §4.8, §5.2), for reference and contrast.
PAPER: dict[str, dict[str, float | int]] = {
    "npr_zero": {"lr": 1e-6, "prompts_per_step": 32, "group_size": 16, "max_new_tokens": 30000},
    "rejection_sampling": {"max_tries": 8, "max_new_tokens": 32768, "temperature": 1.0, "top_p": 1.0},
    "parallel_sft": {
        "lr": 1e-6,
        "epochs": 1,
        "batch_size": 8,
        "max_length": 32768,
        "warmup_ratio": 0.05,
        "sequential_share": 0.0,
        "plan_balance": 0.0,
    },
    "papo": {"lr": 1e-7, "prompts_per_step": 16, "group_size": 16, "max_new_tokens": 30000},
    "eval": {"n_samples": 8, "temperature": 1.0, "top_p": 0.7},
}


def get_profile(name: str = "default", **bootstrap_overrides) -> ToyProfile:
    """A profile by name; keyword overrides replace top-level ``BootstrapConfig`` fields (e.g. ``seed``)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown toy profile {name!r}; expected one of {sorted(PROFILES)}") from None
    if bootstrap_overrides:
        profile = replace(profile, bootstrap=replace(profile.bootstrap, **bootstrap_overrides))
    return profile
