"""Published checkpoints: keys, data versions, references and the index evaluation resolves keys with.

Shared by the Dagster assets and the stage Ray job (which publishes from the cluster), so it has no
Dagster import. A reference is a pointer (URI, data version, MLflow run id), never the weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from npr_pipelines.storage.store import Storage

INDEX_PREFIX = "checkpoints/index"


def checkpoint_key(stage: str, step: int | None) -> str:
    """The dynamic partition key of a checkpoint: ``<stage>-<step:06d>``, or ``base``."""
    return "base" if stage == "base" else f"{stage}-{int(step or 0):06d}"


def manifest_version(storage: Storage, uri: str) -> str:
    """A data version for a published directory: a digest of its manifest's file entries."""
    manifest = storage.read_manifest(uri)
    entries = sorted((name, e.size, e.sha256) for name, e in manifest.files.items())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def publish_checkpoint(storage: Storage, stage: str, key: str, step: int, local_dir: Path) -> tuple[str, str]:
    """Publish a local checkpoint directory (once) and return (uri, data version)."""
    uri = storage.uri("checkpoints", stage, key, f"step-{step:06d}")
    if not storage.is_published(uri):
        storage.publish_dir(local_dir, uri)
    return uri, manifest_version(storage, uri)


def checkpoint_ref(*, stage: str, step: int, uri: str, data_version: str, run_id: str | None,
                   metrics: Mapping[str, Any] | None = None, partition: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint asset stores through the IO manager: a pointer, never the weights."""
    return {
        "stage": stage,
        "step": step,
        "uri": uri,
        "data_version": data_version,
        "mlflow_run_id": run_id,
        "partition": partition or checkpoint_key(stage, step),
        "metrics": dict(metrics or {}),
    }


def index_uri(partition: str) -> str:
    """Where the index entry of checkpoint ``partition`` lives (relative to the storage base)."""
    return f"{INDEX_PREFIX}/{partition}.json"


def record_checkpoint(storage: Storage, ref: Mapping[str, Any]) -> None:
    """Write the checkpoint index entry that evaluation resolves a partition key with."""
    storage.write_json(index_uri(ref["partition"]), dict(ref))


def read_checkpoint(storage: Storage, partition: str) -> dict[str, Any]:
    uri = index_uri(partition)
    if not storage.exists(uri):
        raise KeyError(f"checkpoint {partition!r} is not recorded under {storage.uri(uri)}")
    return storage.read_json(uri)
