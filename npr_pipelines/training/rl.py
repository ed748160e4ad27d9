"""The RL driver for every RL stage: NPR-Zero (DAPO, sequential), PAPO (parallel) and the SR ablation.

One step (``method.md`` §2.1, §4.4-4.9)::

    prompts   <- the next problems of a seeded per-epoch permutation (the data cursor)
    rollouts  <- group_size samples per prompt from the NPR engine over the LIVE model
    drop      <- structural failures (unclean finish, layout mismatch), when configured; optionally
                 also clean rollouts that are not format-valid parallel traces (schema failures)
    rewards   <- registered reward (+ DAPO overlong penalty)
    [dynamic sampling: keep groups with mixed rewards; generate more batches until enough]
    adv       <- registered advantage over the kept rollouts
    for each of mini_batches_per_step mini-batches: one optimiser step of the registered policy loss,
              log-probs recomputed with the layout's mask and positions, engine-inserted tokens masked

The engine wraps the training model object itself, so weights are in sync after every optimiser step
(asserted). Determinism: problem order and every sampling seed derive from (seed, step, ...), and a
checkpoint holds weights, optimiser state, data cursor and history, so a run killed mid-way and
started again ends with the same weights as an uninterrupted one (same threads, CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npr_pipelines.data import Problem
from npr_pipelines.engine import Engine, EngineConfig, SamplingParams, TokenCodec
from npr_pipelines.rl import filter_mixed_groups, get_advantage, get_policy_loss
from npr_pipelines.storage.weights import state_digest
from npr_pipelines.structure import TagVocab
from npr_pipelines.tokenization import PromptConfig, has_tag_tokens, prompt_ids
from npr_pipelines.training.batch import (
    TokenBatch,
    TrainSequence,
    collate,
    rl_sequence,
    token_logprobs,
    use_segment_attention,
)
from npr_pipelines.training.checkpoint import (
    list_checkpoints,
    load_optimizer_state,
    read_state,
    save_checkpoint,
)
from npr_pipelines.training.overrides import apply_stage_values
from npr_pipelines.training.result import StageResult
from npr_pipelines.training.rl_rollout import (
    HookFactory,
    Rollout,
    RolloutEngineFactory,
    assign_rewards,
    generate_rollouts,
)
from npr_pipelines.training.strategy import OptimizerConfig, TorchStrategy, count_targets

STAGES = ("npr_zero", "papo", "sr")


@dataclass(frozen=True)
class RLConfig:
    """Everything that determines an RL stage's result; logged as is. Defaults: PAPO (``method.md`` §4.8).

    ``steps`` count RL steps (one rollout batch each); each takes ``mini_batches_per_step`` optimiser
    steps. The lr schedule runs over optimiser steps: linear warmup over ``warmup_steps`` RL steps
    from ``warmup_start_ratio * lr``, then ``constant`` or ``cosine`` down to ``min_lr_ratio * lr``.
    """

    stage: str = "papo"
    loss: str = "papo"  # registered policy loss: "dapo" | "papo"
    advantage: str = "papo"  # registered advantage: "grpo" | "papo" | ...
    reward: str = "accuracy"  # registered reward: "format_gated_accuracy" | "accuracy"
    loss_agg: str = "token-mean"
    mode: str = "parallel"  # engine decoding mode for rollouts
    prompts_per_step: int = 16
    group_size: int = 16
    steps: int = 30
    lr: float = 1e-7
    lr_schedule: str = "constant"  # "constant" | "cosine"
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mini_batches_per_step: int = 1
    micro_batch_size: int = 16  # sequences per forward/backward (memory only; the gradient is exact)
    # Leave zero-advantage rollouts (uniform groups) out of the forward/backward. Exact: they add 0 to
    # every registered loss's gradient (``rl/registry.py``) and still count in the denominator.
    skip_zero_advantage: bool = True
    clip_ratio_low: float = 0.2  # DAPO loss only
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 30_000
    max_total_tokens: int | None = None  # flattened budget of a parallel rollout (None: unbounded)
    branch_repetition_penalty: float | None = None  # the release uses 1.02 in branches (§4.2)
    dynamic_sampling: bool = False  # DAPO: keep only groups with mixed rewards, generate more
    max_gen_batches: int = 4  # cap on generation batches per step under dynamic sampling
    overlong_buffer: int = 0  # DAPO soft overlong penalty width (0: off)
    overlong_penalty_factor: float = 1.0
    drop_structural_failures: bool = True
    # Also drop clean rollouts that are format-invalid or, in parallel mode, not parallel (the paper's
    # "schema-level filtering": only genuinely parallel trajectories enter the update). V4 keeps them.
    drop_schema_failures: bool = False
    allow_approximate_rollouts: bool = False  # train on approximate traces (parallel mode via SGLang)
    truncate_multiple: int = 1  # the release cuts batches to a multiple of 8 rollouts (§7.16)
    seed: int = 0
    save_every: int = 0  # RL steps between checkpoints (0: final only)
    num_threads: int | None = None  # torch CPU threads for the run (None: leave as is)
    dtype: str = "float32"
    device: str = "cpu"  # the policy, its optimiser and the rollout engine share it
    engine_blocks: int = 4096
    engine_block_size: int = 16
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {self.mode!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if min(self.prompts_per_step, self.group_size, self.steps, self.mini_batches_per_step) < 1:
            raise ValueError("prompts_per_step, group_size, steps and mini_batches_per_step must be >= 1")
        get_policy_loss(self.loss)
        get_advantage(self.advantage)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what is logged and stored in every checkpoint)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **overrides: Any) -> RLConfig:
        """A copy with ``overrides`` (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **overrides)

    def with_stage_values(self, values: Any) -> RLConfig:
        """Overrides from another config object (e.g. a toy profile entry): every field of ``values``
        whose name is an ``RLConfig`` field."""
        return apply_stage_values(self, values)

    def lr_at(self, opt_step: int) -> float:
        """Learning rate of optimiser step ``opt_step`` (0-based)."""
        warm = self.warmup_steps * self.mini_batches_per_step
        if opt_step < warm:
            frac = (opt_step + 1) / warm
            return self.lr * (self.warmup_start_ratio + (1 - self.warmup_start_ratio) * frac)
        if self.lr_schedule == "constant":
            return self.lr
        total = max(1, self.steps * self.mini_batches_per_step - warm)
        progress = min(1.0, (opt_step - warm) / total)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


