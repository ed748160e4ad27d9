"""Ray: a local loopback cluster by default; a cluster's Jobs API in the cluster profile."""

import os
import uuid
from collections.abc import Mapping
from typing import Any

import dagster as dg

from npr_pipelines.compute.ray_local import RayInfo, enable_jobs_client_auth, ensure_ray

COMPUTE_MODES = ("embedded", "cluster")


class RayResource(dg.ConfigurableResource):
    """Where stage compute runs.

    Embedded profile (``job_submission_address`` empty): stages run as Ray tasks on ``address``, or on a
    local Ray this process starts on 127.0.0.1 with token auth on.

    Cluster profile (``job_submission_address`` = the Ray dashboard URL, e.g. ``http://head:8265``): each
    training stage is submitted by its asset as a Ray Job through dagster-ray's ``PipesRayJobClient``
    (entrypoint ``python -m npr_pipelines.compute.stage_job``). Checkpoints and data move through the
    storage URI, never through the job's ``runtime_env``. With ``job_working_dir`` empty nothing is
    uploaded (the cluster has this package installed: an image, or a shared filesystem); otherwise that
    directory (the code) is uploaded minus state, environments and checkpoints. The Ray token comes from
    Ray's own sources (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), never config.

    ``compute`` says what a stage job does on the cluster: ``"embedded"`` runs the driver in the job's
    own process (torch strategy, in-process engine); ``"cluster"`` (needs ``job_submission_address``)
    trains SFT with DeepSpeed ZeRO on ``train_workers`` Ray actors placed by ``placement_strategy``
    (``STRICT_SPREAD``: one per node) and rolls RL out on ``engine_replicas`` engine replicas whose
    weights follow the trainer (``npr_pipelines.compute.cluster.ClusterCompute``). Rejection sampling and
    evaluation run as Ray tasks on ``address`` (set it to the cluster's GCS address in this profile).
    """

    address: str = ""
    num_cpus: int | None = None
    job_submission_address: str = ""
    job_working_dir: str = ""
    job_python: str = "python"  # the interpreter on the cluster that has this package
    job_work_dir: str = ""  # stage working directories on the job's node ("" = $NPR_HOME/work or temp)
    compute: str = "embedded"  # "embedded" | "cluster" (see the class docstring)
    train_workers: int = 2
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    placement_strategy: str = "SPREAD"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    use_gpu: bool = False
    worker_cpus: float = 1.0
    engine_replicas: int = 2
    engine_cpus: float = 1.0
    engine_gpus: float = 0.0
    engine_placement_strategy: str = "SPREAD"
    # Embedded layout: RL stages roll out on this many engine replicas sharing the stage task's CPUs
    # (``compute.cluster.owner_rollouts``); 0: the in-process engine; None: one per training CPU when
    # there are 2 or more (the decode loop is mostly single-threaded host work).
    rollout_replicas: int | None = None

    def training_cpus(self) -> int:
        """CPUs a training task asks for: all of a local machine's (one task trains at a time)."""
        return self.num_cpus or os.cpu_count() or 1

    def embedded_rollout_replicas(self) -> int:
        """Engine replicas of an embedded RL stage (see ``rollout_replicas``)."""
        if self.rollout_replicas is not None:
            return max(0, self.rollout_replicas)
        cpus = self.training_cpus()
        return cpus if cpus >= 2 else 0

    def ensure(self) -> RayInfo:
        if self.address:
            return ensure_ray(self.address)
        return ensure_ray(num_cpus=self.num_cpus)

    # -- cluster profile: Ray Jobs through Pipes ----------------------------------------------------

    def uses_ray_jobs(self) -> bool:
        return bool(self.job_submission_address)

    def cluster_compute(self) -> dict[str, Any] | None:
        """The stage jobs' cluster layout (`ClusterCompute` JSON), or None in the embedded layout."""
        from npr_pipelines.compute.cluster import ClusterCompute

        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        if self.compute == "embedded":
            return None
        if not self.uses_ray_jobs():
            raise ValueError('compute="cluster" runs stages as Ray Jobs: set job_submission_address')
        fields = {f: getattr(self, f) for f in ClusterCompute.__dataclass_fields__}
        return ClusterCompute(**fields).to_json()

    def job_cpus(self) -> int:
        """CPUs a stage job asks the cluster for (and its torch threads): ``num_cpus``, else 1."""
        return self.num_cpus or 1

    def pipes_client(self) -> Any:
        """A dagster-ray ``PipesRayJobClient`` for the Jobs API at ``job_submission_address``."""
        from dagster_ray import PipesRayJobClient

        enable_jobs_client_auth()
        return PipesRayJobClient(address=self.job_submission_address, poll_interval=1.0)

    def submit_job_params(self, *, name: str, env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``submit_job`` arguments of a stage job (dagster-ray adds the Pipes variables and metadata)."""
        from npr_pipelines.compute.stage_job import entrypoint, stage_runtime_env

        return {
            "entrypoint": entrypoint(self.job_python),
            "runtime_env": stage_runtime_env(working_dir=self.job_working_dir or None, env_vars=env_vars),
            "submission_id": f"npr-{name}-{uuid.uuid4().hex[:10]}",
            "entrypoint_num_cpus": float(self.job_cpus()),
        }
