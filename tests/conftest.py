"""Shared fixtures: a local S3 endpoint (moto's in-process server on 127.0.0.1); the session's one run of
the whole pipeline (``small`` profile, ``pipeline_fixtures``)."""

from __future__ import annotations

import functools
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports torch (libgomp reads the policy once, when it loads) or starts Ray (its
# processes inherit the environment). Under `make test` two test processes share 2 cores, and both
# defaults starve whichever one is not computing at the moment:
# - OpenMP threads spin at every barrier, burning the core that a thread of the other process needs
#   (the small pipeline beside the default bootstrap: 387 s and 654 s spinning, 112 s and 368 s passive;
#   alone, passive waiting is slower: `make run` took 1567 s instead of 1320 s, so only tests set it);
# - Ray runs its workers at nice 15, so beside a nice-0 test process they got ~4% of a core (the small
#   pipeline's setup took 946 s instead of ~130 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_worker_niceness", "0")

from pipeline_fixtures import release_ray, small_pipeline  # noqa: F401  (fixtures for every module)

#: Session fixtures that take minutes to build. Under pytest-xdist every worker builds its own, so all
#: the modules that use one form a single work unit (one worker builds it once).
SHARED_SESSION_FIXTURES = ("toy_base_model", "small_pipeline")


@functools.cache
def work_unit(module: str) -> str:
    """The xdist work unit of a test module (a path relative to the root): the first shared session
    fixture its source names, else the module itself (its module-scoped clusters are built once)."""
    source = (Path(__file__).resolve().parent.parent / module).read_text(encoding="utf-8")
    return next((f for f in SHARED_SESSION_FIXTURES if re.search(rf"\b{f}\b", source)), module)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` runs ``-n 2 --dist loadscope --no-loadscope-reorder``: xdist's scope scheduling
    with ``work_unit`` as the scope. (``--dist loadgroup`` cannot be used: xdist 3.8 marks the groups
    in ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(_module(nodeid))

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the longest work units first (the shared-fixture chains, then the modules
    marked slow), so the last unit to start is a short one. The controller takes the units in the
    workers' collection order (``--no-loadscope-reorder``). A plain run keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    slow = {_module(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        module = _module(item.nodeid)
        return 0 if work_unit(module) != module else 1 if module in slow else 2

    items.sort(key=rank)  # stable: collection order within a rank, so every worker agrees


def create_bucket(endpoint_url: str, name: str | None = None) -> str:
    """Create a bucket on the local S3 endpoint and return its name (>= 3 chars, moto requires it)."""
    import boto3

    name = name or f"npr-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server bound to 127.0.0.1 on a free port; fake credentials set for the session."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # Fake credentials so nothing can reach a real AWS account from the test session.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # port=0: the OS picks a free port; get_host_and_port() reports it.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 endpoint."""
    return create_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module of tiny-model tests: on a shared 2-core machine, intra-op
    threads over tiny matrices only contend. Opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
