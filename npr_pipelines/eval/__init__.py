"""Evaluation: answer extraction and equivalence (``grading``) and pass@k-style metrics (``metrics``)."""

from npr_pipelines.eval.grading import (
    ANSWER_TYPES,
    Grade,
    answers_equal,
    extract_answer,
    extract_raw_answer,
    grade,
    normalize_answer,
    response_only,
)
from npr_pipelines.eval.metrics import (
    avg_at_k,
    counts_from_matrix,
    inter_run_std,
    intra_problem_std,
    mean_avg_at_k,
    mean_pass_at_k,
    pass_at_k,
)

__all__ = [
    "ANSWER_TYPES",
    "Grade",
    "answers_equal",
    "avg_at_k",
    "counts_from_matrix",
    "extract_answer",
    "extract_raw_answer",
    "grade",
    "inter_run_std",
    "intra_problem_std",
    "mean_avg_at_k",
    "mean_pass_at_k",
    "normalize_answer",
    "pass_at_k",
    "response_only",
]
