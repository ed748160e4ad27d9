"""Storage and atomic publishing, on the local disk and on a local S3 endpoint (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

import npr_pipelines.storage.publish as publish_mod
from npr_pipelines.storage import (
    MANIFEST_NAME,
    ArtifactError,
    Storage,
    fetch_dir,
    is_published,
    list_published,
    publish_dir,
    read_manifest,
)

TREE = {
    "config.json": b'{"hidden_size": 64}',
    "model.safetensors": bytes(range(256)) * 40,
    "empty.txt": b"",
    "sub/tokenizer.json": b'{"v": 1}',
    "sub/deeper/notes.md": b"# nested\n",
}


def make_tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "artifacts"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/artifacts", {"client_kwargs": {"endpoint_url": endpoint}})


@pytest.fixture
def s3(s3_endpoint: str, s3_bucket: str) -> Storage:
    return Storage(f"s3://{s3_bucket}/a", {"client_kwargs": {"endpoint_url": s3_endpoint}})


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


# -- plain file operations ---------------------------------------------------------------------------


def test_uri_and_file_operations(storage: Storage) -> None:
    uri = storage.uri("runs", "r1", "info.json")
    assert uri == storage.base_uri + "/runs/r1/info.json"
    assert not storage.exists(uri)
    assert storage.write_json(uri, {"a": 1, "b": [1.5, "x"]}) == uri
    assert storage.exists(uri)
    assert storage.read_json("runs/r1/info.json") == {"a": 1, "b": [1.5, "x"]}  # base-relative works too
    storage.write_bytes(storage.uri("runs", "r1", "blob.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.uri("runs/r1/blob.bin")) == b"\x00\x01"
    with storage.open(storage.uri("runs", "r2", "t.txt"), "wb") as f:
        f.write(b"hello")
    with storage.open(storage.uri("runs", "r2", "t.txt")) as f:
        assert f.read() == b"hello"
    assert storage.ls(storage.uri("runs")) == [storage.uri("runs", "r1"), storage.uri("runs", "r2")]
    assert storage.ls("runs/r1") == [storage.uri("runs/r1/blob.bin"), uri]
    with pytest.raises(ValueError, match=r"\.\."):
        storage.uri("..", "escape")


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(str(tmp_path))
    target = storage.uri("state.json")
    storage.write_json(target, {"step": 1})

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.write_json(target, {"step": 2})
    assert storage.read_json(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_default_base_is_local_npr_artifacts() -> None:
    assert Storage().base_uri == os.path.abspath(".npr/artifacts")


def test_credentials_are_not_accepted_in_options() -> None:
    with pytest.raises(ValueError, match="environment"):
        Storage("s3://bucket/p", {"secret": "s3cr3t"})
    with pytest.raises(ValueError, match="environment"):
        Storage("s3://bucket/p", {"client_kwargs": {"aws_secret_access_key": "s3cr3t"}})


def test_s3_endpoint_from_environment(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    storage = Storage(f"s3://{bucket}/base")
    assert repr(storage) == f"Storage('s3://{bucket}/base')"
    storage.write_json("x.json", [1, 2])
    assert Storage(f"s3://{bucket}").read_json(f"s3://{bucket}/base/x.json") == [1, 2]


# -- publishing ----------------------------------------------------------------------------------------


def test_publish_round_trip_nested(storage: Storage, src: Path, tmp_path: Path) -> None:
    dest = storage.uri("checkpoints", "npr_beta-000010")
    manifest = storage.publish_dir(src, dest, metadata={"stage": "npr_beta", "step": 10})

    raw = json.loads(storage.read_bytes(dest + "/" + MANIFEST_NAME))
    assert set(raw) == {"version", "created_at", "files", "metadata"}
    assert raw["version"] == 1 and raw["metadata"] == {"stage": "npr_beta", "step": 10}
    assert raw["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in TREE.items()
    }
    assert storage.read_manifest(dest) == manifest
    assert manifest.total_size == sum(len(d) for d in TREE.values())
    assert storage.is_published(dest)
    assert storage.verify_dir(dest) == manifest
    assert storage.list_published() == [dest]

    local = tmp_path / "fetched" / "ckpt"
    assert storage.fetch_dir(dest, local) == manifest
    assert read_tree(local) == {**TREE, MANIFEST_NAME: manifest.to_json_bytes()}
    assert siblings(local) == ["ckpt"]  # no staging directory left behind
    with pytest.raises(ArtifactError, match="already exists"):
        storage.fetch_dir(dest, local)
    # The local copy is itself a verifiable published directory.
    assert Storage(str(local)).verify_dir("") == manifest


def test_uri_level_functions(storage: Storage, src: Path, tmp_path: Path) -> None:
    dest = storage.uri("corpus")
    opts = None if storage.is_local else {"client_kwargs": storage.fs.client_kwargs}
    manifest = publish_dir(src, dest, metadata={"n": 3}, storage_options=opts)
    assert is_published(dest, storage_options=opts)
    assert read_manifest(dest, storage_options=opts) == manifest
    assert list_published(storage.base_uri, storage_options=opts) == [dest]
    fetch_dir(dest, tmp_path / "copy", storage_options=opts)
    assert read_tree(tmp_path / "copy")["sub/deeper/notes.md"] == TREE["sub/deeper/notes.md"]


def test_reader_refuses_directory_without_manifest(storage: Storage, tmp_path: Path) -> None:
    # An interrupted publication: every file uploaded, the manifest never written.
    dest = storage.uri("interrupted")
    for rel, data in TREE.items():
        storage.write_bytes(f"{dest}/{rel}", data)
    assert not storage.is_published(dest)
    for read in (storage.read_manifest, storage.verify_dir):
        with pytest.raises(
            ArtifactError, match=re.escape(f"{dest}: not a published artifact directory")
        ) as err:
            read(dest)
        assert err.value.uri == dest
    with pytest.raises(ArtifactError, match=r"MANIFEST.json is missing"):
        storage.fetch_dir(dest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert storage.list_published() == []
    with pytest.raises(ArtifactError, match=r"MANIFEST.json is missing"):
        storage.read_manifest(storage.uri("never-written"))


def manifest_json(files: dict, version: int = 1) -> bytes:
    return json.dumps({"version": version, "created_at": "x", "files": files}).encode()


ZERO = "0" * 64


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (manifest_json({}, version=2), "unsupported version 2"),
        (manifest_json({"../evil": {"size": 1, "sha256": ZERO}}), "'..'"),
        (manifest_json({"/abs": {"size": 1, "sha256": ZERO}}), "relative"),
        (manifest_json({"a": {"size": -1, "sha256": ZERO}}), "size"),
        (manifest_json({"a": {"size": 1, "sha256": "zz"}}), "sha256"),
    ],
    ids=["not-json", "version", "dotdot", "absolute", "size", "sha256"],
)
def test_invalid_manifest_is_refused(storage: Storage, tmp_path: Path, content: bytes, why: str) -> None:
    dest = storage.uri("bad")
    storage.write_bytes(f"{dest}/a", b"x")
    storage.write_bytes(f"{dest}/{MANIFEST_NAME}", content)
    with pytest.raises(ArtifactError, match=re.escape(f"{dest}: invalid MANIFEST.json")) as err:
        storage.read_manifest(dest)
    assert why in str(err.value)
    assert not storage.is_published(dest)
    with pytest.raises(ArtifactError):
        storage.fetch_dir(dest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tampered", "match"),
    [(b"X" + TREE["sub/tokenizer.json"][1:], "sha256 mismatch"), (b"{}", "size 2 differs")],
    ids=["same-size", "other-size"],
)
def test_tampering_is_detected_and_named(
    storage: Storage, src: Path, tmp_path: Path, tampered: bytes, match: str
) -> None:
    dest = storage.uri("ckpt")
    storage.publish_dir(src, dest)
    storage.write_bytes(f"{dest}/sub/tokenizer.json", tampered)
    with pytest.raises(ArtifactError, match=match) as err:
        storage.verify_dir(dest)
    assert "sub/tokenizer.json" in str(err.value) and dest in str(err.value)
    assert err.value.file == "sub/tokenizer.json"

    local = tmp_path / "dl" / "ckpt"
    with pytest.raises(ArtifactError, match=match):
        storage.fetch_dir(dest, local)
    assert not local.exists() and siblings(local) == []  # nothing half-written left behind


def test_missing_file_is_named(storage: Storage, src: Path) -> None:
    dest = storage.uri("ckpt")
    storage.publish_dir(src, dest)
    storage.fs.rm_file(storage._path(f"{dest}/sub/deeper/notes.md"))
    with pytest.raises(ArtifactError, match=r"sub/deeper/notes.md is in the manifest but missing"):
        storage.verify_dir(dest)


def test_refuses_to_overwrite_a_publication(storage: Storage, src: Path, tmp_path: Path) -> None:
    dest = storage.uri("ckpt")
    first = storage.publish_dir(src, dest, metadata={"v": 1})
    other = make_tree(tmp_path / "other", {"config.json": b"{}"})
    with pytest.raises(ArtifactError, match=r"already published.*overwrite=True"):
        storage.publish_dir(other, dest)
    assert storage.verify_dir(dest) == first
    assert storage.read_bytes(f"{dest}/config.json") == TREE["config.json"]


def test_overwrite_replaces_the_whole_directory(storage: Storage, src: Path, tmp_path: Path) -> None:
    dest = storage.uri("ckpt")
    neighbour = storage.uri("ckpt2")  # shares the prefix "ckpt": must survive the overwrite
    storage.publish_dir(src, dest)
    storage.publish_dir(src, neighbour)
    new_files = {"config.json": b'{"hidden_size": 128}', "new_only/x.bin": b"\x07" * 9}
    second = storage.publish_dir(make_tree(tmp_path / "v2", new_files), dest, overwrite=True)
    assert set(second.files) == set(new_files)
    assert storage.verify_dir(dest) == second
    assert not storage.exists(f"{dest}/model.safetensors")  # old files are gone
    assert storage.read_bytes(f"{dest}/config.json") == new_files["config.json"]
    assert storage.verify_dir(neighbour).files.keys() == TREE.keys()
    assert storage.list_published() == [dest, neighbour]
    if storage.is_local:
        assert siblings(Path(dest)) == ["ckpt", "ckpt2"]


def test_s3_overwrite_deletes_old_manifest_first(s3: Storage, src: Path, tmp_path: Path) -> None:
    storage = s3
    dest = storage.uri("ckpt")
    storage.publish_dir(src, dest)
    calls: list[tuple[str, str]] = []
    fs = storage.fs
    originals = {name: getattr(fs, name) for name in ("rm_file", "rm", "put_file", "pipe_file")}

    def spy(name: str):
        def wrapper(path, *args, **kwargs):
            calls.append((name, str(args[0]) if name == "put_file" else str(path)))
            return originals[name](path, *args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        for name in originals:
            mp.setattr(fs, name, spy(name))
        storage.publish_dir(make_tree(tmp_path / "v2", {"w.bin": b"2"}), dest, overwrite=True)
    assert calls[0] == ("rm_file", storage._path(dest) + "/" + MANIFEST_NAME)
    assert calls[-1] == ("pipe_file", storage._path(dest) + "/" + MANIFEST_NAME)


def failing_after(n: int, func):
    """Wrap ``func`` so that call number ``n + 1`` raises (simulates a connection drop)."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > n:
            raise ConnectionError("simulated network failure")
        return func(*args, **kwargs)

    return wrapper


