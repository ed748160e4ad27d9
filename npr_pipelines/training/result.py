"""What every training stage driver returns (SFT, NPR-Zero, PAPO): one shape for the asset layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageResult:
    """The outcome of a (possibly resumed) training stage.

    Attributes:
        final_dir: the last checkpoint directory (loads with ``from_pretrained``, tokenizer included).
        final_step: its optimizer step.
        checkpoints: every complete checkpoint of the run, ``(step, dir)``, oldest first.
        history: one dict per optimizer step (loss, lr, grad norm, ...), resumed runs included.
        metrics: stage-level figures (wall time, tokens, data statistics, ...).
    """

    final_dir: Path
    final_step: int
    checkpoints: list[tuple[int, Path]]
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
