"""Data schemas and loaders from any fsspec URI."""

from npr_pipelines.data.problems import (
    FORMATS,
    Problem,
    ProblemDataError,
    RowError,
    infer_format,
    load_problems,
    save_problems,
)

__all__ = [
    "FORMATS",
    "Problem",
    "ProblemDataError",
    "RowError",
    "infer_format",
    "load_problems",
    "save_problems",
]