def npr_zero_config(**overrides: Any) -> RLConfig:
    """Stage 1 paper defaults (``method.md`` §2.1-2.3): DAPO, GRPO advantage, V1-gated accuracy,
    sequential rollouts, 32 prompts x 16, lr 1e-6 cosine with 10 warmup steps, dynamic sampling, one
    mini-batch per prompt group (32 optimiser steps per RL step), overlong buffer 10."""
    base = RLConfig(
        stage="npr_zero",
        loss="dapo",
        advantage="grpo",
        reward="format_gated_accuracy",
        mode="sequential",
        prompts_per_step=32,
        group_size=16,
        steps=90,
        lr=1e-6,
        lr_schedule="cosine",
        warmup_steps=10,
        min_lr_ratio=1e-8,
        mini_batches_per_step=32,
        dynamic_sampling=True,
        max_gen_batches=0,
        overlong_buffer=10,
        drop_structural_failures=False,
        truncate_multiple=8,
    )
    return base.replace(**overrides)


def papo_config(**overrides: Any) -> RLConfig:
    """Stage 3 paper defaults (§4.8): parallel rollouts, ±1 accuracy, PAPO advantage and ratio-free
    loss, 16 prompts x 16, lr 1e-7 constant, structural failures dropped, 16 mini-batches per step."""
    base = RLConfig(
        stage="papo",
        mode="parallel",
        steps=30,
        mini_batches_per_step=16,
        branch_repetition_penalty=1.02,
        truncate_multiple=8,
    )
    return base.replace(**overrides)


def sr_config(**overrides: Any) -> RLConfig:
    """The sequential-RL ablation: PAPO's settings with sequential rollouts."""
    return papo_config(stage="sr", mode="sequential", branch_repetition_penalty=None).replace(**overrides)


