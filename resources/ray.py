"""Ray: a local loopback cluster by default; a cluster's Jobs API in the cluster profile."""

import os
import uuid
from collections.abc import Mapping
from typing import Any

import dagster as dg

from npr_pipelines.compute.ray_local import RayInfo, enable_jobs_client_auth, ensure_ray


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
    """

    address: str = ""
    num_cpus: int | None = None
    job_submission_address: str = ""
    job_working_dir: str = ""
    job_python: str = "python"  # the interpreter on the cluster that has this package
    job_work_dir: str = ""  # stage working directories on the job's node ("" = $NPR_HOME/work or temp)

    def training_cpus(self) -> int:
        """CPUs a training task asks for: all of a local machine's (one task trains at a time)."""
        return self.num_cpus or os.cpu_count() or 1

    def ensure(self) -> RayInfo:
        if self.address:
            return ensure_ray(self.address)
        return ensure_ray(num_cpus=self.num_cpus)

    # -- cluster profile: Ray Jobs through Pipes ----------------------------------------------------

    def uses_ray_jobs(self) -> bool:
        return bool(self.job_submission_address)

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
