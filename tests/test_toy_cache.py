"""The content-addressed cache: atomic entries, built once by concurrent builders."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from npr_pipelines.toy.cache import build_cached

MARKER = "done.json"


def entries(root: Path) -> list[str]:
    """What a reader sees in the cache directory (lock files are not entries)."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_concurrent_builders_build_once_and_both_get_the_entry(tmp_path: Path) -> None:
    final = tmp_path / "kind" / "abc123"
    started, builds, results = threading.Event(), [], {}

    def slow_build(tmp: Path) -> None:
        builds.append(tmp)
        started.set()
        time.sleep(0.5)  # the second builder arrives while this one is still training
        (tmp / MARKER).write_text("{}")

    def first() -> None:
        results["first"] = build_cached(final, MARKER, slow_build)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(10)
    results["second"] = build_cached(final, MARKER, slow_build)  # waits on the lock, then hits
    thread.join(10)
    assert len(builds) == 1
    assert results == {"first": (final, False), "second": (final, True)}
    assert entries(final.parent) == ["abc123"]  # no temporary directory left


def test_a_failed_build_leaves_nothing_and_the_next_builder_retries(tmp_path: Path) -> None:
    final = tmp_path / "kind" / "abc123"

    def crash(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        build_cached(final, MARKER, crash)
    assert entries(final.parent) == []
    path, hit = build_cached(final, MARKER, lambda tmp: (tmp / MARKER).write_text("{}"))
    assert (path, hit) == (final, False) and (final / MARKER).is_file()
