"""Shared fixtures: a local S3 endpoint (moto's in-process server on 127.0.0.1); the session's one run of
the whole pipeline (``small`` profile, ``pipeline_fixtures``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from pipeline_fixtures import release_ray, small_pipeline  # noqa: F401  (fixtures for every module)


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
