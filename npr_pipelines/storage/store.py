"""`Storage`: one base URI (local directory or ``s3://bucket/prefix``) behind a small fsspec facade.

Arguments named ``uri`` accept either a full URI on the same filesystem (``s3://bucket/key``, an
absolute local path, ``file:///...``) or a path relative to the base URI; methods return full URIs
(absolute paths for local storage). S3 goes through s3fs: the endpoint comes from
``storage_options["client_kwargs"]["endpoint_url"]`` (or ``endpoint_url``), else from the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables; credentials come only from the environment
(the AWS credential chain) and are never accepted in options nor logged.

A storage that cannot be reached (endpoint down, unknown host, network) raises `StorageUnreachable`
naming the URI, never "not published" or "missing": readers must not mistake an outage for absence.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import socket
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, TypeVar

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


class StorageUnreachable(ConnectionError):
    """The storage behind ``uri`` could not be reached; the message names the URI and the cause."""

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(message)
        self.uri = uri


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not talk to the storage" (not "the object is absent")."""
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return errors
    return (*errors, BotoConnectionError, HTTPClientError)


F = TypeVar("F", bound=Callable[..., Any])


def _reachable(uri_arg: int = 0) -> Callable[[F], F]:
    """Turn connection failures of a `Storage` method into `StorageUnreachable` naming the URI
    (positional argument ``uri_arg`` after ``self``; the base URI when it is not given)."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Storage, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except StorageUnreachable:
                raise
            except _unreachable_errors() as exc:
                target = self._describe(args[uri_arg] if len(args) > uri_arg else "")
                raise StorageUnreachable(
                    f"{target}: storage unreachable ({type(exc).__name__}: {exc}); "
                    "check the endpoint (AWS_ENDPOINT_URL_S3), the network and the credentials",
                    uri=target,
                ) from exc

        return wrapper  # type: ignore[return-value]

    return decorate


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
            try:
                self.fs = fsspec.filesystem(protocol, **opts)
            except (ImportError, ValueError) as exc:  # unknown protocol, or its fsspec package missing
                raise ValueError(f"{base_uri}: unsupported storage URI ({exc})") from exc
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

    def _describe(self, uri: str | os.PathLike[str]) -> str:
        """The full URI of ``uri`` for messages (as given when it is not on this storage)."""
        try:
            return self._to_uri(self._path(uri))
        except ValueError:
            return os.fspath(uri)

    def _fresh(self, path: str) -> None:
        # s3fs caches listings; other processes may have published since.
        if not self.is_local:
            self.fs.invalidate_cache(path)

    # -- plain file operations ----------------------------------------------------------------------

    @_reachable()
    def exists(self, uri: str) -> bool:
        """Whether a file or directory exists at ``uri``."""
        path = self._path(uri)
        self._fresh(path)
        return bool(self.fs.exists(path))

    @_reachable()
    def read_bytes(self, uri: str) -> bytes:
        """The content of one file."""
        return self.fs.cat_file(self._path(uri))

    @_reachable()
    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write one file (atomically on local disk: temp file + rename); return its URI."""
        path = self._path(uri)
        if self.is_local:
            _atomic_write_local(path, data)
        else:
            # A single S3 PUT is atomic: readers see the old object or the new one.
            self.fs.pipe_file(path, data)
        return self._to_uri(path)

    @_reachable()
    def read_json(self, uri: str) -> Any:
        """Parse a JSON file."""
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    @_reachable()
    def write_json(self, uri: str, obj: Any, *, indent: int | None = 2) -> str:
        """Write ``obj`` as JSON (atomically on local disk); return the URI."""
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        return self.write_bytes(uri, (text + "\n").encode("utf-8"))

    def open(self, uri: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """fsspec ``open`` passthrough (parent directories are created for local writes)."""
        return self.fs.open(self._path(uri), mode, **kwargs)

    @_reachable()
    def ls(self, uri: str = "") -> list[str]:
        """Full URIs of the immediate children of a directory, sorted."""
        path = self._path(uri)
        self._fresh(path)
        return sorted(self._to_uri(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def _remove_tree(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    # -- published directories (see publish.py) -----------------------------------------------------

    @_reachable(uri_arg=1)
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

    @_reachable()
    def read_manifest(self, uri: str) -> Manifest:
        """The manifest of a published directory; :class:`ArtifactError` if missing or invalid."""
        return _publish.read_manifest(self, uri)

    @_reachable()
    def verify_dir(self, uri: str) -> Manifest:
        """Check every listed file's size and checksum; :class:`ArtifactError` names the first bad one."""
        return _publish.verify_dir(self, uri)

    @_reachable()
    def fetch_dir(self, uri: str, local_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Manifest:
        """Download a published directory, verifying each file, into ``local_dir`` all-or-nothing."""
        return _publish.fetch_dir(self, uri, local_dir, overwrite=overwrite)

    @_reachable()
    def is_published(self, uri: str) -> bool:
        """Whether ``uri`` holds a valid manifest."""
        return _publish.is_published(self, uri)

    @_reachable()
    def list_published(self, prefix: str = "") -> list[str]:
        """URIs of directories under ``prefix`` (inclusive) that have a ``MANIFEST.json``, sorted."""
        return _publish.list_published(self, prefix)


def write_json_report(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON in the local file ``path`` (a command's ``--out``), written atomically:
    a reader never sees half a report."""
    _atomic_write_local(str(path), (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


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
