"""Stage configs for a profile: the library drivers' typed configs with the profile's values applied.

The drivers' defaults are the paper's values for real models; a toy profile overrides what a
~1M-parameter model needs (``npr_pipelines.toy.profiles``); the real-model ``paper`` profile holds
its configs whole (``npr_pipelines.profiles.paper``). Each stage's config is also what its MLflow run
logs and what its run key hashes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from npr_pipelines.profiles import PaperProfile, Profile, get_profile
from npr_pipelines.tokenization import PromptConfig
from npr_pipelines.toy.tokenizer import TOY_PROMPT
from npr_pipelines.training.distill import RejectionConfig
from npr_pipelines.training.rl import RLConfig, npr_zero_config, papo_config, sr_config
from npr_pipelines.training.sft import SFTConfig

#: Checkpoints a toy-profile training stage writes, evenly spaced, the last one final: a crash loses
#: at most a quarter of a stage (a restart resumes from the last one; DESIGN.md, "Resume identity").
#: The paper profile sets its own cadence.
CHECKPOINTS_PER_STAGE = 4


def checkpoint_every(steps: int | None) -> int | None:
    """``save_every`` for a stage of ``steps`` optimiser/RL steps (None: unknown, keep the default)."""
    return max(1, steps // CHECKPOINTS_PER_STAGE) if steps else None


def profile_prompt(profile: Profile) -> PromptConfig:
    """The evaluation prompt: the toy world's short instruction, or the NPR instruction (real models)."""
    return profile.prompt() if isinstance(profile, PaperProfile) else TOY_PROMPT


def stage_configs(profile_name: str, seed: int = 0) -> dict[str, Any]:
    """Every stage's config for ``profile_name``: npr_zero, rejection, npr_beta, sr_beta, npr, sr."""
    profile = get_profile(profile_name)
    if isinstance(profile, PaperProfile):
        return profile.stage_configs(seed)
    prompt = profile_prompt(profile)
    npr_zero: RLConfig = (
        npr_zero_config()
        .with_stage_values(profile.npr_zero)
        .replace(prompt=prompt, seed=seed, reward=profile.npr_zero_reward)
    )
    npr_zero = npr_zero.replace(save_every=checkpoint_every(npr_zero.steps))
    papo: RLConfig = papo_config().with_stage_values(profile.papo).replace(prompt=prompt, seed=seed)
    papo = papo.replace(save_every=checkpoint_every(papo.steps))
    sr: RLConfig = (
        sr_config()
        .with_stage_values(profile.sr or profile.papo)
        .replace(prompt=prompt, seed=seed, mode="sequential")
    )
    sr = sr.replace(save_every=checkpoint_every(sr.steps))
    sft = dataclasses.replace(SFTConfig().with_stage_values(profile.parallel_sft), prompt=prompt, seed=seed)
    sft = dataclasses.replace(sft, save_every=checkpoint_every(sft.max_steps) or sft.save_every)
    rejection = dataclasses.replace(
        RejectionConfig().with_stage_values(profile.rejection_sampling), prompt=prompt, seed=seed
    )
    return {
        "npr_zero": npr_zero,
        "rejection": rejection,
        "rejection_problems": profile.rejection_sampling.n_problems,
        "npr_beta": dataclasses.replace(sft, layout="parallel"),
        "sr_beta": dataclasses.replace(sft, layout="sequential", sequential_share=0.0),
        "npr": papo,
        "sr": sr,
    }
