"""Rollouts for the RL driver: requests with derived seeds, scoring, the structural filter, rewards.

Every sampling seed is a pure function of ``(run seed, step, generation batch, prompt slot, sample)``
so that a resumed run regenerates exactly the rollouts an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from npr_pipelines.data import Problem
from npr_pipelines.engine import (
    Engine,
    EngineConfig,
    EngineOutput,
    LogitsHook,
    Request,
    SamplingParams,
    TokenCodec,
)
from npr_pipelines.eval.runner import SampleRecord, score_output
from npr_pipelines.rl import get_reward, overlong_penalty
from npr_pipelines.structure import TagVocab, format_score_v1

#: Why a rollout was dropped before training (``None`` = kept).
DROP_UNCLEAN_FINISH = "unclean_finish"  # truncated, budget, malformed fork, ... (FinishReason not clean)
DROP_LAYOUT = "layout"  # the trainer's layout of the ids disagrees with what the engine executed
DROP_SCHEMA = "schema"  # clean, but not format-valid or not parallel (``schema_failure``)


class RolloutEngine(Protocol):
    """What rollouts need of a decoder: the in-process ``Engine`` or ``SGLangBackend``."""

    def generate(self, requests: Sequence[Request]) -> list[EngineOutput]: ...


class SyncedRolloutEngine(RolloutEngine, Protocol):
    """Rollout engines outside the trainer's process (``compute.engine_pool.EnginePool``)."""

    def sync_weights(self, model: torch.nn.Module) -> object: ...
    def describe(self) -> dict: ...


#: ``factory(model, codec, tags, engine_config)`` -> the engine an RL run rolls out with.
RolloutEngineFactory = Callable[
    [torch.nn.Module, TokenCodec, TagVocab | None, EngineConfig], SyncedRolloutEngine
]


class ApproximateRolloutError(ValueError):
    """Rollouts sampled in contexts other than the trainer's layout (parallel mode through stock
    SGLang) were about to be trained on without the user's opt-in."""


#: ``factory(problem, sample) -> hook or None``: constrains decoding of one rollout (tests script
#: structure with it; see ``engine.testing.ScriptHook``). Log-probs stay the model's own.
HookFactory = Callable[[Problem, int], LogitsHook | None]


def rollout_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit sampling seed derived from the run seed and the rollout's coordinates."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass
class Rollout:
    """One sampled response and everything the step needs to know about it.

    ``group`` identifies the prompt within the step (unique across generation batches).
    """

    problem: Problem
    group: int
    sample: int
    prompt_ids: list[int]
    output: EngineOutput
    record: SampleRecord
    v1_score: float
    reward: float = 0.0
    dropped: str | None = None

    @property
    def response_len(self) -> int:
        return len(self.output.response_ids)


def structural_failure(out: EngineOutput, tags: TagVocab | None, codec: TokenCodec) -> str | None:
    """PAPO's rollout filter (``method.md`` §4.4, V4): why ``out`` must not be trained on, or None.

    A rollout fails when the engine did not end it cleanly (length/budget truncation, a refused or
    malformed fork, a nested guideline, ...) or, in parallel mode, when the layout the trainer
    derives from the ids differs from what the engine executed (the log-probs would be recomputed in
    contexts the policy never sampled in).
    """
    if not out.finish_reason.is_clean:
        return DROP_UNCLEAN_FINISH
    if out.mode == "parallel" and tags is not None and out.structure_errors(tags, codec.decode):
        return DROP_LAYOUT
    return None


def schema_failure(out: EngineOutput, record: SampleRecord) -> bool:
    """The paper's schema-level filter (``method.md`` §4.1): a clean rollout that is still not a
    format-valid trace, or, in parallel mode, never opened a parallel block."""
    return not record.format_valid or (out.mode == "parallel" and not record.triggered)


