"""Problem loading: the shared benchmark files, JSONL/parquet round trips, and bad-row reports."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from npr_pipelines.data import Problem, ProblemDataError, infer_format, load_problems, save_problems

BENCH_DIR = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"


def bench(name: str) -> Path:
    path = BENCH_DIR / name
    if not path.exists():
        pytest.skip(
            f"benchmark file {path} not found: these tests need ../shared/data/benchmarks beside the repo"
        )
    return path


def test_aime25_loads_with_row_index_ids():
    problems = load_problems(str(bench("aime25.json")))
    assert len(problems) == 30
    assert [p.id for p in problems] == [str(i) for i in range(30)]
    assert problems[0].answer == "70" and problems[0].source == "aime25"
    assert problems[0].question.startswith("Find the sum of all integer bases")


def test_amc23_float_answers_become_integers():
    problems = load_problems(str(bench("amc23.json")))
    assert len(problems) == 40
    assert problems[0].answer == "27" and problems[0].id == "0"
    assert all("." not in p.answer for p in problems)
    assert "-1" in {p.answer for p in problems}


def test_hmmt_uses_problem_and_problem_idx():
    problems = load_problems(str(bench("hmmt_feb_2025.json")), source="hmmt25")
    assert len(problems) == 30
    assert problems[0].id == "1" and problems[0].answer == "103" and problems[0].source == "hmmt25"
    assert problems[0].question.startswith("Compute the sum of the positive divisors")


def test_math500_uses_unique_id():
    problems = load_problems("file://" + str(bench("math500.json")))
    assert len(problems) == 500
    assert problems[0].id == "test/precalculus/807.json"
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert len({p.id for p in problems}) == 500


SAMPLE = [
    Problem("a", "What is 1+1?", "2", "toy"),
    Problem("b", "Spell π — then give 1.5.", "1.5", "toy"),
    Problem("c", "Vector?", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "toy"),
]


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "nested" / "probs.jsonl"
    save_problems(SAMPLE, str(path))
    assert load_problems(str(path)) == SAMPLE
    assert not [p for p in path.parent.iterdir() if p.name != "probs.jsonl"]  # no temp files left
    assert load_problems(str(path), source="other")[0].source == "other"


def test_jsonl_round_trip_compressed_and_memory_fs(tmp_path):
    gz = tmp_path / "probs.jsonl.gz"
    save_problems(SAMPLE, str(gz))
    assert load_problems(str(gz)) == SAMPLE
    save_problems(SAMPLE, "memory://npr-tests/probs.jsonl")
    assert load_problems("memory://npr-tests/probs.jsonl") == SAMPLE


def test_save_refuses_non_jsonl_names(tmp_path):
    with pytest.raises(ValueError, match="JSONL"):
        save_problems(SAMPLE, str(tmp_path / "probs.json"))


def test_parquet_round_trip(tmp_path):
    rows = {
        "unique_id": [p.id for p in SAMPLE],
        "problem": [p.question for p in SAMPLE],
        "answer": [p.answer for p in SAMPLE],
    }
    path = tmp_path / "toy.parquet"
    pq.write_table(pa.table(rows), path)
    assert load_problems(str(path)) == SAMPLE


def test_parquet_numeric_answers(tmp_path):
    path = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": [27.0, 1.5]}), path)
    assert [p.answer for p in load_problems(str(path))] == ["27", "1.5"]
    pq.write_table(pa.table({"question": ["q1"], "answer": [7]}), path)
    assert load_problems(str(path))[0].answer == "7"


def test_format_override_and_inference(tmp_path):
    path = tmp_path / "problems.txt"
    path.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="format"):
        load_problems(str(path))
    assert load_problems(str(path), format="jsonl")[0].answer == "1"
    assert infer_format("s3://bucket/x/train.parquet") == "parquet"
    assert infer_format("x.JSONL.gz") == "jsonl"


def write_json(tmp_path: Path, rows, name: str = "bad.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"question": "q"}, "answer", "missing"),
        ({"question": "q", "answer": None}, "answer", "missing"),
        ({"question": "q", "answer": "  "}, "answer", "empty"),
        ({"question": "q", "answer": True}, "answer", "bool"),
        ({"question": "q", "answer": [1, 2]}, "answer", "list"),
        ({"question": 5, "answer": "1"}, "question", "must be a string"),
        ({"problem": ["x"], "answer": "1"}, "problem", "must be a string"),
        ({"question": "   ", "answer": "1"}, "question", "empty"),
        ({"answer": "1"}, "question", "missing"),
        ({"id": 1.5, "question": "q", "answer": "1"}, "id", "must be a string or an integer"),
    ],
)
def test_each_bad_row_kind_is_reported_with_row_number(tmp_path, row, field, reason):
    good = {"question": "fine", "answer": "3"}
    uri = write_json(tmp_path, [good, good, row])
    with pytest.raises(ProblemDataError) as info:
        load_problems(uri)
    err = info.value
    assert isinstance(err, ValueError)
    assert uri in str(err)
    assert [(e.row, e.field) for e in err.errors] == [(2, field)]
    assert reason in err.errors[0].message
    assert f"row 2, field '{field}'" in str(err)


def test_duplicate_ids_reported(tmp_path):
    rows = [{"id": 7, "question": "a", "answer": "1"}, {"id": "7", "question": "b", "answer": "2"}]
    with pytest.raises(ProblemDataError, match=r"row 1, field 'id': duplicate id '7' \(first at row 0\)"):
        load_problems(write_json(tmp_path, rows))


def test_several_bad_rows_reported_together(tmp_path):
    rows = [
        {"question": "ok", "answer": "1"},  # row 0
        {"question": "", "answer": "1"},  # row 1: empty question
        {"question": "ok"},  # row 2: missing answer
        {"question": "ok", "answer": "2"},  # row 3
        {"problem": 3, "answer": ""},  # row 4: non-string question and empty answer
        "not an object",  # row 5
        {"id": "0", "question": "dup of row 0's index id", "answer": "5"},  # row 6
    ]
    with pytest.raises(ProblemDataError) as info:
        load_problems(write_json(tmp_path, rows))
    got = [(e.row, e.field) for e in info.value.errors]
    assert got == [(1, "question"), (2, "answer"), (4, "problem"), (4, "answer"), (5, "<row>"), (6, "id")]
    message = str(info.value)
    assert "5 of 7 rows are invalid" in message
    for row in (1, 2, 4, 5, 6):
        assert f"row {row}," in message


def test_jsonl_bad_lines_report_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{not json}\n{"question": "q2"}\n')
    with pytest.raises(ProblemDataError) as info:
        load_problems(str(path))
    errors = info.value.errors
    assert [(e.row, e.line, e.field) for e in errors] == [(1, 3, "<line>"), (2, 4, "answer")]
    assert "row 1 (line 3)" in str(info.value)


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ('{"question": "q", "answer": "1"}', "obj.json", "expected a JSON list of objects, got dict"),
        ("[{", "broken.json", "not valid JSON"),
        ("hello\nworld\n", "text.jsonl", "no line is valid JSON"),
        ("PAR1 this is not parquet", "fake.parquet", "cannot read as parquet"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProblemDataError, match=match) as info:
        load_problems(str(path))
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProblemDataError, match="not found"):
        load_problems(str(tmp_path / "nope.json"))


def test_nothing_half_loaded_on_error(tmp_path):
    rows = [{"question": "q", "answer": str(i)} for i in range(100)] + [{"question": "q"}]
    with pytest.raises(ProblemDataError, match="1 of 101 rows"):
        load_problems(write_json(tmp_path, rows))


def test_s3_round_trip(s3_bucket, s3_endpoint, tmp_path):
    """JSONL written to and read back from S3 (moto), plus a parquet file uploaded there."""
    import fsspec

    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    uri = f"s3://{s3_bucket}/problems/train.jsonl"
    save_problems(SAMPLE, uri, storage_options=opts)
    assert load_problems(uri, storage_options=opts) == SAMPLE

    local = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": [3.0]}), local)
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(local), f"{s3_bucket}/problems/p.parquet")
    problems = load_problems(f"s3://{s3_bucket}/problems/p.parquet", storage_options=opts)
    assert problems == [Problem("0", "q", "3", "p")]
