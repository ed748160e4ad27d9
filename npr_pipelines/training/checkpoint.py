"""Step-numbered training checkpoints without pickles, and resume.

A checkpoint directory ``step-000123/`` holds what ``from_pretrained`` loads (``config.json``,
``model.safetensors``, the tokenizer) plus the trainer's state: the optimizer's tensors in
``optimizer.safetensors`` with its scalars and param groups in ``optimizer.json``, and
``trainer_state.json`` (step, data cursor, config, metrics history). Sampling randomness is derived
from (seed, step) rather than carried as generator state, so nothing else is needed to resume exactly.
Directories are written to a temporary sibling and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from npr_pipelines.storage.weights import read_safetensors

STEP_DIR = re.compile(r"^step-(\d{6})$")
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class CheckpointState:
    step: int
    data_cursor: int
    config: dict[str, Any]
    history: list[dict[str, Any]]
    extra: dict[str, Any]


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    *,
    data_cursor: int,
    config: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step-XXXXXX`` atomically and return it."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        save_optimizer_state(tmp, optimizer)
    state = {
        "step": step,
        "data_cursor": data_cursor,
        "config": config,
        "history": history or [],
        "extra": extra or {},
    }
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def read_state(path: str | os.PathLike) -> CheckpointState:
    raw = json.loads((Path(path) / TRAINER_STATE).read_text())
    return CheckpointState(
        raw["step"], raw["data_cursor"], raw["config"], raw["history"], raw.get("extra", {})
    )


def save_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Write the optimizer as ``optimizer.safetensors`` (tensors) + ``optimizer.json`` (the rest)."""
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(Path(path) / "optimizer.safetensors"))
    (Path(path) / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer saved beside a checkpoint (safetensors + JSON; nothing unpickled)."""
    path = Path(path)
    tensors = read_safetensors(path / "optimizer.safetensors")  # names a truncated/corrupt file
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(tensors, meta))


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters in name order (for resume-equivalence checks)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
