"""Compute back ends: the Ray bootstrap (local loopback cluster or an existing cluster).

Importing this package does not import Ray; `ensure_ray` does, on first call.
"""

from npr_pipelines.compute.ray_local import RayInfo, ensure_ray, local_ray, shutdown_ray, token_auth_enabled

__all__ = ["RayInfo", "ensure_ray", "local_ray", "shutdown_ray", "token_auth_enabled"]
