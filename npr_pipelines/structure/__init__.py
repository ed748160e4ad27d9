"""The single source of truth for a parallel trace: tags, parsers, validator, scores, renderer,
the parallel layout (positions + visibility) shared by trainer and engine, and trace metrics."""

from npr_pipelines.structure.layout import (
    DENSE_MASK_MAX_TOKENS,
    LayoutError,
    ParallelLayout,
    Segment,
    branch_start_position,
    join_position,
    parallel_layout,
    sequential_layout,
)
from npr_pipelines.structure.metrics import TraceMetrics, trace_metrics
from npr_pipelines.structure.parser import (
    BlockSpans,
    ItemSpan,
    Lexeme,
    Span,
    SpanTable,
    Violation,
    lex_text,
    lex_tokens,
    parse_text,
    parse_tokens,
    split_number,
)
from npr_pipelines.structure.scores import format_score_v1, format_score_v2
from npr_pipelines.structure.tags import TAGS, Tag, TagVocab
from npr_pipelines.structure.trace import Block, Item, Trace, encode_trace, render, step_header_ids
from npr_pipelines.structure.validate import RULES, Verdict, last_boxed, validate

__all__ = [
    "DENSE_MASK_MAX_TOKENS",
    "RULES",
    "TAGS",
    "Block",
    "BlockSpans",
    "Item",
    "ItemSpan",
    "LayoutError",
    "Lexeme",
    "ParallelLayout",
    "Segment",
    "Span",
    "SpanTable",
    "Tag",
    "TagVocab",
    "Trace",
    "TraceMetrics",
    "Verdict",
    "Violation",
    "branch_start_position",
    "encode_trace",
    "format_score_v1",
    "format_score_v2",
    "join_position",
    "last_boxed",
    "lex_text",
    "lex_tokens",
    "parallel_layout",
    "parse_text",
    "parse_tokens",
    "render",
    "sequential_layout",
    "split_number",
    "step_header_ids",
    "trace_metrics",
    "validate",
]