def test_failed_upload_leaves_destination_unpublished(
    s3: Storage, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3
    dest = storage.uri("ckpt")
    monkeypatch.setattr(storage.fs, "put_file", failing_after(1, storage.fs.put_file))
    with pytest.raises(ArtifactError, match=r"publishing failed.*simulated network failure.*unpublished"):
        storage.publish_dir(src, dest)
    assert not storage.is_published(dest)
    assert storage.list_published() == []
    with pytest.raises(ArtifactError, match=r"MANIFEST.json is missing"):
        storage.fetch_dir(dest, tmp_path / "out")
    monkeypatch.undo()
    # A retry publishes cleanly over the debris.
    assert storage.publish_dir(src, dest).files.keys() == TREE.keys()
    assert storage.verify_dir(dest).files.keys() == TREE.keys()


def test_failed_overwrite_on_s3_never_shows_a_mixed_manifest(
    s3: Storage, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3
    dest = storage.uri("ckpt")
    storage.publish_dir(src, dest)
    monkeypatch.setattr(storage.fs, "put_file", failing_after(2, storage.fs.put_file))
    with pytest.raises(ArtifactError, match="unpublished"):
        storage.publish_dir(
            make_tree(tmp_path / "v2", {"a": b"1", "b": b"2", "c": b"3"}), dest, overwrite=True
        )
    assert not storage.is_published(dest)


def test_failed_local_publish_leaves_nothing_behind(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path / "artifacts"))
    dest = storage.uri("ckpt")
    monkeypatch.setattr(publish_mod, "_copy_file", failing_after(1, publish_mod._copy_file))
    with pytest.raises(ConnectionError):
        storage.publish_dir(src, dest)
    assert not storage.is_published(dest)
    assert siblings(Path(dest)) == []  # neither the destination nor a staging directory

    # With a previous publication, a failed overwrite leaves it intact (local publishing swaps by rename).
    monkeypatch.undo()
    first = storage.publish_dir(src, dest)
    monkeypatch.setattr(publish_mod, "_copy_file", failing_after(1, publish_mod._copy_file))
    with pytest.raises(ConnectionError):
        storage.publish_dir(src, dest, overwrite=True)
    assert storage.verify_dir(dest) == first
    assert siblings(Path(dest)) == ["ckpt"]


def test_fetch_failure_mid_download_leaves_nothing_behind(
    storage: Storage, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = storage.uri("ckpt")
    storage.publish_dir(src, dest)
    previous = make_tree(tmp_path / "dl" / "ckpt", {"keep.txt": b"old local copy"})
    monkeypatch.setattr(storage.fs, "open", failing_after(2, storage.fs.open))
    with pytest.raises(ConnectionError):
        storage.fetch_dir(dest, previous, overwrite=True)
    assert read_tree(previous) == {"keep.txt": b"old local copy"}  # old copy untouched
    assert siblings(previous) == ["ckpt"]
    with pytest.raises(ConnectionError):
        storage.fetch_dir(dest, tmp_path / "dl" / "fresh")
    assert siblings(previous) == ["ckpt"]
    monkeypatch.undo()
    storage.fetch_dir(dest, previous, overwrite=True)
    assert read_tree(previous).keys() == {*TREE, MANIFEST_NAME}


def test_list_published_skips_unpublished_and_staging(storage: Storage, src: Path) -> None:
    storage.publish_dir(src, storage.uri("runs", "b"))
    storage.publish_dir(src, storage.uri("runs", "a"))
    storage.publish_dir(src, storage.uri("other", "c"))
    storage.write_bytes(storage.uri("runs", "half", "config.json"), b"{}")  # no manifest
    storage.write_bytes(storage.uri("runs", ".x.publishing-1", MANIFEST_NAME), b"{}")  # staging debris
    assert storage.list_published("runs") == [storage.uri("runs", "a"), storage.uri("runs", "b")]
    assert storage.list_published(storage.uri("runs", "a")) == [storage.uri("runs", "a")]
    assert len(storage.list_published()) == 3
    assert storage.list_published("nothing-here") == []


def test_publish_rejects_reserved_names_and_missing_source(storage: Storage, tmp_path: Path) -> None:
    bad = make_tree(tmp_path / "bad", {MANIFEST_NAME: b"{}", "x": b"1"})
    with pytest.raises(ArtifactError, match="reserved"):
        storage.publish_dir(bad, storage.uri("x"))
    with pytest.raises(ArtifactError, match="not a directory"):
        storage.publish_dir(tmp_path / "missing", storage.uri("x"))
    with pytest.raises(ValueError, match="JSON"):
        storage.publish_dir(
            make_tree(tmp_path / "ok", {"x": b"1"}), storage.uri("x"), metadata={"f": float("nan")}
        )
    assert not storage.exists(storage.uri("x"))


# -- a publisher killed mid-publication (#11: no reader ever sees a partial artifact) ----------------


class Killed(BaseException):
    """A process death as the code under test sees it: no ``except Exception`` cleanup runs."""


def killed_after(n: int, func):
    """Wrap ``func`` so that call number ``n + 1`` dies like a SIGKILLed process would."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > n:
            raise Killed
        return func(*args, **kwargs)

    return wrapper


def assert_invisible(storage: Storage, uri: str, partition: str, tmp_path: Path) -> None:
    """Every reader refuses an unfinished checkpoint publication."""
    from npr_pipelines.storage.checkpoints import read_checkpoint

    assert not storage.is_published(uri)
    assert storage.list_published() == []
    with pytest.raises(ArtifactError, match=r"MANIFEST.json is missing"):
        storage.fetch_dir(uri, tmp_path / "reader-copy")
    with pytest.raises(KeyError, match=partition):  # its index entry is written only after publishing
        read_checkpoint(storage, partition)


def test_s3_upload_killed_mid_publish_is_invisible_and_a_retry_publishes_it(
    s3: Storage, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npr_pipelines.compute.stage_job import publish_stage_checkpoint
    from npr_pipelines.storage.checkpoints import read_checkpoint

    uri = s3.uri("checkpoints", "npr", "key", "step-000003")
    monkeypatch.setattr(s3.fs, "put_file", killed_after(2, s3.fs.put_file))
    with pytest.raises(Killed):
        publish_stage_checkpoint(s3, "npr", "key", 3, src, None)
    monkeypatch.undo()
    s3.fs.invalidate_cache()
    assert len(s3.fs.find(s3._path(uri))) == 2  # the killed upload's files are there...
    assert_invisible(s3, uri, "npr-000003", tmp_path)  # ...and no reader sees them
    ref = publish_stage_checkpoint(s3, "npr", "key", 3, src, None)  # the restarted stage publishes again
    assert ref["uri"] == uri and read_checkpoint(s3, "npr-000003") == ref
    assert s3.verify_dir(uri).files.keys() == TREE.keys()
    s3.fetch_dir(uri, tmp_path / "copy")
    assert {k: v for k, v in read_tree(tmp_path / "copy").items() if k != MANIFEST_NAME} == TREE


KILL_BETWEEN_FILES = """
import os, signal, sys
import npr_pipelines.storage.publish as publish
from npr_pipelines.compute.stage_job import publish_stage_checkpoint
from npr_pipelines.storage import Storage

copy, calls = publish._copy_file, []

def copy_then_die(src, dst):
    calls.append(src)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return copy(src, dst)

publish._copy_file = copy_then_die
publish_stage_checkpoint(Storage(sys.argv[1]), "npr", "key", 3, sys.argv[2], None)
"""


def test_local_publish_killed_between_files_is_invisible_and_a_retry_cleans_up(
    tmp_path: Path, src: Path
) -> None:
    import signal
    import subprocess
    import sys

    from npr_pipelines.compute.stage_job import publish_stage_checkpoint
    from npr_pipelines.storage.checkpoints import read_checkpoint

    storage = Storage(str(tmp_path / "artifacts"))
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_FILES, storage.base_uri, str(src)], check=False)
    assert proc.returncode == -signal.SIGKILL
    uri = storage.uri("checkpoints", "npr", "key", "step-000003")
    debris = siblings(Path(uri))
    assert len(debris) == 1 and debris[0].startswith(".step-000003.publishing-")  # killed mid-staging
    assert len(read_tree(Path(uri).parent / debris[0])) == 2
    assert_invisible(storage, uri, "npr-000003", tmp_path)
    ref = publish_stage_checkpoint(storage, "npr", "key", 3, src, None)
    assert read_checkpoint(storage, "npr-000003") == ref
    assert storage.verify_dir(uri).files.keys() == TREE.keys()
    assert siblings(Path(uri)) == ["step-000003"]  # the killed publisher's staging directory is gone
