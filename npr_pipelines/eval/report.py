"""Reports people read: the paper's Tables 1-3 over checkpoints, and a plot across checkpoints.

Input: ``benchmark_scores`` outputs (one dict per (checkpoint, benchmark): ``checkpoint``, ``stage``,
``step``, ``benchmark``, ``mode`` (primary), ``modes`` {mode: summary}, ``throughput_speedup``,
``latency_speedup``, ``eval``). Benchmarks are columns (registry order, the paper's first), checkpoints
or stages are rows (pipeline order, then step); a checkpoint evaluated in two modes has one row per mode,
primary first, so parallel-mode accuracy sits next to sequential-mode accuracy of the same weights.
Pure: strings and a matplotlib figure, no I/O.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from npr_pipelines.eval.benchmarks import REGISTRY

Score = Mapping[str, Any]

#: The pipeline's stages in the order the graph trains them (ablations last).
STAGE_ORDER = ("base", "npr_zero", "npr_beta", "npr", "sr_beta", "sr")
MISSING = "–"


def score_order(score: Score) -> tuple[int, int, str]:
    """Sort key of a score's checkpoint: stage in pipeline order, then step, then the key."""
    stage = score.get("stage", "")
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    return rank, int(score.get("step") or 0), str(score.get("checkpoint", ""))


def latest_scores(scores: Sequence[Score], by: str = "checkpoint") -> dict[tuple[str, str], Score]:
    """(row label, benchmark) -> score, rows labelled by ``score[by]`` ("checkpoint" or "stage"); where
    several checkpoints share a label (``by="stage"``) the latest step wins."""
    out: dict[tuple[str, str], Score] = {}
    for s in sorted(scores, key=score_order):
        out[(str(s[by]), s["benchmark"])] = s
    return out


def benchmark_columns(scores: Sequence[Score]) -> list[str]:
    """The benchmarks present, registered ones in registry order, then any others by name."""
    present = {s["benchmark"] for s in scores}
    return [b for b in REGISTRY if b in present] + sorted(present - set(REGISTRY))


def row_labels(scores: Sequence[Score], by: str = "checkpoint") -> list[str]:
    """Row labels in pipeline order (first appearance in ``score_order``)."""
    seen: dict[str, None] = {}
    for s in sorted(scores, key=score_order):
        seen.setdefault(str(s[by]), None)
    return list(seen)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def percent(x: float | None) -> str:
    """A fraction as a percentage with one decimal (the paper's tables); "–" for None."""
    return MISSING if x is None else f"{100 * x:.1f}"


def _mode_value(metric: str) -> Callable[[Score, str], float | None]:
    def get(score: Score, mode: str) -> float | None:
        value = score.get("modes", {}).get(mode, {}).get(metric)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    return get


def _modes_of(cell_scores: Sequence[Score], only: Sequence[str] | None) -> list[str]:
    """A row's modes: the primary one first, then the others seen; or those of ``only`` seen, in its order."""
    modes: dict[str, None] = {}
    for s in cell_scores:
        modes.setdefault(s["mode"], None)
    for s in cell_scores:
        for m in s.get("modes", {}):
            modes.setdefault(m, None)
    return list(modes) if only is None else [m for m in only if m in modes]


def _grid(
    scores: Sequence[Score], get: Callable[[Score, str], Any], *, by: str, modes: Sequence[str] | None,
    highlight: str | None,
) -> tuple[list[str], list[tuple[str, list[Any]]]]:  # fmt: skip
    """Benchmark columns and "label (mode)" rows of ``get(score, mode)`` values; rows and columns
    without any value (None) are left out."""
    cells = latest_scores(scores, by)
    columns = benchmark_columns(scores)
    rows: list[tuple[str, list[Any]]] = []
    for label in row_labels(scores, by):
        mine = [cells[(label, b)] for b in columns if (label, b) in cells]
        for mode in _modes_of(mine, modes):
            values = [get(cells[(label, b)], mode) if (label, b) in cells else None for b in columns]
            if any(v is not None for v in values):
                rows.append((f"{f'**{label}**' if label == highlight else label} ({mode})", values))
    keep = [j for j in range(len(columns)) if any(values[j] is not None for _, values in rows)]
    return [columns[j] for j in keep], [(name, [values[j] for j in keep]) for name, values in rows]


def metric_table(
    scores: Sequence[Score],
    value: Callable[[Score, str], float | None],
    *,
    by: str = "checkpoint",
    modes: Sequence[str] | None = None,
    fmt: Callable[[float | None], str] = percent,
    average: bool = True,
    highlight: str | None = None,
) -> str | None:
    """One table of a numeric metric: a row per (label, mode), a column per benchmark, and an AVG column
    (the mean of the row's values shown). None when no cell has a value."""
    columns, grid = _grid(scores, value, by=by, modes=modes, highlight=highlight)
    if not grid:
        return None
    rows = []
    for name, values in grid:
        present = [v for v in values if v is not None]
        avg = [fmt(math.fsum(present) / len(present))] if average else []
        rows.append([name, *(fmt(v) for v in values), *avg])
    return markdown_table([by, *columns, *(["AVG"] if average else [])], rows)


def _speedup_cell(metric: str, speedup_key: str, unit: str) -> Callable[[Score, str], str | None]:
    """A Table 3 cell: ``metric`` in ``mode`` and, in brackets, the checkpoint's ``speedup_key`` over its
    own sequential mode (1.0x for the sequential row itself)."""
    value_of = _mode_value(metric)

    def cell(score: Score, mode: str) -> str | None:
        value = value_of(score, mode)
        if value is None:
            return None
        text = unit.format(value)
        if mode == "sequential":
            return f"{text} (1.0×)"
        speedup = score.get(speedup_key)
        return f"{text} ({speedup:.2f}×)" if speedup is not None else text

    return cell


