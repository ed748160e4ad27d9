"""Pipeline-wide settings: the profile, seed and the state directory."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg


class PipelineSettings(dg.ConfigurableResource):
    """``profile`` selects the stage configs (``default`` toy, ``small`` for tests, ``real`` for a
    real model on a cluster); ``home`` is the state directory (``$NPR_HOME`` or ``.npr``);
    ``benchmark_root`` holds the registered benchmarks' files (see ``npr_pipelines.eval.benchmarks``)."""

    profile: str = "default"
    seed: int = 0
    home: str = ""
    benchmark_root: str = ""  # where registered benchmark files live (local dir or s3://); "" = toy only

    def home_dir(self) -> Path:
        path = Path(self.home or os.environ.get("NPR_HOME", ".npr")).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