# ----------------------------------------------------------------------------------------- helpers
def problem_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of ``range(n)`` used in epoch ``epoch``."""
    return list(_problem_order(n, seed, epoch))


@functools.lru_cache(maxsize=4)
def _problem_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    # cached: shuffling 8,000 indices per drawn problem cost ~0.4 s of every toy PAPO step
    order = list(range(n))
    random.Random(f"rl-order|{seed}|{epoch}").shuffle(order)
    return tuple(order)


def take_problems(n_total: int, seed: int, cursor: int, count: int) -> list[int]:
    """Indices of the ``count`` problems after data cursor ``cursor`` (epochs reshuffle)."""
    return [_problem_order(n_total, seed, c // n_total)[c % n_total] for c in range(cursor, cursor + count)]


@dataclass(frozen=True)
class RLObjective:
    """A registered policy loss over one micro-batch, normalised by the whole optimiser step's
    ``denominator`` (the strategy's loss contract); log-probs at the rollout temperature, as the
    engine's sampling log-probs (the DAPO ratio compares the two)."""

    loss: str
    denominator: float
    agg_mode: str
    temperature: float
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module, batch: TokenBatch) -> Any:
        return self.loss_from_logp(token_logprobs(model, batch, self.temperature), batch)

    def loss_from_logp(self, logp: torch.Tensor, batch: TokenBatch) -> Any:
        """``(loss, metrics)`` from ``logp [B, L]`` (the current policy's token log-probs)."""
        adv = batch.advantages[:, None].expand_as(logp)  # [B, L]
        return get_policy_loss(self.loss)(
            logp,
            batch.old_logprobs,
            adv,
            batch.loss_mask,
            agg_mode=self.agg_mode,
            denominator=self.denominator,
            **self.kwargs,
        )


def _denominator(seqs: Sequence[TrainSequence], agg_mode: str) -> float:
    if agg_mode == "token-mean":
        return float(max(1, count_targets(seqs)))
    return float(max(1, sum(any(s.trainable[1:]) for s in seqs)))


def _micro_batches(seqs: Sequence[TrainSequence], size: int, pad_id: int) -> list[TokenBatch]:
    # Sorting by length only changes the padding, not the (summed) gradient.
    ordered = sorted(seqs, key=len)
    return [collate(ordered[i : i + size], pad_id) for i in range(0, len(ordered), size)]


def _loss_kwargs(config: RLConfig) -> dict[str, float]:
    if config.loss == "dapo":
        return {
            "clip_low": config.clip_ratio_low,
            "clip_high": config.clip_ratio_high,
            "clip_c": config.clip_ratio_c,
        }
    return {}


def _stored_config_matches(stored: Mapping[str, Any], config: RLConfig) -> bool:
    # Neither changes the update beyond float rounding; runs stored before the skip existed resume.
    ignore = {"save_every", "skip_zero_advantage"}
    mine = {k: v for k, v in config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in stored.items() if k not in ignore}
    return mine == theirs


