"""Artifact storage: one base URI (local ``.npr/artifacts`` or ``s3://``) and atomic publishing.

Big artifacts (checkpoints, corpora) are published as directories with a ``MANIFEST.json`` written
last (sizes + SHA-256); readers accept only manifested directories and verify what they download.
Only JSON is ever written by this package; nothing is pickled.
"""

from npr_pipelines.storage.api import (
    fetch_dir,
    is_published,
    list_published,
    publish_dir,
    read_manifest,
    verify_dir,
)
from npr_pipelines.storage.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ArtifactError,
    FileEntry,
    Manifest,
)
from npr_pipelines.storage.store import DEFAULT_BASE_URI, Storage, StorageUnreachable, write_json_report

__all__ = [
    "DEFAULT_BASE_URI",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ArtifactError",
    "FileEntry",
    "Manifest",
    "Storage",
    "StorageUnreachable",
    "fetch_dir",
    "is_published",
    "list_published",
    "publish_dir",
    "read_manifest",
    "verify_dir",
    "write_json_report",
]
