"""Session fixtures for the toy world, reusable by any test.

To make them available everywhere, ``tests/conftest.py`` can do::

    from toy_fixtures import *  # noqa: F403  (toy_cache_dir, small_toy_base, toy_base_model, ...)

Until then, test modules import the fixtures they use from here. Every definition puts its cache in the
same per-session directory (shared by the session's xdist workers), so two imports of the same fixture
still bootstrap once (the second one is a cache hit). ``NPR_TOY_TEST_CACHE`` points the cache at a
persistent directory instead (reruns then skip the bootstrap: handy locally, but a stale cache hides
changes to the bootstrap code unless ``BOOTSTRAP_VERSION`` is bumped).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from npr_pipelines.toy.bootstrap import bootstrap_base_model
from npr_pipelines.toy.profiles import DEFAULT, SMALL


def session_toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``NPR_TOY_TEST_CACHE``, else the test session's cache directory. Under pytest-xdist the workers'
    temp directories are siblings and the cache lives beside them: an entry two workers need is trained
    once (the cache's lock makes the second wait for the first)."""
    override = os.environ.get("NPR_TOY_TEST_CACHE")
    if override:
        return Path(override)
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy-cache"


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory) -> Path:
    """Cache root for toy artifacts in this test session."""
    path = session_toy_cache(tmp_path_factory)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def small_toy_base(toy_cache_dir) -> Path:
    """A base model bootstrapped with the ``small`` profile (seconds; its numbers mean nothing)."""
    from dataclasses import replace

    return bootstrap_base_model(replace(SMALL.bootstrap, cache_dir=str(toy_cache_dir)))


@pytest.fixture(scope="session")
def toy_base_model(toy_cache_dir) -> Path:
    """The real toy base model (``default`` profile, seed 0): about 3 minutes on 2 cores, once per session."""
    from dataclasses import replace

    return bootstrap_base_model(replace(DEFAULT.bootstrap, cache_dir=str(toy_cache_dir)))
