"""Pipeline-wide settings: the profile, seed and the state directory."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg


class PipelineSettings(dg.ConfigurableResource):
    """``profile`` selects the stage configs (``default`` toy, ``small`` for tests, ``paper`` for
    Qwen3-4B-Instruct with the paper's settings, ``npr_pipelines.profiles``); ``home`` is the state
    directory (``$NPR_HOME`` or ``.npr``); ``benchmark_root`` holds the registered benchmarks' files
    (see ``npr_pipelines.eval.benchmarks``). The real-model profile also reads ``base_model_uri`` and
    ``train_problems_uri``; each empty field falls back to its environment variable
    (``npr_pipelines.profiles.sources``: ``NPR_BASE_MODEL_URI``, ``NPR_TRAIN_PROBLEMS``,
    ``NPR_BENCHMARK_DIR``)."""

    profile: str = "default"
    seed: int = 0
    home: str = ""
    benchmark_root: str = ""  # where registered benchmark files live (local dir or s3://); "" = toy only
    base_model_uri: str = ""  # real-model profiles: the base model directory (local dir or s3://)
    train_problems_uri: str = ""  # real-model profiles: the training problems file (local or s3://)

    def home_dir(self) -> Path:
        path = Path(self.home or os.environ.get("NPR_HOME", ".npr")).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