#: tokens/s with all prompts in flight; median seconds per request at concurrency 1.
_throughput_cell = _speedup_cell("tokens_per_s", "throughput_speedup", "{:.1f}")
_latency_cell = _speedup_cell("latency_median_s", "latency_speedup", "{:.3f} s")


def text_table(
    scores: Sequence[Score],
    cell: Callable[[Score, str], str | None],
    *,
    by: str = "checkpoint",
    highlight: str | None = None,
) -> str | None:
    """A table of preformatted cells, sequential row then parallel row, for the checkpoints evaluated in
    both modes only (the speedups compare a checkpoint with its own sequential mode)."""
    both = [s for s in scores if {"parallel", "sequential"} <= set(s.get("modes", {}))]
    columns, grid = _grid(both, cell, by=by, modes=("sequential", "parallel"), highlight=highlight)
    rows = [[name, *(t or MISSING for t in texts)] for name, texts in grid]
    return markdown_table([by, *columns], rows) if rows else None


def eval_settings(scores: Sequence[Score]) -> str:
    """One line on how the numbers were sampled (from the first score's ``eval``)."""
    ev = next((s.get("eval") for s in scores if s.get("eval")), None) or {}
    parts = [f"{k} {ev[k]}" for k in ("n_samples", "temperature", "top_p", "max_new_tokens") if k in ev]
    if "latency_problems" in ev:
        parts.append(f"latency over the first {ev['latency_problems']} problems")
    return ", ".join(parts)


def report_markdown(
    scores: Sequence[Score],
    *,
    by: str = "checkpoint",
    title: str = "Evaluation",
    highlight: str | None = None,
) -> str:
    """The report: accuracy (Table 1, avg@n), trigger rate (Table 2), format validity, throughput with
    speedup (Table 3) and latency with speedup; sections without values are left out."""
    if not scores:
        return f"# {title}\n\nNo benchmark scores yet.\n"
    acc = _mode_value("accuracy")
    sections = [
        ("Accuracy (avg@n, %)", metric_table(scores, acc, by=by, highlight=highlight)),
        ("Parallel reasoning trigger rate (%)",
         metric_table(scores, _mode_value("trigger_rate"), by=by, modes=("parallel",), highlight=highlight)),
        ("Format validity (strict, %)",
         metric_table(scores, _mode_value("format_valid_rate"), by=by, highlight=highlight)),
        ("Throughput (tokens/s, all branches, all prompts in flight; speedup over the same checkpoint's "
         "sequential mode)", text_table(scores, _throughput_cell, by=by, highlight=highlight)),
        ("Latency (median seconds per request at concurrency 1; speedup = sequential / parallel)",
         text_table(scores, _latency_cell, by=by, highlight=highlight)),
    ]  # fmt: skip
    out = [f"# {title}", "", f"Sampling: {eval_settings(scores)}.", ""]
    for heading, table in sections:
        if table is not None:
            out += [f"## {heading}", "", table, ""]
    return "\n".join(out)


def headline_metrics(score: Score) -> dict[str, float]:
    """The numbers of one (checkpoint, benchmark) worth a metric on the checkpoint's run and model:
    primary-mode accuracy, validity, V2 score, pass@k and inter-run std; the trigger rate in parallel
    mode; sequential-mode accuracy and validity and both speedups for two-mode checkpoints."""
    modes = score.get("modes", {})
    primary = modes.get(score["mode"], {})
    keys = ["accuracy", "format_valid_rate", "format_score_mean", "inter_run_std"]
    keys += sorted(k for k in primary if k.startswith("pass_at_"))
    if score["mode"] == "parallel":
        keys.append("trigger_rate")
    out = {k: primary.get(k) for k in keys}
    if score["mode"] != "sequential" and "sequential" in modes:
        out["sequential_mode_accuracy"] = modes["sequential"].get("accuracy")
        out["sequential_mode_format_valid_rate"] = modes["sequential"].get("format_valid_rate")
    out["throughput_speedup"] = score.get("throughput_speedup")
    out["latency_speedup"] = score.get("latency_speedup")
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def report_figure(scores: Sequence[Score]):
    """A two-panel matplotlib figure across checkpoints (x, pipeline order): primary-mode accuracy per
    benchmark (top) and throughput / latency speedups per benchmark (bottom, 1.0 = sequential mode).
    None when there are no scores. The caller closes it."""
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = latest_scores(scores, "checkpoint")
    labels = row_labels(scores, "checkpoint")
    x = list(range(len(labels)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(labels) + 2), 6), sharex=True)
    for bench in benchmark_columns(scores):
        got = [(i, cells[(c, bench)]) for i, c in enumerate(labels) if (c, bench) in cells]
        top.plot(
            [i for i, _ in got], [100 * s["modes"][s["mode"]]["accuracy"] for _, s in got], "o-", label=bench
        )
        for key, style in (("throughput_speedup", "s-"), ("latency_speedup", "^--")):
            pts = [(i, s[key]) for i, s in got if s.get(key) is not None]
            if pts:
                bottom.plot(*zip(*pts, strict=True), style, label=f"{bench} {key.split('_')[0]}")
    top.set_ylabel("accuracy (%)")
    top.set_title("accuracy (primary mode) and speedups across checkpoints")
    top.legend(fontsize="small")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("speedup (×)")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize="small")
    bottom.set_xticks(x, labels, rotation=30, ha="right")
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
