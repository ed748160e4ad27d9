"""Ray: a local loopback cluster by default, a cluster address in the cluster profile."""

from __future__ import annotations

import dagster as dg

from npr_pipelines.compute.ray_local import RayInfo, ensure_ray


class RayResource(dg.ConfigurableResource):
    """``address`` empty = start (or reuse) a local Ray on 127.0.0.1 with token auth on."""

    address: str = ""
    num_cpus: int | None = None

    def training_cpus(self) -> int:
        """CPUs a training task asks for: all of a local machine's (one task trains at a time)."""
        import os

        return self.num_cpus or os.cpu_count() or 1

    def ensure(self) -> RayInfo:
        if self.address:
            return ensure_ray(self.address)
        return ensure_ray(num_cpus=self.num_cpus)
