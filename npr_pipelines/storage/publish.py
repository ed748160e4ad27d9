"""Atomic publishing of artifact directories, and the readers that trust only published ones.

Protocol: every file is written first and ``MANIFEST.json`` (sizes + SHA-256) last, so a directory
without a manifest is an unfinished publication and readers refuse it.

- Local disk: the directory is assembled in a hidden sibling (``.<name>.publishing-<id>``) and renamed
  into place; an existing publication is renamed aside (with its manifest) in the same swap, so a
  reader sees the old directory, the new one, or nothing, never a mixture, and a failed publish
  leaves the previous publication untouched.
- Object stores (no rename): on ``overwrite=True`` the old manifest is deleted FIRST, then the old
  files, then the new files are uploaded and the new manifest written. A failure at any point leaves
  the destination unpublished (readers refuse it); the partial upload is removed best-effort.

Any unmanifested content already at the destination is treated as the debris of an interrupted
publication and replaced; so are the hidden staging directories a killed local publisher (or fetch)
left beside it. Single writer per destination is assumed.
"""

from __future__ import annotations

import glob
import os
import posixpath
import shutil
import uuid
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npr_pipelines.storage.manifest import (
    MANIFEST_NAME,
    ArtifactError,
    FileEntry,
    Manifest,
    check_relative_path,
    hash_file,
    hash_stream,
)

if TYPE_CHECKING:
    from npr_pipelines.storage.store import Storage


