"""Artifact storage under one base URI (local path or ``s3://``)."""

from __future__ import annotations

import os

import dagster as dg

from npr_pipelines.storage import Storage


class StorageResource(dg.ConfigurableResource):
    """Where checkpoints, corpora and reports are published (atomically, with manifests).

    ``base_uri`` defaults to ``$NPR_HOME/artifacts``. For ``s3://`` the endpoint and credentials come
    from the environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...), never from config.
    """

    base_uri: str = ""

    def resolved_base_uri(self) -> str:
        return self.base_uri or os.path.join(os.environ.get("NPR_HOME", ".npr"), "artifacts")

    def get(self) -> Storage:
        return Storage(self.resolved_base_uri())
