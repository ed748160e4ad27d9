"""Compute back ends: the Ray bootstrap (local loopback cluster or an existing cluster).

Importing this package does not import Ray; `ensure_ray` does, on first call. ``stage_job`` is the
Ray Job entrypoint of a training stage in the cluster profile (``python -m npr_pipelines.compute.stage_job``).
"""

from npr_pipelines.compute.ray_local import (
    RayInfo,
    enable_jobs_client_auth,
    ensure_ray,
    local_ray,
    shutdown_ray,
    token_auth_enabled,
)

__all__ = [
    "RayInfo",
    "enable_jobs_client_auth",
    "ensure_ray",
    "local_ray",
    "shutdown_ray",
    "token_auth_enabled",
]
