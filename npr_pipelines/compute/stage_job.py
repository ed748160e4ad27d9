"""A training stage as a Ray Job: the cluster profile's entrypoint.

    python -m npr_pipelines.compute.stage_job               # launched by Dagster (Pipes)
    python -m npr_pipelines.compute.stage_job --spec s.json # by hand: the same run, result JSON on stdout

In the cluster profile a stage asset does not run its driver itself: it submits this module as a Ray Job
through dagster-ray's ``PipesRayJobClient`` and waits. The job

1. opens Dagster Pipes and reads its `StageSpec` from the Pipes extras (key ``npr_stage``): the stage,
   the driver's name in `DRIVERS`, the driver config as JSON, the run key, the URIs of the initial
   checkpoint and of the stage's data, the storage base URI, and the MLflow tracking URI and run id;
2. fetches the inputs from storage (manifest-verified; nothing is unpickled), runs the library driver in
   a resumable working directory keyed by the run key, and publishes every checkpoint to storage as it is
   written (with its index entry, which the checkpoint sensor turns into partitions). With a cluster
   layout in the spec (``compute``, `ClusterCompute`), SFT trains with DeepSpeed on Ray actors spread
   over the cluster and RL rolls out on a pool of engine replicas (``compute.cluster``);
3. logs each step's metrics into the asset's MLflow run (it never creates a run of its own) and writes
   the run's result (history, metrics, final checkpoint) to storage;
4. reports ``checkpoint_uri``, ``mlflow_run_id``, ``result_uri``, ``final_step`` and the metrics back
   with ``report_asset_materialization``.

Checkpoints and datasets never travel in the job's ``runtime_env``: they move through the storage URI.
`stage_runtime_env` builds that environment: no ``working_dir`` at all when the cluster has this package
installed (an image, or a head that shares the filesystem), else the code directory with the state,
virtualenv and checkpoint directories excluded. It refuses secret-looking variables (the job info, and
its ``runtime_env``, are readable through the dashboard); the cluster's own environment provides
credentials such as ``MLFLOW_TRACKING_TOKEN`` or S3 keys.

This module imports neither Dagster nor Ray; ``dagster_pipes`` (a small dependency-free package) is
imported only by `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npr_pipelines.compute.cluster import ROLLOUTS, STRATEGY, ClusterCompute, stage_compute
from npr_pipelines.storage import Storage
from npr_pipelines.storage.checkpoints import (
    checkpoint_key,
    checkpoint_ref,
    index_uri,
    publish_checkpoint,
    record_checkpoint,
)

#: The Pipes extra that carries the `StageSpec`.
PIPES_EXTRA = "npr_stage"
#: ``python -m`` target of the job.
ENTRYPOINT_MODULE = "npr_pipelines.compute.stage_job"
#: The data file inside a published stage-input directory.
DATA_FILE = "data.jsonl"
#: MLflow tag naming the Ray job that trained into a run.
TAG_RAY_JOB = "npr.ray_job_id"

#: What a ``working_dir`` upload leaves out (gitignore syntax, relative to the working dir): state,
#: environments, checkpoints and weights, data and caches. Checkpoints and data go through storage.
RUNTIME_ENV_EXCLUDES: tuple[str, ...] = (
    "/.git/",
    "/.npr/",
    "/.venv/",
    "/venv/",
    "/shared/",
    "/data/",  # root-level only: npr_pipelines/data is code
    "checkpoints/",
    "artifacts/",
    "mlruns/",
    "mlartifacts/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.bin",
    "*.ckpt",
    "*.db",
    "*.parquet",
    "*.jsonl",
)
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|ACCESS_KEY", re.I)


# ----------------------------------------------------------------------------------------- drivers
def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def config_json(config: Any) -> dict[str, Any]:
    """A driver config as the JSON it is logged, hashed into run keys, and sent to the job as."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