def refuse_approximate(outputs: Sequence[EngineOutput]) -> None:
    """Raise ``ApproximateRolloutError`` if any output is approximate (``EngineOutput.approximate``).

    Why: PAPO's loss uses the rollout log-probs and the trainer's parallel layout as the policy's own.
    After a join re-prefilled by SGLang, later tokens were sampled with other positions and attention
    than that layout, so the update would be off-policy in a way nothing else corrects.
    """
    bad = [o.request_id for o in outputs if o.approximate]
    if bad:
        raise ApproximateRolloutError(
            f"{len(bad)} of {len(outputs)} rollouts are approximate (parallel mode through SGLang joins "
            f"branches by re-prefilling, so their log-probs do not match the trained layout), e.g. "
            f"{bad[:3]}; use the in-process engine for PAPO rollouts, or set "
            "allow_approximate_rollouts=True to train on them anyway"
        )


def generate_rollouts(
    engine: RolloutEngine | Engine,
    codec: TokenCodec,
    tags: TagVocab | None,
    problems: Sequence[Problem],
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    group_size: int,
    seed: int,
    step: int,
    gen_batch: int,
    group_offset: int,
    drop_structural_failures: bool,
    drop_schema_failures: bool = False,
    logits_hook: HookFactory | None = None,
    allow_approximate: bool = False,
) -> list[Rollout]:
    """``group_size`` rollouts per problem in one engine call, scored; structural failures marked.

    Args:
        problems: the prompts of this generation batch, in order.
        prompt_ids: their token ids.
        params: sampling settings; the seed is replaced per rollout.
        group_offset: group id of ``problems[0]`` (groups are numbered across generation batches).
        allow_approximate: train on approximate traces (``refuse_approximate``) instead of raising.
    """
    requests = []
    for j, (problem, ids) in enumerate(zip(problems, prompt_ids, strict=True)):
        for k in range(group_size):
            sp = replace(params, seed=rollout_seed(seed, step, gen_batch, j, k))
            hook = logits_hook(problem, k) if logits_hook is not None else None
            requests.append(Request(f"s{step}-b{gen_batch}-p{j}-r{k}", list(ids), sp, logits_hook=hook))
    outputs = engine.generate(requests)
    if not allow_approximate:
        refuse_approximate(outputs)
    rollouts = []
    for j, (problem, ids) in enumerate(zip(problems, prompt_ids, strict=True)):
        for k in range(group_size):
            out = outputs[j * group_size + k]
            record = score_output(problem, k, out, codec)
            dropped = structural_failure(out, tags, codec) if drop_structural_failures else None
            if dropped is None and drop_schema_failures and schema_failure(out, record):
                dropped = DROP_SCHEMA
            rollouts.append(
                Rollout(
                    problem=problem,
                    group=group_offset + j,
                    sample=k,
                    prompt_ids=list(ids),
                    output=out,
                    record=record,
                    v1_score=format_score_v1(record.text) if record.text else 0.0,
                    dropped=dropped,
                )
            )
    return rollouts


def assign_rewards(
    rollouts: Sequence[Rollout],
    reward: str,
    *,
    max_new_tokens: int,
    overlong_buffer: int = 0,
    overlong_penalty_factor: float = 1.0,
) -> torch.Tensor:
    """Set ``rollout.reward`` with the registered reward (+ DAPO's soft overlong penalty); ``[B]``."""
    if not rollouts:
        return torch.zeros(0)
    correct = torch.tensor([r.record.correct for r in rollouts], dtype=torch.bool)
    scores = torch.tensor([r.v1_score for r in rollouts], dtype=torch.float32)
    empty = torch.tensor([r.record.text == "" for r in rollouts], dtype=torch.bool)
    rewards = get_reward(reward)(correct=correct, format_scores=scores, empty=empty).float()
    if overlong_buffer > 0:
        lengths = torch.tensor([r.response_len for r in rollouts])
        rewards = rewards + overlong_penalty(
            lengths,
            max_response_length=max_new_tokens,
            overlong_buffer=overlong_buffer,
            penalty_factor=overlong_penalty_factor,
        )
    for r, value in zip(rollouts, rewards.tolist(), strict=True):
        r.reward = float(value)
    return rewards
