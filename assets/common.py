"""What every stage asset shares: run keys, checkpoint publishing and references, Ray dispatch, plots."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from npr_pipelines.storage import Storage

CHECKPOINTS = dg.DynamicPartitionsDefinition(name="checkpoints")


def run_key(stage: str, config: Mapping[str, Any], upstream_versions: Sequence[str]) -> str:
    """The identity of a stage run: its config and its inputs' data versions (DESIGN.md, resume)."""
    payload = json.dumps({"stage": stage, "config": config, "upstream": list(upstream_versions)}, sort_keys=True,
                         default=str)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def checkpoint_metadata(ref: Mapping[str, Any], mlflow_url: str | None) -> dict[str, dg.MetadataValue]:
    out = {
        "uri": dg.MetadataValue.path(ref["uri"]),
        "checkpoint": dg.MetadataValue.text(ref["partition"]),
        "mlflow_run_id": dg.MetadataValue.text(ref["mlflow_run_id"] or ""),
    }
    if mlflow_url:
        out["mlflow_url"] = dg.MetadataValue.url(mlflow_url)
    return out


def record_checkpoint(storage: Storage, ref: Mapping[str, Any]) -> None:
    """Write the checkpoint index entry that evaluation resolves a partition key with."""
    storage.write_json(f"checkpoints/index/{ref['partition']}.json", dict(ref))


def read_checkpoint(storage: Storage, partition: str) -> dict[str, Any]:
    uri = f"checkpoints/index/{partition}.json"
    if not storage.exists(uri):
        raise KeyError(f"checkpoint {partition!r} is not recorded under {storage.uri(uri)}")
    return storage.read_json(uri)


def register_checkpoints(instance: dg.DagsterInstance, keys: Sequence[str]) -> None:
    """Add checkpoint partition keys (the sensor does this for intermediate checkpoints)."""
    new = [k for k in keys if not instance.has_dynamic_partition(CHECKPOINTS.name, k)]
    if new:
        instance.add_dynamic_partitions(CHECKPOINTS.name, new)


def run_on_ray(fn: Callable[..., Any], *args: Any, num_cpus: int = 1, **kwargs: Any) -> Any:
    """Run ``fn`` as a Ray task on the cluster the Ray resource attached to, and wait for it."""
    import ray

    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=0)(fn).remote(*args, **kwargs))


def png_markdown(fig) -> dg.MetadataValue:
    """A matplotlib figure as inline markdown (the Dagster UI renders it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{encoded})")


def curve_plot(
    history: Sequence[Mapping[str, Any]], keys: Sequence[str], title: str
) -> dg.MetadataValue | None:
    """A line plot of ``keys`` over steps from a training history; None when there is nothing to plot."""
    rows = [h for h in history if any(k in h for k in keys)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for k in keys:
        pts = [(h.get("step", i), h[k]) for i, h in enumerate(rows) if h.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
    meta = png_markdown(fig)
    plt.close(fig)
    return meta


def numeric_metadata(metrics: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """Scalars as Dagster metadata (the UI plots them across materializations)."""
    out: dict[str, dg.MetadataValue] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            out[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[key] = dg.MetadataValue.float(value)
    return out