@dataclass(frozen=True)
class StageDriver:
    """A library training driver the stage job can run by name.

    Every driver is called as ``fn(init_dir, inputs, config=..., workdir=..., on_checkpoint=...,
    on_log=...)`` and returns a ``StageResult``; ``data`` says what ``inputs`` are built from the stage's
    records: ``"problems"`` (``Problem`` objects from id/question/answer/source) or ``"corpus"`` (the rows).
    """

    name: str
    target: str  # "module:function"
    config_type: str  # "module:Class"
    data: str  # "problems" | "corpus"
    compute: str  # what it hands to the cluster: "strategy" (DeepSpeed ranks) | "rollouts" (engine replicas)

    def function(self) -> Callable[..., Any]:
        return _load(self.target)

    def make_config(self, values: Mapping[str, Any]) -> Any:
        """The typed config from its JSON; raises if it does not round-trip (code versions differ)."""
        from npr_pipelines.training.overrides import apply_stage_values

        config = apply_stage_values(_load(self.config_type)(), values)
        if config_json(config) != json.loads(json.dumps(dict(values), default=str)):
            raise ValueError(
                f"driver {self.name!r}: the config does not round-trip through {self.config_type} "
                "(does the job run the same code version as the orchestrator?)"
            )
        return config

    def inputs(self, records: Sequence[Mapping[str, Any]]) -> list[Any]:
        if self.data == "problems":
            from npr_pipelines.data import Problem

            return [
                Problem(str(r["id"]), str(r["question"]), str(r["answer"]), str(r["source"])) for r in records
            ]
        return [dict(r) for r in records]

    def run(self, init_dir: str | os.PathLike, records: Sequence[Mapping[str, Any]], config: Any,
            workdir: str | os.PathLike, *, on_checkpoint: Callable[[int, Path], None] | None = None,
            on_log: Callable[[dict[str, Any]], None] | None = None,
            extra: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
        """Run the driver; ``extra`` holds cluster keyword arguments (``compute.cluster.stage_compute``)."""
        return self.function()(
            str(init_dir), self.inputs(records), config=config, workdir=Path(workdir),
            on_checkpoint=on_checkpoint, on_log=on_log, **dict(extra or {}),
        )  # fmt: skip


_RL, _SFT = "npr_pipelines.training.rl", "npr_pipelines.training.sft"
DRIVERS: dict[str, StageDriver] = {
    d.name: d
    for d in (
        StageDriver("npr_zero", f"{_RL}:run_npr_zero", f"{_RL}:RLConfig", "problems", ROLLOUTS),
        StageDriver("papo", f"{_RL}:run_papo", f"{_RL}:RLConfig", "problems", ROLLOUTS),
        StageDriver("sr", f"{_RL}:run_sr", f"{_RL}:RLConfig", "problems", ROLLOUTS),
        StageDriver("sft", f"{_SFT}:run_sft", f"{_SFT}:SFTConfig", "corpus", STRATEGY),
    )
}


def get_driver(name: str) -> StageDriver:
    try:
        return DRIVERS[name]
    except KeyError:
        raise KeyError(f"unknown stage driver {name!r}; expected one of {sorted(DRIVERS)}") from None


# ------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class StageSpec:
    """Everything a stage job needs; travels as the Pipes extra ``npr_stage`` (JSON, a few KB)."""

    stage: str
    driver: str
    run_key: str
    config: dict[str, Any]
    init_uri: str  # a published checkpoint directory
    data_uri: str  # a published directory holding data.jsonl
    storage_uri: str  # where checkpoints, their index and the result are published
    tracking_uri: str
    mlflow_run_id: str  # the asset's open run: the job logs into it
    work_root: str = ""  # "" = $NPR_HOME/work on the job's node, else the system temp dir
    threads: int = 1  # torch intra-op threads (the job asks Ray for as many CPUs)
    ray_job_id: str = ""  # the submission id, tagged on the MLflow run
    compute: dict[str, Any] | None = None  # `ClusterCompute` JSON: DeepSpeed ranks, engine replicas

    def to_extras(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_extras(cls, data: Mapping[str, Any]) -> StageSpec:
        if not isinstance(data, Mapping):
            raise TypeError(f"the {PIPES_EXTRA!r} extra must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown stage spec fields {unknown}")
        spec = cls(**dict(data))
        get_driver(spec.driver)
        spec.cluster_compute()  # validates the layout
        return spec

    def cluster_compute(self) -> ClusterCompute | None:
        """The cluster layout of the stage, or None: the driver runs in the job's own process."""
        return ClusterCompute.from_json(self.compute) if self.compute else None

    def workdir(self) -> Path:
        return Path(self.work_root or default_work_root()) / self.stage / self.run_key


def default_work_root() -> Path:
    home = os.environ.get("NPR_HOME")
    return Path(home) / "work" if home else Path(tempfile.gettempdir()) / "npr-work"


# ------------------------------------------------------------------------------------------ inputs
def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    return str(obj)


def publish_stage_inputs(
    storage: Storage, stage: str, run_key: str, records: Sequence[Mapping[str, Any]]
) -> str:
    """Publish a stage's records (problems or corpus rows) as ``inputs/<stage>/<run_key>/data.jsonl``
    (once: the run key already hashes the data's version); return the directory's URI."""
    uri = storage.uri("inputs", stage, run_key)
    if storage.is_published(uri):
        return uri
    with tempfile.TemporaryDirectory(prefix="npr-inputs-") as tmp:
        lines = (json.dumps(dict(r), default=_json_default, ensure_ascii=False) for r in records)
        (Path(tmp) / DATA_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        storage.publish_dir(tmp, uri, metadata={"stage": stage, "run_key": run_key, "rows": len(records)})
    return uri


def fetch_published(storage: Storage, uri: str, local_dir: Path) -> Path:
    """A verified local copy of a published directory (fetched once, reused after)."""
    from npr_pipelines.storage import MANIFEST_NAME

    if not (local_dir / MANIFEST_NAME).exists():
        storage.fetch_dir(uri, local_dir, overwrite=True)
    return local_dir


def read_records(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -------------------------------------------------------------------------------------------- run
def publish_stage_checkpoint(storage: Storage, stage: str, run_key: str, step: int, path: Path,
                             run_id: str | None) -> dict[str, Any]:  # fmt: skip
    """Publish one checkpoint (once) and write its index entry; return its reference."""
    uri, version = publish_checkpoint(storage, stage, run_key, step, Path(path))
    ref = checkpoint_ref(stage=stage, step=step, uri=uri, data_version=version, run_id=run_id)
    record_checkpoint(storage, ref)
    return ref


def _scalars(record: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    }


def adopt_published_resume_point(storage: Storage, stage: str, run_key: str, root: Path) -> Path | None:
    """Make the last checkpoint under ``root`` (a run's local ``step-XXXXXX`` directories) a verified copy
    of its published version, so a resumed DeepSpeed run may read its optimizer state: DeepSpeed's files
    are pickles, read only from manifest-verified directories (``deepspeed_strategy``), and a local
    checkpoint has no manifest. A checkpoint the killed job wrote but had not published yet is published
    first, as it would have been. Returns the directory replaced, or None (nothing to resume from)."""
    from npr_pipelines.storage import MANIFEST_NAME
    from npr_pipelines.training.checkpoint import list_checkpoints

    existing = list_checkpoints(root) if root.is_dir() else []
    if not existing or (existing[-1][1] / MANIFEST_NAME).is_file():
        return None
    step, path = existing[-1]
    uri, _ = publish_checkpoint(storage, stage, run_key, step, path)
    storage.fetch_dir(uri, path, overwrite=True)  # verified as fetched; MANIFEST.json kept
    return path


def result_uri(stage: str, run_key: str) -> str:
    """Where a stage job writes its result (relative to the storage base)."""
    return f"runs/{stage}/{run_key}/result.json"


def run_stage(spec: StageSpec, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the stage ``spec`` describes (resuming its working directory) and return its result, which is
    also written to storage at `result_uri`."""
    import torch

    from npr_pipelines.tracking import attach_stage_run

    driver = get_driver(spec.driver)
    config = driver.make_config(spec.config)
    storage = Storage(spec.storage_uri)
    workdir = spec.workdir()
    inputs = workdir.with_name(f"{workdir.name}.inputs")
    init_dir = fetch_published(storage, spec.init_uri, inputs / "init")
    records = read_records(fetch_published(storage, spec.data_uri, inputs / "data") / DATA_FILE)
    run = attach_stage_run(spec.tracking_uri, spec.mlflow_run_id)
    if spec.ray_job_id:
        run.set_tags({TAG_RAY_JOB: spec.ray_job_id})
    torch.set_num_threads(max(1, spec.threads))
    log(f"{spec.stage}: driver {driver.name}, {len(records)} records, workdir {workdir}")

    logged: set[int] = set()

    def on_log(record: dict[str, Any]) -> None:
        step = int(record.get("step", len(logged)))
        run.log_metrics(_scalars(record, skip=("step",)), step=step)
        logged.add(step)

    published: set[int] = set()

    def on_checkpoint(step: int, path: Path) -> None:
        ref = publish_stage_checkpoint(storage, spec.stage, spec.run_key, step, path, spec.mlflow_run_id)
        published.add(step)
        log(f"{spec.stage}: published step {step} at {ref['uri']}")

    compute = spec.cluster_compute()
    if compute is not None:
        log(f"{spec.stage}: cluster compute {json.dumps(compute.to_json(), sort_keys=True)}")
        if driver.compute == STRATEGY and compute.train_workers > 0:
            from npr_pipelines.training.sft import CHECKPOINTS

            if adopt_published_resume_point(storage, spec.stage, spec.run_key, workdir / CHECKPOINTS):
                log(f"{spec.stage}: resuming DeepSpeed ranks from the published copy of the last checkpoint")
    with stage_compute(driver.compute, compute, seed=int(getattr(config, "seed", 0))) as extra:
        result = driver.run(init_dir, records, config, workdir, on_checkpoint=on_checkpoint, on_log=on_log,
                            extra=extra)  # fmt: skip
    for step, path in result.checkpoints:  # a resumed run may hold checkpoints written before a crash
        if step not in published:
            on_checkpoint(step, path)
    for i, record in enumerate(result.history):  # steps trained by an earlier, interrupted job
        if int(record.get("step", i)) not in logged:
            run.log_metrics(_scalars(record, skip=("step",)), step=int(record.get("step", i)))
    run.log_metrics(_scalars(result.metrics))
    final = storage.read_json(index_uri(checkpoint_key(spec.stage, result.final_step)))
    out = {
        "stage": spec.stage,
        "run_key": spec.run_key,
        "final_step": int(result.final_step),
        "steps": [int(s) for s, _ in result.checkpoints],
        "checkpoint_uri": final["uri"],
        "data_version": final["data_version"],
        "mlflow_run_id": spec.mlflow_run_id,
        "ray_job_id": spec.ray_job_id,
        "history": result.history,
        "metrics": result.metrics,
    }
    out = json.loads(json.dumps(out, default=_json_default))
    out["result_uri"] = storage.write_json(result_uri(spec.stage, spec.run_key), out, indent=None)
    return out


# ------------------------------------------------------------------------------------ runtime env
def stage_runtime_env(*, working_dir: str | os.PathLike | None = None,
                      env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``runtime_env`` of a stage job.

    Without ``working_dir`` nothing is uploaded: the cluster runs the package it has installed (an image,
    or a head sharing this filesystem). With it, that directory (the code) is uploaded minus
    `RUNTIME_ENV_EXCLUDES`. ``env_vars`` must not hold secrets (they are readable through the dashboard).
    """
    env = {str(k): str(v) for k, v in (env_vars or {}).items()}
    secret = sorted(k for k in env if _SECRET_NAME.search(k))
    if secret:
        raise ValueError(
            f"refusing secret-looking variables {secret} in a Ray job's runtime_env (readable through the "
            "dashboard); give the cluster its credentials through its own environment"
        )
    runtime_env: dict[str, Any] = {"env_vars": env}
    if working_dir:
        path = Path(working_dir).resolve()
        if not path.is_dir():
            raise ValueError(f"working_dir {path} is not a directory")
        runtime_env["working_dir"] = str(path)
        runtime_env["excludes"] = list(RUNTIME_ENV_EXCLUDES)
    return runtime_env


def entrypoint(python: str = "python") -> str:
    """The job's shell command."""
    import shlex

    return f"{shlex.quote(python)} -m {ENTRYPOINT_MODULE}"


# ------------------------------------------------------------------------------------------- main
def _metadata(out: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "checkpoint_uri": {"raw_value": out["checkpoint_uri"], "type": "path"},
        "mlflow_run_id": {"raw_value": out["mlflow_run_id"], "type": "text"},
        "result_uri": {"raw_value": out["result_uri"], "type": "path"},
        "final_step": {"raw_value": out["final_step"], "type": "int"},
        "metrics": {"raw_value": _scalars(out["metrics"]), "type": "json"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {ENTRYPOINT_MODULE}", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--spec", help="a StageSpec JSON file: run without Dagster Pipes, print the result")
    args = parser.parse_args(argv)
    if args.spec:
        spec = StageSpec.from_extras(json.loads(Path(args.spec).read_text()))
        out = run_stage(spec, log=lambda msg: print(msg, file=sys.stderr))
        print(json.dumps({k: v for k, v in out.items() if k != "history"}))
        return 0

    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        spec = StageSpec.from_extras(pipes.get_extra(PIPES_EXTRA))
        pipes.log.info(f"{spec.stage}: run key {spec.run_key}, MLflow run {spec.mlflow_run_id}")
        out = run_stage(spec, log=pipes.log.info)
        pipes.report_asset_materialization(metadata=_metadata(out), data_version=out["data_version"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
