"""Model weights are read from safetensors only, and a bad weights file is named in the error.

`check_weights_dir` runs before ``from_pretrained`` on a directory this project did not just write
(``npr serve --model-path``): it refuses a directory whose weights exist only as pickles
(``pytorch_model.bin``, ``*.pt``, ...) BEFORE anything unpickles them, checks every safetensors header
(a truncated or overwritten file fails here, by name, instead of deep inside transformers), and when
the directory carries a ``MANIFEST.json`` (published or fetched by this project) verifies the weight
files' sizes and checksums against it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from npr_pipelines.storage.manifest import MANIFEST_NAME, ArtifactError, Manifest, hash_file

if TYPE_CHECKING:
    import torch

#: Weight files that would be unpickled (``torch.load``); this project never reads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_GLOB = "model*.safetensors"


def _unreadable(path: Path, exc: BaseException) -> ArtifactError:
    return ArtifactError(
        f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}",
        uri=str(path.parent),
        file=path.name,
    )


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose failures name the file (`ArtifactError`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc


def check_safetensors_header(path: str | os.PathLike[str]) -> None:
    """Parse the header of one safetensors file (cheap: no tensor is read); `ArtifactError` naming it
    when the header is invalid or the file is shorter than the header says."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc


def _verify_against_manifest(directory: Path, files: list[Path]) -> None:
    manifest = Manifest.from_json_bytes((directory / MANIFEST_NAME).read_bytes(), source=str(directory))
    for f in files:
        rel = f.relative_to(directory).as_posix()
        expected = manifest.files.get(rel)
        if expected is None:
            raise ArtifactError(
                f"{directory}: {rel} is not in its {MANIFEST_NAME}", uri=str(directory), file=rel
            )
        if hash_file(str(f)) != expected:
            raise ArtifactError(
                f"{directory}: {rel} differs from its {MANIFEST_NAME} (size or sha256): corrupt",
                uri=str(directory),
                file=rel,
            )


def check_weights_dir(path: str | os.PathLike[str]) -> list[Path]:
    """The ``model*.safetensors`` files of a ``from_pretrained`` directory, each checked (see the
    module docstring); `ArtifactError` naming the directory or the bad file otherwise."""
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a model directory", uri=str(directory))
    files = sorted(directory.glob(WEIGHTS_GLOB))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ArtifactError(
                f"{directory}: weights only as pickles ({', '.join(pickles)}); refused without reading "
                "them: this project loads safetensors only (convert with safetensors.torch.save_file)",
                uri=str(directory),
                file=pickles[0],
            )
        raise ArtifactError(f"{directory}: no {WEIGHTS_GLOB} weights", uri=str(directory))
    for f in files:
        check_safetensors_header(f)
    if (directory / MANIFEST_NAME).is_file():
        _verify_against_manifest(directory, files)
    return files


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order: equal digests mean
    bit-identical weights (what a trainer held, what replicas loaded, what a checkpoint reloads to)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