# ----------------------------------------------------------------------------------------- the run
class _Run:
    """State of one ``run_rl`` call (model, optimiser, engine, cursor, history)."""

    def __init__(
        self,
        init_dir: Path,
        problems: Sequence[Problem],
        config: RLConfig,
        workdir: Path,
        logits_hook: HookFactory | None = None,
        rollout_engine: RolloutEngineFactory | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.problems, self.workdir = config, list(problems), workdir
        self.logits_hook = logits_hook
        checkpoints = list_checkpoints(workdir)
        self.resume_from = checkpoints[-1][1] if checkpoints else None
        source = self.resume_from or init_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(source))
        dtype = getattr(torch, config.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=False)
        self.model.to(config.device)
        use_segment_attention(self.model)
        self.strategy = TorchStrategy()
        self.strategy.setup(
            self.model,
            OptimizerConfig(
                lr=config.lr,
                betas=tuple(config.betas),
                eps=config.adam_eps,
                weight_decay=config.weight_decay,
                max_grad_norm=config.grad_clip or None,
                schedule=config.lr_at,
            ),
        )
        self.step, self.cursor, self.history = 0, 0, []
        if self.resume_from is not None:
            state = read_state(self.resume_from)
            if not _stored_config_matches(state.config, config):
                raise ValueError(
                    f"{workdir} holds a run with a different config; use a fresh workdir "
                    f"(stored {state.config}, now {config.to_dict()})"
                )
            load_optimizer_state(self.resume_from, self.strategy.optimizer)
            self.step, self.cursor, self.history = state.step, state.data_cursor, list(state.history)
            self.strategy.global_step = int(state.extra["optimizer_steps"])
        self.codec = TokenCodec.from_tokenizer(self.tokenizer)
        self.tags = TagVocab.from_tokenizer(self.tokenizer) if has_tag_tokens(self.tokenizer) else None
        if config.mode == "parallel" and self.tags is None:
            raise ValueError("parallel rollouts need the tag tokens in the tokenizer (a stage-2+ checkpoint)")
        engine_config = EngineConfig(num_blocks=config.engine_blocks, block_size=config.engine_block_size)
        self.remote = rollout_engine is not None
        if rollout_engine is not None:  # replicas elsewhere (the cluster profile): synced after updates
            self.engine = rollout_engine(self.model, self.codec, self.tags, engine_config)
        else:
            self.engine = Engine(self.model, self.codec, self.tags, engine_config)
            # In-process weight sync: the engine must read the very parameters the optimiser updates.
            assert self.engine.model.hf is self.model, "the engine does not wrap the training model"
        self.prompt_cache: dict[int, list[int]] = {}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.params = SamplingParams(
            mode=config.mode,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            max_total_tokens=config.max_total_tokens,
            branch_repetition_penalty=config.branch_repetition_penalty,
        )

    def _prompt(self, index: int) -> list[int]:
        ids = self.prompt_cache.get(index)
        if ids is None:
            ids = prompt_ids(self.tokenizer, self.problems[index].question, self.config.prompt)
            self.prompt_cache[index] = ids
        return ids

    # ------------------------------------------------------------------- one step
    def collect(self, step: int) -> tuple[list[Rollout], list[Rollout], dict[str, float]]:
        """Rollouts of one RL step: ``(kept, all generated, stats)``."""
        cfg = self.config
        kept: list[Rollout] = []
        generated: list[Rollout] = []
        kept_groups = dropped_groups = 0
        gen_batch = 0
        while True:
            idx = take_problems(len(self.problems), cfg.seed, self.cursor, cfg.prompts_per_step)
            self.cursor += cfg.prompts_per_step
            batch = generate_rollouts(
                self.engine,
                self.codec,
                self.tags,
                [self.problems[i] for i in idx],
                [self._prompt(i) for i in idx],
                self.params,
                group_size=cfg.group_size,
                seed=cfg.seed,
                step=step,
                gen_batch=gen_batch,
                group_offset=gen_batch * cfg.prompts_per_step,
                drop_structural_failures=cfg.drop_structural_failures,
                drop_schema_failures=cfg.drop_schema_failures,
                logits_hook=self.logits_hook,
                allow_approximate=cfg.allow_approximate_rollouts,
            )
            gen_batch += 1
            generated.extend(batch)
            survivors = [r for r in batch if r.dropped is None]
            assign_rewards(
                survivors,
                cfg.reward,
                max_new_tokens=cfg.max_new_tokens,
                overlong_buffer=cfg.overlong_buffer,
                overlong_penalty_factor=cfg.overlong_penalty_factor,
            )
            if not cfg.dynamic_sampling:
                kept.extend(survivors)
                break
            if survivors:
                groups = torch.tensor([r.group for r in survivors])
                rewards = torch.tensor([r.reward for r in survivors])
                result = filter_mixed_groups(groups, rewards)
                chosen = set(result.kept.tolist())
                kept.extend(r for i, r in enumerate(survivors) if i in chosen)
                kept_groups += result.num_kept_groups
                dropped_groups += result.num_dropped_groups
            if kept_groups >= cfg.prompts_per_step or (
                cfg.max_gen_batches and gen_batch >= cfg.max_gen_batches
            ):
                break
        if cfg.truncate_multiple > 1:
            kept = kept[: len(kept) // cfg.truncate_multiple * cfg.truncate_multiple]
        stats = {
            "gen_batches": float(gen_batch),
            "mixed_groups": float(kept_groups),
            "uniform_groups": float(dropped_groups),
        }
        return kept, generated, stats

    def train_on(self, step: int, kept: list[Rollout]) -> dict[str, float]:
        """Advantages over ``kept`` and ``mini_batches_per_step`` optimiser steps."""
        cfg = self.config
        if not kept:
            self.strategy.global_step += cfg.mini_batches_per_step  # keep the lr schedule aligned
            return {"skipped": 1.0}
        rewards = torch.tensor([r.reward for r in kept], dtype=torch.float32)
        groups = torch.tensor([r.group for r in kept])
        adv = get_advantage(cfg.advantage)(rewards, groups)
        seqs = []
        for r, a in zip(kept, adv.tolist(), strict=True):
            out = r.output
            lps = [0.0 if lp is None else float(lp) for lp in out.logprobs]
            seqs.append(rl_sequence(r.prompt_ids, out.response_ids, out.layout(), out.inserted, lps, a))
        order = list(range(len(seqs)))
        random.Random(f"rl-minibatch|{cfg.seed}|{step}").shuffle(order)
        n_mb = min(cfg.mini_batches_per_step, len(seqs))
        per_mb: list[dict[str, float]] = []
        for m in range(n_mb):
            part = [seqs[i] for i in order[m::n_mb]]
            objective = RLObjective(
                cfg.loss, _denominator(part, cfg.loss_agg), cfg.loss_agg, cfg.temperature, _loss_kwargs(cfg)
            )
            if cfg.skip_zero_advantage:
                # all-zero parts still take their optimiser step (Adam moves on momentum alone)
                part = [s for s in part if s.advantage != 0.0] or part
            per_mb.append(
                self.strategy.train_step(objective, _micro_batches(part, cfg.micro_batch_size, self.pad_id))
            )
        # A mini-batch count below the configured one still advances the schedule as configured.
        self.strategy.global_step += cfg.mini_batches_per_step - n_mb
        if self.remote:
            self.engine.sync_weights(self.model)  # the replicas roll out the updated policy next step
        keys = {k for m in per_mb for k in m if k != "step"}
        metrics = {k: sum(m.get(k, 0.0) for m in per_mb) / len(per_mb) for k in sorted(keys)}
        metrics["adv_abs_mean"] = float(adv.abs().mean())
        metrics["trained_tokens"] = float(sum(count_targets([s]) for s in seqs))
        metrics["zero_advantage"] = float(sum(s.advantage == 0.0 for s in seqs))
        return metrics

    def save(self, step: int) -> Path:
        return save_checkpoint(
            self.workdir,
            step,
            self.model,
            self.tokenizer,
            self.strategy.optimizer,
            data_cursor=self.cursor,
            config=self.config.to_dict(),
            history=self.history,
            extra={"optimizer_steps": self.strategy.global_step},
        )


def rollout_stats(generated: Sequence[Rollout], kept: Sequence[Rollout]) -> dict[str, float]:
    """Means over all generated rollouts (what the policy does) and over the trained ones."""
    n = max(1, len(generated))
    out = {
        "rollouts": float(len(generated)),
        "kept": float(len(kept)),
        "dropped": float(sum(r.dropped is not None for r in generated)),
        "accuracy": sum(r.record.correct for r in generated) / n,
        "format_valid_rate": sum(r.record.format_valid for r in generated) / n,
        "trigger_rate": sum(r.record.triggered for r in generated) / n,
        "response_tokens": sum(r.response_len for r in generated) / n,
        "reward_mean": sum(r.reward for r in kept) / max(1, len(kept)),
    }
    lps = [lp for r in generated for lp in r.output.logprobs if lp is not None]
    out["sampled_logp_mean"] = sum(lps) / max(1, len(lps))
    for reason in sorted({r.dropped for r in generated if r.dropped is not None}):
        out[f"dropped_{reason}"] = float(sum(r.dropped == reason for r in generated))
    return out


def run_rl(
    init_dir: str | Path,
    problems: Sequence[Problem],
    config: RLConfig,
    workdir: str | Path,
    *,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    logits_hook: HookFactory | None = None,
    rollout_engine: RolloutEngineFactory | None = None,
) -> StageResult:
    """Run (or resume, or return) the RL stage ``config`` from the HF checkpoint ``init_dir``.

    Checkpoints ``workdir/step-XXXXXX`` are written every ``save_every`` steps and at the end (each
    followed by ``on_checkpoint(step, path)``); ``on_log(record)`` gets every step's record. A
    workdir that already holds the final step returns at once; one with an earlier checkpoint
    resumes from it (the config must be the same). ``logits_hook`` constrains rollout decoding
    (tests script structure with it); it is not part of the config, so keep it fixed across resumes.
    ``rollout_engine(model, codec, tags, engine_config)`` builds the rollout engine instead of the
    in-process one (e.g. ``compute.engine_pool.EnginePoolFactory``: replicas as Ray actors, whose
    weights are synced after every update); its ``describe()`` is added to the metrics.
    """
    workdir = Path(workdir)
    if not problems:
        raise ValueError("no training problems")
    done = _finished(workdir, config)
    if done is not None:
        return done
    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _run(Path(init_dir), problems, config, workdir, on_checkpoint, on_log, logits_hook,
                    rollout_engine)  # fmt: skip
    finally:
        torch.set_num_threads(old_threads)


def _finished(workdir: Path, config: RLConfig) -> StageResult | None:
    checkpoints = list_checkpoints(workdir)
    if not checkpoints or checkpoints[-1][0] < config.steps:
        return None
    step, path = checkpoints[-1]
    state = read_state(path)
    if not _stored_config_matches(state.config, config):
        raise ValueError(f"{workdir} holds a finished run with a different config; use a fresh workdir")
    # Metrics are stored after the final checkpoint is written: a run killed in between has none yet.
    metrics = state.extra.get("metrics") or summarize_history(state.history)
    return StageResult(path, step, checkpoints, list(state.history), dict(metrics))


def _run(
    init_dir: Path,
    problems: Sequence[Problem],
    config: RLConfig,
    workdir: Path,
    on_checkpoint: Callable[[int, Path], None] | None,
    on_log: Callable[[dict[str, Any]], None] | None,
    logits_hook: HookFactory | None,
    rollout_engine: RolloutEngineFactory | None = None,
) -> StageResult:
    run = _Run(init_dir, problems, config, workdir, logits_hook, rollout_engine)
    t_start = time.perf_counter()
    while run.step < config.steps:
        step = run.step + 1
        t0 = time.perf_counter()
        kept, generated, sample_stats = run.collect(step)
        t1 = time.perf_counter()
        train_metrics = run.train_on(step, kept)
        t2 = time.perf_counter()
        record = {
            "step": step,
            **rollout_stats(generated, kept),
            **sample_stats,
            **train_metrics,
            "data_cursor": run.cursor,
            "rollout_s": round(t1 - t0, 3),
            "train_s": round(t2 - t1, 3),
        }
        run.step = step
        run.history.append(record)
        if on_log is not None:
            on_log(record)
        if step == config.steps or (config.save_every and step % config.save_every == 0):
            path = run.save(step)
            if on_checkpoint is not None:
                on_checkpoint(step, path)
    metrics = summarize_history(run.history)
    metrics["wall_s_this_call"] = round(time.perf_counter() - t_start, 3)
    if run.remote:
        metrics["engine_pool"] = run.engine.describe()
        metrics["weights_sha256"] = state_digest(run.model.state_dict())
    final = list_checkpoints(workdir)[-1][1]
    _store_metrics(final, metrics)
    return StageResult(final, config.steps, list_checkpoints(workdir), run.history, metrics)


def summarize_history(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals and final values over a run's step records."""
    if not history:
        return {}
    last = history[-1]
    keys = ("accuracy", "format_valid_rate", "trigger_rate", "reward_mean", "response_tokens")
    return {
        "steps": len(history),
        "rollouts": sum(h.get("rollouts", 0) for h in history),
        "dropped": sum(h.get("dropped", 0) for h in history),
        "rollout_s": round(sum(h.get("rollout_s", 0) for h in history), 3),
        "train_s": round(sum(h.get("train_s", 0) for h in history), 3),
        **{f"final_{k}": last.get(k) for k in keys},
        **{f"first_{k}": history[0].get(k) for k in keys},
    }


def _store_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    from npr_pipelines.training.checkpoint import TRAINER_STATE

    state_file = path / TRAINER_STATE
    raw = json.loads(state_file.read_text())
    raw.setdefault("extra", {})["metrics"] = dict(metrics)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=1, default=str))
    tmp.replace(state_file)


