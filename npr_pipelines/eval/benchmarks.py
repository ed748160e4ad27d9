"""The benchmark registry: the paper's eight (Table 1), GPQA-Diamond, and the toy world's held-out split.

Each entry names its answer type (how ``grade`` compares answers) and the file it is read from under a
benchmark root (a local directory or an ``s3://`` prefix; the files are the user's, in the published
shapes: JSON list, JSONL or parquet, see ``npr_pipelines.data.problems``). Adding a benchmark is one
``register_benchmark`` call; its name becomes a static partition of ``benchmark_scores`` to backfill.
"""

from __future__ import annotations

from dataclasses import dataclass

from npr_pipelines.data import Problem, load_problems
from npr_pipelines.eval.grading import ANSWER_TYPES


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # the partition key: lower case, no "|" "," "/" "[" "]"
    title: str
    answer_type: str  # one of grading.ANSWER_TYPES
    file: str | None  # file name under the benchmark root; None for built-in (toy) benchmarks
    expected_size: int | None = None
    in_paper_table: bool = False

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"benchmark {self.name!r}: answer_type must be one of {ANSWER_TYPES}")
        if any(c in self.name for c in "|,/[] ") or self.name != self.name.lower():
            raise ValueError(f"benchmark name {self.name!r} must be lower case without '|,/[] '")


REGISTRY: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    if spec.name in REGISTRY and REGISTRY[spec.name] != spec:
        raise ValueError(f"benchmark {spec.name!r} is already registered differently")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    BenchmarkSpec("aime25", "AIME 2025", "math", "aime25.json", 30, True),
    BenchmarkSpec("aime24", "AIME 2024", "math", "aime24.json", 30, True),
    BenchmarkSpec("hmmt_feb_2025", "HMMT February 2025", "list", "hmmt_feb_2025.json", 30, True),
    BenchmarkSpec("olympiadbench", "OlympiadBench (math, text)", "math", "olympiadbench.jsonl", 675, True),
    BenchmarkSpec("minerva_math", "Minerva Math", "math", "minerva_math.jsonl", 272, True),
    BenchmarkSpec("zebralogic", "ZebraLogic (multiple choice)", "letter", "zebralogic.jsonl", None, True),
    BenchmarkSpec("amc23", "AMC 2023", "math", "amc23.json", 40, True),
    BenchmarkSpec("math500", "MATH-500", "math", "math500.json", 500, True),
    BenchmarkSpec("gpqa_diamond", "GPQA-Diamond", "letter", "gpqa_diamond.jsonl", 198),
    BenchmarkSpec("toy_test", "Toy world, held-out test split", "math", None),
    BenchmarkSpec("toy_dev", "Toy world, held-out dev split", "math", None),
):
    register_benchmark(_spec)


def get_benchmark(name: str) -> BenchmarkSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; registered: {sorted(REGISTRY)}") from None


def benchmark_uri(name: str, root: str) -> str:
    spec = get_benchmark(name)
    if spec.file is None:
        raise ValueError(f"benchmark {name!r} is built in and has no file")
    return f"{root.rstrip('/')}/{spec.file}"


def load_benchmark(name: str, root: str | None = None, uri: str | None = None, **storage) -> list[Problem]:
    """Load a file benchmark from ``uri`` or from its file under ``root``; ids keep the file's ids."""
    spec = get_benchmark(name)
    target = uri or benchmark_uri(name, root or "")
    return load_problems(target, source=spec.name, **storage)
