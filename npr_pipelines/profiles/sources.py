"""Where a real-model run's inputs live: the base model, the training problems, the benchmark files.

Each is a URI (a local path, ``file://`` or ``s3://``), set as Dagster config on ``PipelineSettings``
or, when that is empty, read from its environment variable. A profile that needs one and finds
neither raises `MissingSettingError` naming both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from fsspec.core import split_protocol


@dataclass(frozen=True)
class Source:
    """One input of a real-model run: its environment variable and its ``PipelineSettings`` field."""

    env: str
    field: str
    what: str


BASE_MODEL = Source(
    "NPR_BASE_MODEL_URI",
    "base_model_uri",
    "the base model directory (Hugging Face layout, safetensors weights, tokenizer with a chat template)",
)
TRAIN_PROBLEMS = Source(
    "NPR_TRAIN_PROBLEMS", "train_problems_uri", "the training problems file (JSON, JSONL or parquet)"
)
BENCHMARK_ROOT = Source(
    "NPR_BENCHMARK_DIR", "benchmark_root", "the directory holding the benchmark files (e.g. aime25.json)"
)

#: URI schemes a source may use (``None``: a plain path).
SCHEMES = (None, "file", "local", "s3", "s3a")


class MissingSettingError(ValueError):
    """A profile needs an input that is set neither as Dagster config nor in the environment."""


def check_uri(uri: str, source: Source) -> str:
    """``uri`` if it is a local path, ``file://`` or ``s3://`` URI; ``ValueError`` naming it otherwise."""
    protocol, rest = split_protocol(uri)
    if protocol not in SCHEMES:
        raise ValueError(
            f"{source.env}={uri!r}: unsupported scheme {protocol!r}; use a local path, file:// or s3:// "
            f"for {source.what}"
        )
    if protocol in ("s3", "s3a") and not rest.strip("/"):
        raise ValueError(f"{source.env}={uri!r}: names no bucket")
    return uri


def resolve(source: Source, configured: str = "", environ: Mapping[str, str] | None = None) -> str:
    """The URI of ``source``: ``configured`` (Dagster config), else ``$<source.env>``; checked."""
    env = os.environ if environ is None else environ
    uri = (configured or env.get(source.env, "")).strip()
    if not uri:
        raise MissingSettingError(
            f"{source.env} is not set: the real-model profile needs {source.what}. Set {source.env} "
            f"to a local path or an s3:// URI (or PipelineSettings.{source.field} in the Dagster run config)."
        )
    return check_uri(uri, source)
