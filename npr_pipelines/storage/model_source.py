"""A real base model from a local directory or an ``s3://`` prefix, checked and published as ``base``.

Where the weights may come from:

- ``s3://bucket/prefix`` (any remote URI): it must be a directory PUBLISHED by this project, i.e. carry
  a ``MANIFEST.json`` (sizes + SHA-256 of every file), so what is downloaded is verified file by file.
  ``python -m npr_pipelines.storage.model_source publish LOCAL_DIR s3://bucket/models/NAME`` checks a
  local Hugging Face directory and uploads it that way. A copy is kept under the cache directory and
  reused while it carries the remote manifest and its files still hash to it (else it is fetched again).
- a local directory: a plain Hugging Face directory (as ``huggingface-cli download --local-dir``
  writes it) is accepted as is; when it carries a ``MANIFEST.json``, every file it lists is verified.

Either way the directory must hold ``config.json`` whose ``model_type`` transformers knows (remote code
is never run), a tokenizer with a chat template, and ``model*.safetensors`` weights (a directory with
only pickled weights is refused before anything is read, ``storage.weights``). Hidden files (such as
``.cache/``) and pickled weight files are left out of what is published.

`publish_base_model` publishes the selected files into the artifact store as the ``base`` checkpoint
under a key derived from their content, so later runs with the same files reuse the publication, and
every stage fetches the base from the same store as every other checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.core import split_protocol

from npr_pipelines.storage.api import fetch_dir, read_manifest
from npr_pipelines.storage.checkpoints import manifest_version
from npr_pipelines.storage.manifest import MANIFEST_NAME, ArtifactError, FileEntry, Manifest, hash_file
from npr_pipelines.storage.store import Storage
from npr_pipelines.storage.weights import (
    PICKLE_SUFFIXES,
    WEIGHTS_GLOB,
    check_safetensors_header,
    check_weights_dir,
)

_LOCAL = (None, "file", "local")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDir:
    """A checked local model directory and where it came from."""

    uri: str  # as given
    path: Path  # local directory ``from_pretrained`` can load
    files: Mapping[str, FileEntry]  # the files to publish (relative path -> size, sha256)
    verified: str  # "manifest" (every file checked against a MANIFEST.json) or "hashed" (plain directory)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Content digest of ``files``: equal to the data version of its publication."""
        entries = sorted((name, e.size, e.sha256) for name, e in self.files.items())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def is_remote(uri: str) -> bool:
    return split_protocol(uri)[0] not in _LOCAL


def local_path(uri: str) -> Path:
    return Path(split_protocol(uri)[1]).expanduser().resolve()


def selected_files(directory: Path) -> list[str]:
    """Relative paths of the files a model directory contributes: not hidden, not pickled weights,
    not its manifest."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == MANIFEST_NAME or path.suffix in PICKLE_SUFFIXES:
            continue
        out.append(rel.as_posix())
    return out


def _check_weights(path: Path) -> list[Path]:
    """Safetensors weights with valid headers (nothing hashed: the caller verifies content)."""
    files = sorted(path.glob(WEIGHTS_GLOB))
    if not files:
        return check_weights_dir(path)  # raises, naming pickle-only weights or their absence
    for f in files:
        check_safetensors_header(f)
    return files


def check_model_dir(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a Hugging Face model directory (see the module docstring) and describe it;
    `ArtifactError` naming the directory and what is wrong otherwise."""
    from transformers import AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from npr_pipelines.tokenization import has_tag_tokens

    path = Path(directory)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{path}: no config.json: not a Hugging Face model directory", uri=str(path))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: config.json is not valid JSON ({exc})", uri=str(path)) from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ArtifactError(
            f"{path}: model_type {model_type!r} is not built into transformers; this project never runs a "
            "model's own code (trust_remote_code is off)",
            uri=str(path),
            file="config.json",
        )
    weights = _check_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: the tokenizer does not load ({exc})", uri=str(path)) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ArtifactError(
            f"{path}: the tokenizer has no chat template; NPR prompts need one", uri=str(path)
        )
    return {
        "model_type": model_type,
        "architectures": list(config.get("architectures") or []),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "tokenizer_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "has_tag_tokens": has_tag_tokens(tokenizer),
        "weight_files": len(weights),
        "weight_bytes": sum(w.stat().st_size for w in weights),
    }


def _cached_copy(uri: str, cache_root: Path) -> tuple[Path, Manifest]:
    """A verified local copy of the published remote directory ``uri`` and its manifest. A cached copy
    carrying the remote's manifest is re-hashed against it and fetched again if it fails."""
    remote = read_manifest(uri)
    target = cache_root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    cached = target / MANIFEST_NAME
    if cached.is_file() and cached.read_bytes() == remote.to_json_bytes():
        try:
            _verified_files(target, list(remote.files), remote, uri)
            return target, remote
        except ArtifactError as exc:
            logger.warning("cached copy of %s fails verification (%s); fetching it again", uri, exc)
    return target, fetch_dir(uri, target, overwrite=True)  # every file verified on the way in


