"""URI-level shortcuts: the publishing API for callers that hold a full URI, not a `Storage`.

Downstream assets receive artifact URIs in metadata; these functions build a `Storage` rooted at that
URI (S3 endpoint and credentials from the environment, see `store.py`) and delegate to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from npr_pipelines.storage.manifest import Manifest
from npr_pipelines.storage.store import Storage


def publish_dir(
    local_dir: str | os.PathLike[str],
    dest_uri: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Publish ``local_dir`` at ``dest_uri`` atomically (files first, ``MANIFEST.json`` last)."""
    return Storage(dest_uri, storage_options).publish_dir(
        local_dir, "", metadata=metadata, overwrite=overwrite
    )


def read_manifest(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest of the published directory at ``uri``; `ArtifactError` if missing or invalid."""
    return Storage(uri, storage_options).read_manifest("")


def verify_dir(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Verify sizes and checksums of the published directory at ``uri``."""
    return Storage(uri, storage_options).verify_dir("")


def fetch_dir(
    uri: str,
    local_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Download the published directory at ``uri`` into ``local_dir``, verified, all-or-nothing."""
    return Storage(uri, storage_options).fetch_dir("", local_dir, overwrite=overwrite)


def is_published(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``uri`` holds a valid manifest."""
    return Storage(uri, storage_options).is_published("")


def list_published(prefix: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URIs of published directories at or under ``prefix``, sorted."""
    return Storage(prefix, storage_options).list_published("")
