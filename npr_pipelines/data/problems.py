"""Problem sets (training problems and benchmarks) from any fsspec URI: a local path, ``file://``,
``s3://``, ``memory://``.

Formats, chosen by extension unless ``format=`` says otherwise: ``.json`` (one list of objects),
``.jsonl`` (one object per line; blank lines skipped), ``.parquet``. ``.gz``/``.bz2``/... compressed
JSON and JSONL are decompressed by extension.

Field mapping, per row (other fields are ignored):

- ``question``: the ``question`` field, else ``problem``; must be a non-empty string.
- ``id``: the first present, non-null of ``id``, ``problem_idx``, ``unique_id``; else the row index.
  Integers (and integer-valued floats) become their decimal string. Ids must be unique.
- ``answer``: the ``answer`` field; a string (stripped, non-empty) or a number: ``27.0`` -> "27",
  ``1.5`` -> "1.5", ``7`` -> "7". Booleans, NaN/inf and other types are rejected.
- ``source``: the ``source`` argument, else the row's ``source`` string field, else the file's stem
  (``.../aime25.json`` -> "aime25").

Limits (hostile or broken files fail loudly instead of filling memory and prompts): a question holds at
most ``MAX_QUESTION_CHARS`` characters, an answer ``MAX_ANSWER_CHARS``, an id ``MAX_ID_CHARS``; a JSON
object may not repeat a key (``{"answer": "1", "answer": "2"}`` would silently keep the last one).

Rows are numbered from 0 in file order (for JSONL: among the non-blank lines; the message also gives
the line number). Every bad row is collected and reported together in one ``ProblemDataError``;
nothing is returned unless the whole file is valid.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

FORMATS = ("json", "jsonl", "parquet")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_MAX_LISTED_ERRORS = 50
#: Far above any real benchmark (the longest shipped question is under 2,000 characters).
MAX_QUESTION_CHARS = 100_000
MAX_ANSWER_CHARS = 10_000
MAX_ID_CHARS = 512
#: The row fields this loader reads (a repeated key among them is an error; others are ignored).
_READ_FIELDS = frozenset({"question", "problem", "answer", "id", "problem_idx", "unique_id", "source"})


@dataclass(frozen=True)
class Problem:
    """One problem: a stable id, the question text, the reference answer, the set it came from."""

    id: str
    question: str
    answer: str
    source: str


@dataclass(frozen=True)
class RowError:
    """One reason a row was rejected; ``line`` is set for JSONL."""

    row: int
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}, field {self.field!r}: {self.message}"


class ProblemDataError(ValueError):
    """A problem file that cannot be loaded; ``errors`` lists every bad row (empty for file-level
    problems such as unparseable content)."""

    def __init__(self, uri: str, message: str, errors: Iterable[RowError] = ()) -> None:
        self.uri = uri
        self.errors = list(errors)
        lines = [f"{uri}: {message}"]
        lines += [f"  {e}" for e in self.errors[:_MAX_LISTED_ERRORS]]
        if len(self.errors) > _MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(self.errors) - _MAX_LISTED_ERRORS} more")
        super().__init__("\n".join(lines))


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _basename(uri: str) -> str:
    return _strip_compression(uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0])


def infer_format(uri: str) -> str:
    """ "json", "jsonl" or "parquet" from the file name; ValueError otherwise."""
    name = _basename(uri).lower()
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{uri}: cannot tell the format from the extension; pass format= one of {FORMATS}")


def _default_source(uri: str) -> str:
    name = _basename(uri)
    return name.rsplit(".", 1)[0] if "." in name else name


def _read_rows(uri: str, fmt: str, storage_options: Mapping[str, Any]) -> list[tuple[Any, int | None]]:
    """(row object, JSONL line number or None) for every row; file-level failures raise."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(uri, "rb", **storage_options) as f:
                return [(r, None) for r in pq.read_table(f).to_pylist()]
        with fsspec.open(uri, "rt", encoding="utf-8", compression="infer", **storage_options) as f:
            text = f.read()
    except FileNotFoundError as e:
        raise ProblemDataError(uri, f"file not found ({e})") from e
    except Exception as e:  # OSError, UnicodeDecodeError, pyarrow's ArrowInvalid, ...
        raise ProblemDataError(uri, f"cannot read as {fmt}: {type(e).__name__}: {e}") from e

    if fmt == "json":
        try:
            data = _json_loads(text)
        except json.JSONDecodeError as e:
            raise ProblemDataError(uri, f"not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ProblemDataError(uri, f"expected a JSON list of objects, got {_kind(data)}")
        return [(r, None) for r in data]

    rows: list[tuple[Any, int | None]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((_json_loads(line), line_no))
        except json.JSONDecodeError as e:
            rows.append((_Unparseable(e.msg), line_no))
    if rows and all(isinstance(r, _Unparseable) for r, _ in rows):
        bad = [RowError(i, "<line>", f"not valid JSON: {r.reason}", ln) for i, (r, ln) in enumerate(rows)]
        raise ProblemDataError(uri, "no line is valid JSON; is this a JSONL file?", bad)
    return rows


@dataclass(frozen=True)
class _Unparseable:
    reason: str


class _JsonObject(dict):
    """A parsed JSON object that remembers the keys it saw more than once."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _JsonObject(obj)
    marked.duplicates = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return marked


def _json_loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object_pairs)


def _coerce_answer(value: Any) -> tuple[str | None, str | None]:
    """(answer string, None) or (None, reason)."""
    if value is None:
        return None, "missing"
    if isinstance(value, bool):
        return None, f"must be a string or a number, got bool {value!r}"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"not a finite number: {value!r}"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        if len(value) > MAX_ANSWER_CHARS:
            return None, _too_long(value, MAX_ANSWER_CHARS)
        return value.strip(), None
    return None, f"must be a string or a number, got {_kind(value)}"


def _kind(value: Any) -> str:
    """The JSON-ish type name of a value for messages."""
    return "dict" if isinstance(value, dict) else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _too_long(value: str, limit: int) -> str:
    return f"{len(value):,} characters, more than the limit of {limit:,}"


def _coerce_id(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, bool):
        return None, f"must be a string or an integer, got bool {value!r}"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float) and value.is_integer():
        return str(int(value)), None
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        if len(value) > MAX_ID_CHARS:
            return None, _too_long(value, MAX_ID_CHARS)
        return value, None
    return None, f"must be a string or an integer, got {_kind(value)} {_short(value)}"


def load_problems(
    uri: str,
    *,
    source: str | None = None,
    format: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Problem]:
    """Load and validate a problem file (see the module docstring for formats and field mapping).

    Raises ``ProblemDataError`` naming the file and every bad row at once.
    """
    fmt = format or infer_format(uri)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    rows = _read_rows(uri, fmt, dict(storage_options or {}))

    problems: list[Problem] = []
    errors: list[RowError] = []
    first_row_of_id: dict[str, int] = {}
    file_source = _default_source(uri)
    for idx, (row, line) in enumerate(rows):
        if isinstance(row, _Unparseable):
            errors.append(RowError(idx, "<line>", f"not valid JSON: {row.reason}", line))
            continue
        if not isinstance(row, dict):
            errors.append(RowError(idx, "<row>", f"expected an object, got {_kind(row)}", line))
            continue

        row_errors = [
            RowError(idx, key, "appears more than once in the object (which value is meant?)", line)
            for key in getattr(row, "duplicates", ())
            if key in _READ_FIELDS
        ]
        q_field = "question" if "question" in row else "problem"
        question = row.get(q_field)
        if question is None:
            row_errors.append(RowError(idx, "question", "missing (expected 'question' or 'problem')", line))
        elif not isinstance(question, str):
            row_errors.append(RowError(idx, q_field, f"must be a string, got {_kind(question)}", line))
        elif not question.strip():
            row_errors.append(RowError(idx, q_field, "empty", line))
        elif len(question) > MAX_QUESTION_CHARS:
            row_errors.append(RowError(idx, q_field, _too_long(question, MAX_QUESTION_CHARS), line))

        answer, why = _coerce_answer(row.get("answer"))
        if why:
            row_errors.append(RowError(idx, "answer", why, line))

        id_field = next((k for k in ("id", "problem_idx", "unique_id") if row.get(k) is not None), None)
        pid, why = _coerce_id(row[id_field]) if id_field else (str(idx), None)
        if why:
            row_errors.append(RowError(idx, id_field or "id", why, line))
        elif pid in first_row_of_id:
            row_errors.append(
                RowError(
                    idx, id_field or "id", f"duplicate id {pid!r} (first at row {first_row_of_id[pid]})", line
                )
            )
        else:
            first_row_of_id[pid] = idx

        row_source = row.get("source")
        src = source or (row_source if isinstance(row_source, str) and row_source else file_source)
        if row_errors:
            errors.extend(row_errors)
        else:
            problems.append(Problem(id=pid, question=question, answer=answer, source=src))  # type: ignore[arg-type]

    if errors:
        n_rows = len({e.row for e in errors})
        raise ProblemDataError(uri, f"{n_rows} of {len(rows)} rows are invalid", errors)
    return problems


def save_problems(
    problems: Iterable[Problem], uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write problems as JSONL (fields id, question, answer, source). Local files are written to a
    temporary name in the same directory and renamed, so readers never see a partial file."""
    if infer_format(uri) != "jsonl":
        raise ValueError(f"{uri}: save_problems writes JSONL; use a .jsonl name")
    payload = "".join(
        json.dumps(
            {"id": p.id, "question": p.question, "answer": p.answer, "source": p.source}, ensure_ascii=False
        )
        + "\n"
        for p in problems
    )
    options = dict(storage_options or {})
    compression = infer_compression(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        os.close(fd)
        try:
            with fsspec.open(tmp, "wt", encoding="utf-8", compression=compression) as f:
                f.write(payload)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    with fsspec.open(uri, "wt", encoding="utf-8", compression=compression, **options) as f:
        f.write(payload)
