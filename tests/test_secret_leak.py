"""No credential is ever written (#11 item 4): the session's small pipeline runs with recognisable fake
secrets in its environment (``pipeline_fixtures.FAKE_SECRETS``: an AWS secret key and an MLflow token,
set before Ray starts), and none of them appears in anything the run wrote: MLflow's database and
artifacts, Dagster's storage (run and event databases, compute logs), the artifact store, Ray's session
logs, or what the run printed.

Uses the session's one pipeline run (``small_pipeline``, about a minute on 2 idle cores)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixtures import FAKE_SECRETS, ray_session_dir

pytestmark = pytest.mark.usefixtures("release_ray")

MAX_FILE_BYTES = 512 * 1024 * 1024


def _gunzip(data: bytes) -> bytes | None:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError):
        return None


def readable_forms(path: Path) -> Iterator[bytes]:
    """The file's bytes, plus decoded forms a raw search would miss (gzip, parquet pages)."""
    data = path.read_bytes()
    yield data
    if path.suffix == ".gz" and (raw := _gunzip(data)) is not None:
        yield raw
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield json.dumps(pq.read_table(path).to_pylist(), default=str).encode()


def files_under(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks are not followed: the shared toy-model cache the run links
    to predates it)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_FILE_BYTES:
                yield path


def leaks(roots: list[Path], secrets: list[str]) -> tuple[list[str], int]:
    """(``file: secret`` for every hit, number of files searched)."""
    needles = [s.encode() for s in secrets]
    hits, searched = [], 0
    for root in roots:
        for path in files_under(root):
            searched += 1
            for form in readable_forms(path):
                hits += [f"{path}: {n.decode()}" for n in needles if n in form]
    return sorted(set(hits)), searched


def test_the_search_finds_a_planted_secret(tmp_path: Path) -> None:
    """The search itself works on the file kinds the run writes (text, sqlite, gzip, parquet)."""
    import sqlite3

    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = "npr-fake-secret-planted"
    (tmp_path / "a.log").write_text(f"token={secret}\n")
    with sqlite3.connect(tmp_path / "b.db") as db:
        db.execute("create table t (v text)")
        db.execute("insert into t values (?)", (json.dumps({"env": secret}),))
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(secret.encode() * 3))
    pq.write_table(pa.table({"v": [secret] * 50}), tmp_path / "d.parquet", compression="zstd")
    hits, searched = leaks([tmp_path], [secret])
    assert searched == 4 and len(hits) == 4, hits


def test_no_fake_secret_is_written_anywhere(small_pipeline) -> None:
    run = small_pipeline
    assert run.secrets == FAKE_SECRETS
    secrets = list(run.secrets.values())

    # What the search covers, and that each place holds what the run wrote (the search is not vacuous).
    mlflow_db, mlartifacts = run.home / "mlflow.db", run.home / "mlartifacts"
    assert mlflow_db.stat().st_size > 0 and any(files_under(mlartifacts))
    assert any(p.suffix == ".db" for p in files_under(run.dagster_home))
    assert any(files_under(run.artifacts))
    assert run.output_log is not None and "phase 2" in run.output_log.read_text()
    roots = [run.home]  # mlflow.db, mlartifacts/, dagster/ (storage, compute logs), artifacts/, work dirs
    if run.ray_session_dir is not None:  # the run started a local Ray (the embedded default does)
        logs = run.ray_session_dir / "logs"
        assert any(files_under(logs)), f"no Ray logs under {logs}"
        roots.append(run.ray_session_dir)

    hits, searched = leaks(roots, secrets)
    print(f"\nsecret search: {searched} files under {[str(r) for r in roots]}")
    assert hits == [], "fake credentials were written:\n" + "\n".join(hits)


def test_ray_workers_ran_with_the_secrets(small_pipeline) -> None:
    """The secrets really were in the stage processes' environment (so the search above means something);
    only checkable while the run's Ray is still attached."""
    import ray

    if small_pipeline.ray_session_dir is None or ray_session_dir() != small_pipeline.ray_session_dir:
        pytest.skip("the run's Ray is no longer attached")

    @ray.remote
    def environment(names: list[str]) -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in names}

    assert ray.get(environment.remote(list(FAKE_SECRETS))) == FAKE_SECRETS
