"""What every stage asset shares: run keys, checkpoint publishing and references, Ray dispatch, plots."""

import base64
import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from npr_pipelines.storage.checkpoints import (
    checkpoint_key,
    checkpoint_ref,
    manifest_version,
    publish_checkpoint,
    read_checkpoint,
    record_checkpoint,
)

__all__ = [
    "CHECKPOINTS",
    "checkpoint_key",
    "checkpoint_metadata",
    "checkpoint_ref",
    "curve_plot",
    "log_asset_inputs",
    "manifest_version",
    "numeric_metadata",
    "png_markdown",
    "publish_checkpoint",
    "read_checkpoint",
    "record_checkpoint",
    "register_checkpoints",
    "run_key",
    "run_on_ray",
]

CHECKPOINTS = dg.DynamicPartitionsDefinition(name="checkpoints")


def run_key(stage: str, config: Mapping[str, Any], upstream_versions: Sequence[str]) -> str:
    """The identity of a stage run: its config and its inputs' data versions (DESIGN.md, resume)."""
    payload = json.dumps({"stage": stage, "config": config, "upstream": list(upstream_versions)}, sort_keys=True,
                         default=str)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_metadata(ref: Mapping[str, Any], mlflow_url: str | None) -> dict[str, dg.MetadataValue]:
    out = {
        "uri": dg.MetadataValue.path(ref["uri"]),
        "checkpoint": dg.MetadataValue.text(ref["partition"]),
        "mlflow_run_id": dg.MetadataValue.text(ref["mlflow_run_id"] or ""),
    }
    if mlflow_url:
        out["mlflow_url"] = dg.MetadataValue.url(mlflow_url)
    return out


def register_checkpoints(instance: dg.DagsterInstance, keys: Sequence[str]) -> None:
    """Add checkpoint partition keys (the sensor does this for intermediate checkpoints)."""
    new = [k for k in keys if not instance.has_dynamic_partition(CHECKPOINTS.name, k)]
    if new:
        instance.add_dynamic_partitions(CHECKPOINTS.name, new)


def log_asset_inputs(run: Any, inputs: Mapping[str, tuple[Any, str]], storage: Any) -> None:
    """Log upstream asset values into an MLflow stage run as dataset inputs, one per asset (name = the
    asset), whose digest is the asset's Dagster data version: a DataFrame as itself (source: where the IO
    manager stores it), a checkpoint reference as one row of its scalar fields (source: its URI)."""
    import pandas as pd

    for asset, (value, version) in inputs.items():
        if isinstance(value, pd.DataFrame):
            df, source, kind = value, storage.uri("io", f"{asset}.parquet"), "training"
        else:
            scalars = {k: v for k, v in value.items() if isinstance(v, str | int | float | None)}
            df, source, kind = pd.DataFrame([scalars]), str(value["uri"]), "checkpoint"
        run.log_input(df, name=asset, source=source, digest=version, context=kind)


#: (task label, seconds inside the Ray task body) for every `run_on_ray` call of this process, so the
#: main job can report how much of its wall time is orchestration (Dagster, Ray scheduling, MLflow,
#: storage) rather than compute, and where the compute went.
COMPUTE_SECONDS: list[tuple[str, float]] = []


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def run_on_ray(
    fn: Callable[..., Any], *args: Any, num_cpus: int = 1, label: str | None = None, **kwargs: Any
) -> Any:
    """Run ``fn`` as a Ray task on the cluster the Ray resource attached to, and wait for it (the time
    inside the task is added to `COMPUTE_SECONDS` under ``label``, ``fn``'s name by default)."""
    import ray

    seconds, result = ray.get(
        ray.remote(num_cpus=num_cpus, max_retries=0)(_timed).remote(fn, *args, **kwargs)
    )
    COMPUTE_SECONDS.append((label or fn.__name__, seconds))
    return result


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