def _scan_local_dir(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file under ``local_dir``, sorted."""
    if not local_dir.is_dir():
        raise ArtifactError(f"{local_dir}: not a directory, nothing to publish", uri=str(local_dir))
    files: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(local_dir):
        dirs.sort()
        for name in sorted(names):
            src = Path(root) / name
            if not src.is_file():
                continue
            rel = src.relative_to(local_dir).as_posix()
            try:
                check_relative_path(rel)
            except ValueError as exc:
                raise ArtifactError(f"{local_dir}: cannot publish: {exc}", uri=str(local_dir)) from exc
            files.append((rel, src))
    return files


def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _remove_debris(path: Path, *tags: str) -> None:
    """Hidden siblings of ``path`` that a killed writer left (single writer per destination)."""
    for tag in tags:
        for stale in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(staged: Path, dest: Path) -> None:
    """Rename ``staged`` to ``dest``; an existing ``dest`` is renamed aside first and then deleted."""
    if not dest.exists():
        os.rename(staged, dest)
        return
    if not dest.is_dir():
        raise ArtifactError(f"{dest}: exists and is not a directory", uri=str(dest))
    old = _hidden_sibling(dest, "replaced")
    os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _copy_file(src: Path, dst: Path) -> FileEntry:
    """Copy one file, hashing what is written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        return hash_stream(fi, fo)


def _already_published(dest_uri: str) -> ArtifactError:
    return ArtifactError(
        f"{dest_uri}: already published (has {MANIFEST_NAME}); pass overwrite=True to replace it",
        uri=dest_uri,
    )


def publish_dir(
    storage: Storage,
    local_dir: str | os.PathLike[str],
    dest: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Publish ``local_dir`` at ``dest`` (see the module docstring); return the manifest written."""
    src_dir = Path(local_dir).resolve()
    files = _scan_local_dir(src_dir)
    path = storage._path(dest)
    dest_uri = storage._to_uri(path)
    if storage.is_local:
        return _publish_local(files, Path(path), dest_uri, metadata, overwrite)
    if "/" not in path:
        raise ValueError(f"{dest_uri}: refusing to publish to a bucket root")
    return _publish_remote(storage, files, path, dest_uri, metadata, overwrite)


def _publish_local(
    files: list[tuple[str, Path]],
    dest: Path,
    dest_uri: str,
    metadata: Mapping[str, Any] | None,
    overwrite: bool,
) -> Manifest:
    if dest == dest.parent:
        raise ValueError(f"{dest_uri}: refusing to publish to a filesystem root")
    if (dest / MANIFEST_NAME).exists() and not overwrite:
        raise _already_published(dest_uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(dest, "publishing", "replaced")
    staged = _hidden_sibling(dest, "publishing")
    try:
        staged.mkdir()
        entries = {rel: _copy_file(src, staged / rel) for rel, src in files}
        manifest = Manifest.create(entries, metadata)
        (staged / MANIFEST_NAME).write_bytes(manifest.to_json_bytes())
        if (dest / MANIFEST_NAME).exists() and not overwrite:  # published meanwhile
            raise _already_published(dest_uri)
        _swap_into_place(staged, dest)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return manifest


def _publish_remote(
    storage: Storage,
    files: list[tuple[str, Path]],
    path: str,
    dest_uri: str,
    metadata: Mapping[str, Any] | None,
    overwrite: bool,
) -> Manifest:
    fs = storage.fs
    manifest_path = f"{path}/{MANIFEST_NAME}"
    # Hash before touching the destination: a bad source must not cost the old publication.
    manifest = Manifest.create({rel: hash_file(str(src)) for rel, src in files}, metadata)
    storage._fresh(path)
    if fs.exists(manifest_path):
        if not overwrite:
            raise _already_published(dest_uri)
        # Manifest first: from here on readers refuse the directory instead of seeing old+new files.
        fs.rm_file(manifest_path)
    storage._remove_tree(path)
    try:
        for rel, src in files:
            fs.put_file(str(src), f"{path}/{rel}")
        storage._fresh(path)
        listed = {p: info for p, info in fs.find(path, detail=True).items()}
        for rel, entry in manifest.files.items():
            got = listed.get(f"{path}/{rel}", {}).get("size")
            if got != entry.size:
                raise ArtifactError(
                    f"{dest_uri}: upload of {rel} incomplete (size {got}, expected {entry.size})",
                    uri=dest_uri,
                    file=rel,
                )
        fs.pipe_file(manifest_path, manifest.to_json_bytes())
    except Exception as exc:
        with suppress(Exception):
            storage._remove_tree(path)
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(
            f"{dest_uri}: publishing failed ({type(exc).__name__}: {exc}); the destination is unpublished",
            uri=dest_uri,
        ) from exc
    return manifest


def read_manifest(storage: Storage, uri: str) -> Manifest:
    """The manifest at ``uri``; :class:`ArtifactError` naming the URI if missing or invalid."""
    path = storage._path(uri)
    dest_uri = storage._to_uri(path)
    manifest_path = posixpath.join(path, MANIFEST_NAME)
    storage._fresh(manifest_path)
    try:
        raw = storage.fs.cat_file(manifest_path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ArtifactError(
            f"{dest_uri}: not a published artifact directory: {MANIFEST_NAME} is missing "
            "(never published, or the publication did not complete)",
            uri=dest_uri,
        ) from exc
    return Manifest.from_json_bytes(raw, source=dest_uri)


def verify_dir(storage: Storage, uri: str) -> Manifest:
    """Verify sizes and checksums of every file the manifest lists (extra files are ignored)."""
    manifest = read_manifest(storage, uri)
    path = storage._path(uri)
    dest_uri = storage._to_uri(path)
    for rel, entry in manifest.files.items():
        file_path = posixpath.join(path, rel)
        try:
            size = storage.fs.info(file_path)["size"]
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{dest_uri}: {rel} is in the manifest but missing", uri=dest_uri, file=rel
            ) from exc
        if size != entry.size:
            raise ArtifactError(
                f"{dest_uri}: {rel}: size {size} differs from the manifest ({entry.size})",
                uri=dest_uri,
                file=rel,
            )
        with storage.fs.open(file_path, "rb") as f:
            got = hash_stream(f)
        _check_entry(dest_uri, rel, entry, got)
    return manifest


def _check_entry(dest_uri: str, rel: str, expected: FileEntry, got: FileEntry) -> None:
    if got.size != expected.size:
        raise ArtifactError(
            f"{dest_uri}: {rel}: size {got.size} differs from the manifest ({expected.size})",
            uri=dest_uri,
            file=rel,
        )
    if got.sha256 != expected.sha256:
        raise ArtifactError(
            f"{dest_uri}: {rel}: sha256 mismatch (manifest {expected.sha256}, content {got.sha256})",
            uri=dest_uri,
            file=rel,
        )


def fetch_dir(
    storage: Storage, uri: str, local_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Manifest:
    """Download a published directory into ``local_dir``; all-or-nothing, each file verified."""
    manifest = read_manifest(storage, uri)
    path = storage._path(uri)
    dest_uri = storage._to_uri(path)
    target = Path(local_dir).resolve()
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target}: already exists; pass overwrite=True to replace it", uri=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(target, "fetching", "replaced")
    staged = _hidden_sibling(target, "fetching")
    try:
        staged.mkdir()
        for rel, entry in manifest.files.items():
            out = staged / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with storage.fs.open(posixpath.join(path, rel), "rb") as fi, open(out, "wb") as fo:
                got = hash_stream(fi, fo)
            _check_entry(dest_uri, rel, entry, got)
        # The local copy is itself a published directory (verifiable, re-publishable).
        (staged / MANIFEST_NAME).write_bytes(manifest.to_json_bytes())
        _swap_into_place(staged, target)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return manifest


def is_published(storage: Storage, uri: str) -> bool:
    """Whether ``uri`` has a valid manifest (files are not re-hashed; see :func:`verify_dir`)."""
    try:
        read_manifest(storage, uri)
    except ArtifactError:
        return False
    return True


def list_published(storage: Storage, prefix: str = "") -> list[str]:
    """Directories at or under ``prefix`` holding a ``MANIFEST.json`` (hidden staging dirs skipped)."""
    root = storage._path(prefix)
    storage._fresh(root)
    try:
        found = storage.fs.find(root)
    except FileNotFoundError:
        return []
    out: list[str] = []
    for p in found:
        if posixpath.basename(p) != MANIFEST_NAME:
            continue
        directory = posixpath.dirname(p)
        rel = posixpath.relpath(directory, root) if directory != root else ""
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue
        out.append(storage._to_uri(directory))
    return sorted(out)
