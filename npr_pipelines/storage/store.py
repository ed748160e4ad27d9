"""`Storage`: one base URI (local directory or ``s3://bucket/prefix``) behind a small fsspec facade.

Arguments named ``uri`` accept either a full URI on the same filesystem (``s3://bucket/key``, an
absolute local path, ``file:///...``) or a path relative to the base URI; methods return full URIs
(absolute paths for local storage). S3 goes through s3fs: the endpoint comes from
``storage_options["client_kwargs"]["endpoint_url"]`` (or ``endpoint_url``), else from the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables; credentials come only from the environment
(the AWS credential chain) and are never accepted in options nor logged.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

from npr_pipelines.storage import publish as _publish
from npr_pipelines.storage.manifest import Manifest

logger = logging.getLogger(__name__)

DEFAULT_BASE_URI = ".npr/artifacts"

_LOCAL_PROTOCOLS = (None, "file", "local")
_S3_PROTOCOLS = ("s3", "s3a")
_CREDENTIAL_KEYS = frozenset(
    {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
)


def _s3_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    client_kwargs = dict(opts.get("client_kwargs") or {})
    leaked = sorted(_CREDENTIAL_KEYS & (set(opts) | set(client_kwargs)))
    if leaked:
        raise ValueError(
            f"credentials are not accepted in storage_options ({', '.join(leaked)}); "
            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) in the environment"
        )
    if "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        # botocore reads these too, but passing it explicitly makes it part of fsspec's instance-cache
        # key, so Storage objects created under different endpoints never share a client.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


class Storage:
    """Files under one base URI, with atomic single-file writes and manifest-based publishing."""

    def __init__(self, base_uri: str = DEFAULT_BASE_URI, storage_options: Mapping[str, Any] | None = None):
        protocol, rest = split_protocol(str(base_uri))
        self.is_local = protocol in _LOCAL_PROTOCOLS
        if self.is_local:
            self.protocol = "file"
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem("file", auto_mkdir=True)
            self._root = os.path.abspath(os.path.expanduser(rest))
        else:
            assert protocol is not None
            self.protocol = protocol
            opts = _s3_options(storage_options) if protocol in _S3_PROTOCOLS else dict(storage_options or {})
            self.fs = fsspec.filesystem(protocol, **opts)
            self._root = rest.strip("/")
            if not self._root:
                raise ValueError(f"base URI {base_uri!r} names no bucket")
            endpoint = (opts.get("client_kwargs") or {}).get("endpoint_url") or opts.get("endpoint_url")
            logger.debug("storage %s (endpoint %s)", self.base_uri, endpoint or "default")

    def __repr__(self) -> str:
        # Deliberately omits storage_options: they may hold endpoint tokens or session config.
        return f"Storage({self.base_uri!r})"

    @property
    def base_uri(self) -> str:
        """The base URI (an absolute path for local storage)."""
        return self._to_uri(self._root)

    # -- URI handling -------------------------------------------------------------------------------

    def uri(self, *parts: str) -> str:
        """The full URI of ``parts`` joined under the base URI."""
        segments: list[str] = []
        for part in parts:
            for seg in str(part).replace("\\", "/").split("/"):
                if seg == "..":
                    raise ValueError(f"'..' is not allowed in storage paths: {parts!r}")
                if seg and seg != ".":
                    segments.append(seg)
        return self._to_uri(posixpath.join(self._root, *segments) if segments else self._root)

    def _to_uri(self, path: str) -> str:
        return path if self.is_local else f"{self.protocol}://{path}"

    def _path(self, uri: str | os.PathLike[str]) -> str:
        """The filesystem path (no protocol) for a full URI or a base-relative path."""
        uri = os.fspath(uri)
        protocol, rest = split_protocol(uri)
        if protocol is None:
            if self.is_local and os.path.isabs(uri):
                return os.path.normpath(uri)
            rel = uri.strip("/")
            if not rel:
                return self._root
            joined = posixpath.normpath(posixpath.join(self._root, rel))
            return joined if self.is_local else joined.strip("/")
        if self.is_local and protocol in _LOCAL_PROTOCOLS:
            return os.path.abspath(rest)
        if not self.is_local and protocol == self.protocol:
            return rest.rstrip("/")
        raise ValueError(f"{uri!r} is not on this storage ({self.base_uri})")

    def _fresh(self, path: str) -> None:
        # s3fs caches listings; other processes may have published since.
        if not self.is_local:
            self.fs.invalidate_cache(path)

    # -- plain file operations ----------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        """Whether a file or directory exists at ``uri``."""
        path = self._path(uri)
        self._fresh(path)
        return bool(self.fs.exists(path))

    def read_bytes(self, uri: str) -> bytes:
        """The content of one file."""
        return self.fs.cat_file(self._path(uri))

    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write one file (atomically on local disk: temp file + rename); return its URI."""
        path = self._path(uri)
        if self.is_local:
            _atomic_write_local(path, data)
        else:
            # A single S3 PUT is atomic: readers see the old object or the new one.
            self.fs.pipe_file(path, data)
        return self._to_uri(path)

    def read_json(self, uri: str) -> Any:
        """Parse a JSON file."""
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    def write_json(self, uri: str, obj: Any, *, indent: int | None = 2) -> str:
        """Write ``obj`` as JSON (atomically on local disk); return the URI."""
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        return self.write_bytes(uri, (text + "\n").encode("utf-8"))

    def open(self, uri: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """fsspec ``open`` passthrough (parent directories are created for local writes)."""
        return self.fs.open(self._path(uri), mode, **kwargs)

    def ls(self, uri: str = "") -> list[str]:
        """Full URIs of the immediate children of a directory, sorted."""
        path = self._path(uri)
        self._fresh(path)
        return sorted(self._to_uri(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def _remove_tree(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    # -- published directories (see publish.py) -----------------------------------------------------

    def publish_dir(
        self,
        local_dir: str | os.PathLike[str],
        dest_uri: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Publish a local directory atomically: files first, ``MANIFEST.json`` last."""
        return _publish.publish_dir(self, local_dir, dest_uri, metadata=metadata, overwrite=overwrite)

    def read_manifest(self, uri: str) -> Manifest:
        """The manifest of a published directory; :class:`ArtifactError` if missing or invalid."""
        return _publish.read_manifest(self, uri)

    def verify_dir(self, uri: str) -> Manifest:
        """Check every listed file's size and checksum; :class:`ArtifactError` names the first bad one."""
        return _publish.verify_dir(self, uri)

    def fetch_dir(self, uri: str, local_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Manifest:
        """Download a published directory, verifying each file, into ``local_dir`` all-or-nothing."""
        return _publish.fetch_dir(self, uri, local_dir, overwrite=overwrite)

    def is_published(self, uri: str) -> bool:
        """Whether ``uri`` holds a valid manifest."""
        return _publish.is_published(self, uri)

    def list_published(self, prefix: str = "") -> list[str]:
        """URIs of directories under ``prefix`` (inclusive) that have a ``MANIFEST.json``, sorted."""
        return _publish.list_published(self, prefix)


def _atomic_write_local(path: str, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    # os.open with 0o666 respects the umask (mkstemp would force 0o600 on the final file).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