# ----------------------------------------------------------------------------------------- stages
def run_npr_zero(
    init_dir: str | Path,
    problems: Sequence[Problem],
    workdir: str | Path,
    config: RLConfig | None = None,
    **kwargs: Any,
) -> StageResult:
    """Stage 1: DAPO with sequential rollouts and the V1-gated accuracy reward (tags are text)."""
    config = config or npr_zero_config()
    if config.mode != "sequential" or not config.reward.startswith("format_gated_accuracy"):
        raise ValueError("NPR-Zero uses sequential rollouts and a format_gated_accuracy reward")
    return run_rl(init_dir, problems, config, workdir, **kwargs)


def run_papo(
    init_dir: str | Path,
    problems: Sequence[Problem],
    workdir: str | Path,
    config: RLConfig | None = None,
    **kwargs: Any,
) -> StageResult:
    """Stage 3: PAPO with parallel rollouts; structural failures dropped, never trained."""
    config = config or papo_config()
    if config.mode != "parallel" or not config.drop_structural_failures:
        raise ValueError("PAPO uses parallel rollouts and drops structural failures")
    return run_rl(init_dir, problems, config, workdir, **kwargs)


def run_sr(
    init_dir: str | Path,
    problems: Sequence[Problem],
    workdir: str | Path,
    config: RLConfig | None = None,
    **kwargs: Any,
) -> StageResult:
    """The sequential-RL ablation: PAPO's objective with sequential rollouts."""
    config = config or sr_config()
    if config.mode != "sequential":
        raise ValueError("the SR ablation uses sequential rollouts")
    return run_rl(init_dir, problems, config, workdir, **kwargs)
