"""Reports: the paper's Tables 1-3 from ``benchmark_scores`` outputs, the plot, and the summary entry."""

from __future__ import annotations

import pytest

from npr_pipelines.eval.report import (
    figure_png,
    headline_metrics,
    latest_scores,
    markdown_table,
    report_figure,
    report_markdown,
)


def _mode(acc: float, valid: float, trig: float, tps: float, lat: float) -> dict:
    return {"accuracy": acc, "format_valid_rate": valid, "format_score_mean": -0.5, "trigger_rate": trig,
            "pass_at_1": acc, "tokens_per_s": tps, "latencies_s": [lat], "latency_median_s": lat}  # fmt: skip


def score(ckpt: str, stage: str, step: int, bench: str, acc: float, seq_acc: float | None = None) -> dict:
    modes = {"sequential": _mode(seq_acc if seq_acc is not None else acc, 0.5, 0.0, 100.0, 2.0)}
    primary = "sequential"
    out = {"throughput_speedup": None, "latency_speedup": None}
    if seq_acc is not None:
        modes = {"parallel": _mode(acc, 0.9, 1.0, 250.0, 1.0), **modes}
        primary = "parallel"
        out = {"throughput_speedup": 2.5, "latency_speedup": 2.0}
    return {"checkpoint": ckpt, "stage": stage, "step": step, "benchmark": bench, "mode": primary,
            "modes": modes, "eval": {"n_samples": 8, "temperature": 1.0, "top_p": 0.7, "latency_problems": 16},
            **modes[primary], **out}  # fmt: skip


SCORES = [
    score("npr-000040", "npr", 40, "toy_test", 0.50, seq_acc=0.49),
    score("base", "base", 0, "toy_test", 0.30),
    score("base", "base", 0, "aime25", 0.10),
    score("npr-000020", "npr", 20, "toy_test", 0.40, seq_acc=0.41),
    score("npr_zero-000060", "npr_zero", 60, "toy_test", 0.35),
]


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the table under ``## heading``."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_accuracy_table_has_benchmarks_as_columns_and_checkpoints_in_pipeline_order() -> None:
    md = report_markdown(SCORES, highlight="npr-000040")
    rows = _table(md, "Accuracy")
    assert rows[0] == ["checkpoint", "aime25", "toy_test", "AVG"]  # registry order: the paper's first
    labels = [r[0] for r in rows[2:]]
    assert labels == ["base (sequential)", "npr_zero-000060 (sequential)", "npr-000020 (parallel)",
                      "npr-000020 (sequential)", "**npr-000040** (parallel)", "**npr-000040** (sequential)"]  # fmt: skip
    assert rows[2] == ["base (sequential)", "10.0", "30.0", "20.0"]  # AVG over the benchmarks shown
    assert rows[6] == ["**npr-000040** (parallel)", "–", "50.0", "50.0"]
    assert rows[7][2] == "49.0"  # sequential-mode accuracy of the same weights, next to it
    assert "Sampling: n_samples 8, temperature 1.0, top_p 0.7, latency over the first 16 problems." in md


def test_trigger_throughput_and_latency_tables() -> None:
    md = report_markdown(SCORES)
    trig = _table(md, "Parallel reasoning trigger rate")
    assert [r[0] for r in trig[2:]] == ["npr-000020 (parallel)", "npr-000040 (parallel)"]  # parallel only
    assert trig[0] == ["checkpoint", "toy_test", "AVG"] and trig[2][1:] == ["100.0", "100.0"]
    tput = _table(md, "Throughput")
    assert tput[0] == ["checkpoint", "toy_test"]  # only two-mode checkpoints, so only their benchmarks
    assert tput[2:4] == [
        ["npr-000020 (sequential)", "100.0 (1.0×)"],
        ["npr-000020 (parallel)", "250.0 (2.50×)"],
    ]
    lat = _table(md, "Latency")
    assert lat[5] == ["npr-000040 (parallel)", "1.000 s (2.00×)"]


def test_rows_by_stage_take_each_stages_latest_checkpoint() -> None:
    picked = latest_scores(SCORES, by="stage")
    assert picked[("npr", "toy_test")]["checkpoint"] == "npr-000040"
    rows = _table(report_markdown(SCORES, by="stage"), "Accuracy")
    assert rows[0][0] == "stage"
    assert [r[0] for r in rows[2:]] == ["base (sequential)", "npr_zero (sequential)", "npr (parallel)",
                                        "npr (sequential)"]  # fmt: skip


def test_sequential_only_report_leaves_out_parallel_sections() -> None:
    md = report_markdown([s for s in SCORES if s["stage"] != "npr"])
    assert "## Accuracy" in md and "## Format validity" in md
    assert "trigger rate" not in md and "## Throughput" not in md and "## Latency" not in md
    assert "No benchmark scores yet" in report_markdown([])
    assert markdown_table(["a", "b"], [["x", "1"]]) == "| a | b |\n|:---|---:|\n| x | 1 |"


def test_headline_metrics() -> None:
    two = headline_metrics(SCORES[0])
    assert two == pytest.approx({"accuracy": 0.5, "format_valid_rate": 0.9, "format_score_mean": -0.5,
                                 "pass_at_1": 0.5, "trigger_rate": 1.0, "sequential_mode_accuracy": 0.49,
                                 "sequential_mode_format_valid_rate": 0.5, "throughput_speedup": 2.5,
                                 "latency_speedup": 2.0})  # fmt: skip
    one = headline_metrics(SCORES[1])
    assert set(one) == {"accuracy", "format_valid_rate", "format_score_mean", "pass_at_1"}


def test_plot_across_checkpoints_is_a_png() -> None:
    fig = report_figure(SCORES)
    top, bottom = fig.axes
    assert [t.get_text() for t in bottom.get_xticklabels()] == [
        "base",
        "npr_zero-000060",
        "npr-000020",
        "npr-000040",
    ]
    acc = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    assert acc["toy_test"] == pytest.approx([30.0, 35.0, 40.0, 50.0]) and acc["aime25"] == pytest.approx(
        [10.0]
    )
    speed = {
        line.get_label(): list(line.get_ydata()) for line in bottom.get_lines() if line.get_label()[0] != "_"
    }
    assert speed == {"toy_test throughput": [2.5, 2.5], "toy_test latency": [2.0, 2.0]}
    assert figure_png(fig).startswith(b"\x89PNG")
    assert report_figure([]) is None


def test_stage_summary_fills_speedups_and_sequential_mode_scores() -> None:
    from assets.jobs import SUMMARY_FIELDS, stage_summary

    entry = stage_summary(SCORES[0])
    assert tuple(entry) == SUMMARY_FIELDS
    assert entry["throughput_speedup"] == 2.5 and entry["latency_speedup"] == 2.0
    assert entry["sequential_mode_accuracy"] == 0.49 and entry["trigger_rate"] == 1.0
    base = stage_summary(SCORES[1])
    assert base["throughput_speedup"] is None and base["sequential_mode_accuracy"] is None
    assert base["trigger_rate"] is None
