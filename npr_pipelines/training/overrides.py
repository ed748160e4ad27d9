"""Applying a profile's stage entry to a driver config (one convention for every stage config)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from npr_pipelines.tokenization import PromptConfig

C = TypeVar("C")


def apply_stage_values(config: C, values: Any) -> C:
    """``config`` with every field of ``values`` (a dataclass or mapping) whose name ``config`` has;
    JSON-round-tripped values (a prompt dict, a betas list) are turned back into their types."""
    data = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)
    names = {f.name for f in dataclasses.fields(config)}
    kept = {k: v for k, v in data.items() if k in names}
    if isinstance(kept.get("prompt"), dict):
        kept["prompt"] = PromptConfig(**kept["prompt"])
    if isinstance(kept.get("betas"), list):
        kept["betas"] = tuple(kept["betas"])
    return dataclasses.replace(config, **kept)
