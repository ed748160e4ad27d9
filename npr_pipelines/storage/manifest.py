"""Artifact manifests: the JSON record that makes a directory "published".

A published directory holds its files plus ``MANIFEST.json``::

    {"version": 1, "created_at": "2026-11-25T18:00:00+00:00",
     "files": {"sub/model.safetensors": {"size": 123, "sha256": "<64 hex>"}, ...},
     "metadata": {...}}

The manifest is written last, so its presence means every listed file was fully written. Readers
trust only what the manifest lists, and parsing is strict: an unknown version, a malformed entry or
a path that could escape the directory (``..``, absolute paths) is an :class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
CHUNK_SIZE = 1 << 20

_HEX = frozenset("0123456789abcdef")


class ArtifactError(RuntimeError):
    """An artifact directory is missing, unpublished, invalid or corrupt; the message names it."""

    def __init__(self, message: str, *, uri: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        self.file = file


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and hex SHA-256 of one published file."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed content of a ``MANIFEST.json``."""

    files: Mapping[str, FileEntry]
    created_at: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @classmethod
    def create(cls, files: Mapping[str, FileEntry], metadata: Mapping[str, Any] | None = None) -> Manifest:
        """A new manifest stamped with the current UTC time; validates paths and metadata."""
        for rel in files:
            check_relative_path(rel)
        meta = dict(metadata or {})
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest metadata must be plain JSON (no NaN/inf): {exc}") from exc
        return cls(
            files=dict(sorted(files.items())),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metadata=meta,
        )

    @property
    def total_size(self) -> int:
        """Sum of all file sizes in bytes."""
        return sum(e.size for e in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (the on-disk schema)."""
        return {
            "version": self.version,
            "created_at": self.created_at,
            "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in self.files.items()},
            "metadata": dict(self.metadata),
        }

    def to_json_bytes(self) -> bytes:
        """Serialised manifest (strict JSON, UTF-8)."""
        return (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<manifest>") -> Manifest:
        """Parse and validate; raise :class:`ArtifactError` naming ``source`` on any problem."""

        def bad(why: str) -> ArtifactError:
            return ArtifactError(f"{source}: invalid {MANIFEST_NAME}: {why}", uri=source)

        if not isinstance(data, dict):
            raise bad("top level is not an object")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise bad(f"unsupported version {version!r} (expected {MANIFEST_VERSION})")
        created_at = data.get("created_at")
        if not isinstance(created_at, str) or not created_at:
            raise bad("created_at missing or not a string")
        raw_files = data.get("files")
        if not isinstance(raw_files, dict):
            raise bad("files missing or not an object")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise bad("metadata is not an object")
        files: dict[str, FileEntry] = {}
        for rel, entry in raw_files.items():
            try:
                check_relative_path(rel)
            except ValueError as exc:
                raise bad(str(exc)) from exc
            if not isinstance(entry, dict):
                raise bad(f"entry for {rel!r} is not an object")
            size, digest = entry.get("size"), entry.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"entry for {rel!r}: size must be a non-negative integer")
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
                raise bad(f"entry for {rel!r}: sha256 must be 64 lowercase hex digits")
            files[rel] = FileEntry(size=size, sha256=digest)
        return cls(files=files, created_at=created_at, metadata=metadata, version=version)

    @classmethod
    def from_json_bytes(cls, raw: bytes, *, source: str = "<manifest>") -> Manifest:
        """Parse a serialised manifest; raise :class:`ArtifactError` naming ``source`` if invalid."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{source}: invalid {MANIFEST_NAME}: not JSON ({exc})", uri=source) from exc
        return cls.from_dict(data, source=source)


def check_relative_path(rel: str) -> None:
    """Reject manifest paths that are empty, absolute, non-POSIX or could leave the directory."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"bad file path {rel!r}: empty or not a string")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise ValueError(f"bad file path {rel!r}: must be a relative POSIX path")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"bad file path {rel!r}: empty, '.' or '..' component")
    if rel == MANIFEST_NAME:
        raise ValueError(f"bad file path {rel!r}: {MANIFEST_NAME} is reserved")


def hash_stream(stream: IO[bytes], sink: IO[bytes] | None = None) -> FileEntry:
    """Size and SHA-256 of a binary stream, optionally copying it into ``sink`` on the way."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return FileEntry(size=size, sha256=digest.hexdigest())


def hash_file(path: str) -> FileEntry:
    """Size and SHA-256 of a local file."""
    with open(path, "rb") as f:
        return hash_stream(f)
