"""Content-addressed cache directories, written atomically.

A cached artifact lives in ``<root>/<kind>/<hash>`` where the hash is taken over a JSON rendering of its
config (plus a code version). It is built in a temporary sibling directory and renamed into place, so a
reader never sees a half-written directory; a crash leaves only a ``.tmp-*`` directory behind. Builders
of the same entry take turns on a lock file beside it, so concurrent processes (two Dagster runs, two test
workers) train it once: the others wait and get the cache hit.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Default cache root; ``NPR_CACHE_DIR`` overrides it.
DEFAULT_CACHE_ROOT = Path(".npr/cache")


def cache_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("NPR_CACHE_DIR", DEFAULT_CACHE_ROOT))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(config: Any, version: str, exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of a (dataclass) config and a code version; ``exclude`` drops top-level fields."""
    data = _jsonable(config)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in exclude}
    blob = json.dumps({"version": version, "config": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_cached(final: Path, marker: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return ``(final, hit)``: ``final`` if it holds ``marker``, else ``build(tmp)`` then rename tmp -> final.

    The build holds an exclusive ``flock`` on ``.<name>.lock`` beside ``final`` (released by the kernel if
    the builder dies); a process that finds the lock taken waits, then re-checks for the finished entry."""
    if (final / marker).is_file():
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if (final / marker).is_file():  # built by whoever held the lock before us
            return final, True
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build(tmp)
            if not (tmp / marker).is_file():
                raise RuntimeError(f"cache builder did not write {marker!r}")
            if final.exists() and not (final / marker).is_file():
                shutil.rmtree(final)  # an incomplete directory from elsewhere: replace it
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / marker).is_file():  # lost a race to a complete copy is fine; else re-raise
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def to_json(value: Any) -> Any:
    """Public alias of the JSON conversion used for hashing (dataclasses, tuples, paths)."""
    return _jsonable(value)