def _verified_files(
    path: Path, names: list[str], manifest: Manifest | None, uri: str
) -> dict[str, FileEntry]:
    """Size and SHA-256 of each of ``names``, checked against ``manifest`` when there is one."""
    files = {n: hash_file(str(path / n)) for n in names}
    if manifest is None:
        return files
    for name, entry in files.items():
        expected = manifest.files.get(name)
        if expected is None:
            raise ArtifactError(f"{uri}: {name} is not in its {MANIFEST_NAME}", uri=uri, file=name)
        if expected != entry:
            raise ArtifactError(
                f"{uri}: {name} differs from its {MANIFEST_NAME} (size or sha256): corrupt",
                uri=uri,
                file=name,
            )
    missing = sorted(n for n in manifest.files if not (path / n).is_file())
    if missing:
        raise ArtifactError(
            f"{uri}: {missing[0]} is in its {MANIFEST_NAME} but missing", uri=uri, file=missing[0]
        )
    return files


def open_model_dir(uri: str, cache_root: str | os.PathLike[str]) -> ModelDir:
    """The checked local model directory for ``uri`` (a local path, ``file://`` or ``s3://`` URI).
    Content is verified before anything is read, so a corrupt file is reported as corrupt."""
    if is_remote(uri):
        path, manifest = _cached_copy(uri, Path(cache_root))
        names = selected_files(path)
        files = {n: manifest.files[n] for n in names}
        verified = "manifest"
    else:
        path = local_path(uri)
        if not path.is_dir():
            raise ArtifactError(f"{uri}: no such model directory", uri=uri)
        carried = path / MANIFEST_NAME
        local = Manifest.from_json_bytes(carried.read_bytes(), source=uri) if carried.is_file() else None
        files = _verified_files(path, selected_files(path), local, uri)
        verified = "manifest" if local else "hashed"
    return ModelDir(uri=uri, path=path, files=files, verified=verified, info=check_model_dir(path))


def _publishable(model: ModelDir, scratch: Path) -> tuple[Path, bool]:
    """A directory holding exactly ``model.files``, and whether it is temporary: the model's own when
    it holds nothing else, else one of hard links under ``scratch`` (or beside the model when
    ``scratch`` is on another filesystem; copies when neither can link)."""
    everything = [p for p in model.path.rglob("*") if p.is_file()]
    if len(everything) == len(model.files):
        return model.path, False
    scratch.mkdir(parents=True, exist_ok=True)
    same_fs = os.stat(scratch).st_dev == os.stat(model.path).st_dev
    parent = model.path.parent if not same_fs and os.access(model.path.parent, os.W_OK) else scratch
    stage = Path(tempfile.mkdtemp(prefix=f".{model.path.name}.publish-", dir=parent))
    for rel in model.files:
        src, dst = model.path / rel, stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return stage, True


def _publish(model: ModelDir, storage: Storage, uri: str, scratch: Path, overwrite: bool = False) -> None:
    directory, temporary = _publishable(model, scratch)
    try:
        storage.publish_dir(directory, uri, metadata={"source": model.uri, "verified": model.verified},
                            overwrite=overwrite)  # fmt: skip
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


def publish_base_model(storage: Storage, model: ModelDir, scratch: str | os.PathLike[str]) -> tuple[str, str]:
    """Publish ``model`` as the ``base`` checkpoint (once per content) and return (uri, data version)."""
    uri = storage.uri("checkpoints", "base", model.digest, "step-000000")
    if not storage.is_published(uri):
        _publish(model, storage, uri, Path(scratch))
    return uri, manifest_version(storage, uri)


def publish_model(local_dir: str | os.PathLike[str], dest_uri: str, *, overwrite: bool = False) -> str:
    """Check a local Hugging Face directory and publish its files at ``dest_uri`` (e.g. ``s3://...``)
    with a manifest, so ``open_model_dir`` can fetch it verified. Returns the content digest."""
    model = open_model_dir(str(local_dir), tempfile.gettempdir())
    _publish(model, Storage(dest_uri), "", Path(tempfile.gettempdir()), overwrite=overwrite)
    return model.digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m npr_pipelines.storage.model_source",
        description="Publish a local Hugging Face model directory (checked, with a manifest) at a URI.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="check LOCAL_DIR and publish it at DEST_URI")
    pub.add_argument("local_dir")
    pub.add_argument("dest_uri")
    pub.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    digest = publish_model(args.local_dir, args.dest_uri, overwrite=args.overwrite)
    print(json.dumps({"published": args.dest_uri, "digest": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
