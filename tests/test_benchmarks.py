"""The benchmark registry reads the real benchmark files and grades their references correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from npr_pipelines.eval import grade
from npr_pipelines.eval.benchmarks import (
    REGISTRY,
    BenchmarkSpec,
    get_benchmark,
    load_benchmark,
    register_benchmark,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
FILES = ["aime25", "amc23", "hmmt_feb_2025", "math500"]


@pytest.fixture(scope="module")
def root() -> str:
    if not SHARED.is_dir():
        pytest.skip(f"the shared benchmark files are not at {SHARED} (CI lays shared/ beside the clone)")
    return str(SHARED)


@pytest.mark.parametrize("name", FILES)
def test_registry_loads_each_file_and_every_reference_grades_correct(root: str, name: str) -> None:
    spec = get_benchmark(name)
    problems = load_benchmark(name, root)
    assert len(problems) == spec.expected_size
    assert len({p.id for p in problems}) == len(problems)
    prompt = "<|im_start|>user\nQ\n\nPut the final result in \\boxed{...}<|im_end|>\n<|im_start|>assistant\n"
    graded = [
        grade(f"{prompt}We find it. \\boxed{{{p.answer}}}", p.answer, answer_type=spec.answer_type)
        for p in problems
    ]
    assert sum(g.correct for g in graded) == len(problems)


def test_registry_rules() -> None:
    assert sum(s.in_paper_table for s in REGISTRY.values()) == 8
    with pytest.raises(KeyError, match="registered"):
        get_benchmark("nope")
    with pytest.raises(ValueError, match="answer_type"):
        BenchmarkSpec("x", "X", "essay", "x.json")
    with pytest.raises(ValueError, match="lower case"):
        BenchmarkSpec("A|B", "X", "math", "x.json")
    with pytest.raises(ValueError, match="differently"):
        register_benchmark(BenchmarkSpec("aime25", "other", "letter", "a.json"))


def test_benchmarks_asset_includes_files_found_under_the_root(root: str, tmp_path, monkeypatch) -> None:
    import dagster as dg

    from assets.data import benchmarks
    from resources import PipelineSettings

    monkeypatch.setenv("NPR_HOME", str(tmp_path))
    out = benchmarks(dg.build_asset_context(), PipelineSettings(profile="small", benchmark_root=root))
    counts = out.value.benchmark.value_counts().to_dict()
    assert counts["aime25"] == 30 and counts["math500"] == 500 and counts["toy_test"] > 0
    assert set(out.metadata["not_found"].value) >= {"aime24", "gpqa_diamond"}
