"""Pipeline profiles: the toy ones (``default``, ``small``: ``npr_pipelines.toy.profiles``) and the
real-model ``paper`` profile (Qwen3-4B-Instruct-2507 with the paper's hyper-parameters,
``npr_pipelines.profiles.paper``). ``get_profile`` resolves any of their names."""

from __future__ import annotations

from npr_pipelines.profiles.paper import PAPER, PAPER_MODEL, EvalSettings, PaperProfile, StageCompute
from npr_pipelines.profiles.sources import (
    BASE_MODEL,
    BENCHMARK_ROOT,
    TRAIN_PROBLEMS,
    MissingSettingError,
    Source,
    resolve,
)
from npr_pipelines.toy.profiles import PROFILES as TOY_PROFILES
from npr_pipelines.toy.profiles import ToyProfile
from npr_pipelines.toy.profiles import get_profile as get_toy_profile

Profile = ToyProfile | PaperProfile

#: Real-model profiles by name.
REAL_PROFILES: dict[str, PaperProfile] = {PAPER.name: PAPER}


def profile_names() -> list[str]:
    return sorted([*TOY_PROFILES, *REAL_PROFILES])


def is_real_model(profile: Profile) -> bool:
    """Whether ``profile`` trains a real model from ``NPR_BASE_MODEL_URI`` (not the toy world)."""
    return isinstance(profile, PaperProfile)


def get_profile(name: str, **bootstrap_overrides) -> Profile:
    """The profile called ``name``; toy profiles take ``get_toy_profile``'s bootstrap overrides."""
    if name in REAL_PROFILES:
        return REAL_PROFILES[name]
    if name not in TOY_PROFILES:
        raise KeyError(
            f"unknown toy profile {name!r} (nor a real-model profile); expected one of {profile_names()}"
        )
    return get_toy_profile(name, **bootstrap_overrides)


__all__ = [
    "BASE_MODEL",
    "BENCHMARK_ROOT",
    "PAPER",
    "PAPER_MODEL",
    "REAL_PROFILES",
    "TRAIN_PROBLEMS",
    "EvalSettings",
    "MissingSettingError",
    "PaperProfile",
    "Profile",
    "Source",
    "StageCompute",
    "get_profile",
    "is_real_model",
    "profile_names",
    "resolve",
]
