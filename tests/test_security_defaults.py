"""Security defaults (#11 item 4), the cheap part: servers bind 127.0.0.1 unless told otherwise, Ray
keeps token authentication, ``trust_remote_code`` stays off, nothing read from storage is unpickled
(weights_only / manifest-verified DeepSpeed state only), credentials never come from config.

Static rules scan the project's own source (``npr_pipelines/``, ``assets/``, ``resources/``) with
``ast``, so a new call site is checked the day it is written; behavioural checks load hostile
directories. ``npr serve``'s sockets are checked on a running server in ``test_serve_load.py``, Ray's
listeners and token enforcement in ``test_ray_local.py``, the secret search over a pipeline run in
``test_secret_leak.py``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import runpy
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("npr_pipelines", "assets", "resources")
LOOPBACK = "127.0.0.1"


def source_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40  # the scan is not vacuous
    return files


def parsed() -> Iterator[tuple[str, ast.Module]]:
    for path in source_files():
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def calls(attr: str) -> Iterator[tuple[str, ast.Call]]:
    """Every call ``<anything>.<attr>(...)`` or ``<attr>(...)`` in the project's source."""
    for rel, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name == attr:
                    yield rel, node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


# -- servers bind 127.0.0.1 --------------------------------------------------------------------------


def test_every_server_command_defaults_to_loopback() -> None:
    from npr_pipelines.cli import build_parser
    from npr_pipelines.serve.app import ServerThread

    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    hosts = {
        name: action.default
        for name, command in sub.choices.items()
        for action in command._actions
        if action.dest == "host"
    }
    # Every command that starts a server is here (a new one must be added on purpose).
    assert hosts == {"ui": LOOPBACK, "serve": LOOPBACK}
    assert inspect.signature(ServerThread.__init__).parameters["host"].default == LOOPBACK


def test_npr_ui_passes_its_host_to_both_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``npr ui`` starts MLflow and ``dagster dev`` with ``--host``/``-h 127.0.0.1`` (nothing is run)."""
    import subprocess

    from npr_pipelines import cli

    started: list[list[str]] = []

    class FakeProcess:
        def __init__(self, cmd: list[str], **_: object) -> None:
            started.append(cmd)
            self.pid = 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

        def terminate(self) -> None:
            pass

    for var in ("NPR_HOME", "DAGSTER_HOME", "NPR_PROFILE"):  # cmd_ui exports them: restored afterwards
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(["ui", "--home", str(tmp_path / "home")]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    mlflow, dagster = started
    assert mlflow[mlflow.index("--host") + 1] == LOOPBACK and "server" in mlflow
    assert dagster[dagster.index("-h") + 1] == LOOPBACK and "dev" in dagster


def test_no_wildcard_address_in_the_source() -> None:
    """No listener on every interface: no ``0.0.0.0``/``::`` literal, and ``bind(("", port))`` only to
    pick a free port (DeepSpeed's rendezvous port, the socket is closed at once)."""
    wildcard = {"0.0.0.0", "::", "[::]"}
    found = [
        (rel, node.lineno)
        for rel, tree in parsed()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in wildcard
    ]
    assert found == []
    empty_binds = []
    for rel, tree in parsed():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", None) == "bind"
                    and node.args
                    and isinstance(node.args[0], ast.Tuple)
                    and isinstance(node.args[0].elts[0], ast.Constant)
                    and node.args[0].elts[0].value == ""
                ):
                    empty_binds.append((rel, fn.name))
    assert empty_binds == [("npr_pipelines/training/ray_workers.py", "get_master_addr_port")]


def test_local_ray_keeps_token_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray ``RAY_AUTH_MODE=disabled`` is dropped before a local start (so ``ray.init`` turns token
    mode on); the local start binds loopback. Enforcement itself: ``test_ray_local.py``."""
    pytest.importorskip("ray")
    from npr_pipelines.compute import ray_local

    if ray_local._saved_env is not None:
        pytest.skip("a Ray started by this session is attached; its saved environment must not be touched")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        ray_local._prepare_local_start()
        assert "RAY_AUTH_MODE" not in os.environ
    finally:
        ray_local._restore_env()
    kwargs = ray_local._init_kwargs(
        None,
        num_cpus=1,
        namespace="npr",
        include_dashboard=True,
        dashboard_port=None,
        runtime_env=None,
        extra={},
    )
    assert kwargs["_node_ip_address"] == kwargs["dashboard_host"] == LOOPBACK
    assert "_system_config" not in kwargs  # nothing that could switch authentication off


# -- trust_remote_code -------------------------------------------------------------------------------


def test_from_pretrained_never_enables_remote_code() -> None:
    found = list(calls("from_pretrained"))
    assert len(found) >= 10
    for rel, call in found:
        assert all(k.arg is not None for k in call.keywords), f"{rel}:{call.lineno}: **kwargs may carry it"
        value = keyword(call, "trust_remote_code")
        if value is not None:
            assert isinstance(value, ast.Constant) and value.value is False, f"{rel}:{call.lineno}"


@pytest.fixture(scope="module")
def remote_code_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model directory whose config and tokenizer point ``auto_map`` at a module that, when
    imported, creates a marker file (what running remote code would look like)."""
    from _support import byte_bpe_tokenizer

    from npr_pipelines.engine.testing import tiny_qwen3

    path = tmp_path_factory.mktemp("remote-code")
    marker = path.parent / f"{path.name}-REMOTE-CODE-RAN"
    tok = byte_bpe_tokenizer()
    tiny_qwen3(len(tok), layers=1, hidden=16).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "evil_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Qwen3Config as EvilConfig, Qwen3ForCausalLM as EvilModel\n"
    )
    for name, auto_map in (
        (
            "config.json",
            {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"},
        ),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil_model.EvilTokenizer"]}),
    ):
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    return path, marker


def test_remote_code_in_a_model_directory_is_never_run(
    remote_code_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npr_pipelines.serve import load_engine
    from npr_pipelines.toy.model import load_model

    path, marker = remote_code_dir
    load_engine(path)  # npr serve
    load_model(path)  # the toy/pipeline loader
    AutoModelForCausalLM.from_pretrained(path)  # transformers' own default (assets/checks.py, ...)
    AutoTokenizer.from_pretrained(path)
    assert not marker.exists()

    # A model type only the remote code defines: refused, not run.
    unknown = shutil.copytree(path, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "evil_npr"}))
    with pytest.raises(ValueError, match="custom code"):
        load_engine(unknown)
    assert not marker.exists()

    runpy.run_path(str(path / "evil_model.py"))  # the payload is live: running it leaves the marker
    assert marker.exists()
    marker.unlink()


# -- nothing unpickled -------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "_pickle", "shelve", "marshal"}


def test_nothing_in_the_source_unpickles() -> None:
    imports = []
    for rel, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imports += [(rel, a.name) for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                imports.append((rel, node.module))
    assert imports == []
    for rel, call in calls("load"):
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "torch":
            value = keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{rel}:{call.lineno}"
    for attr in ("read_pickle", "loads"):
        for rel, call in calls(attr):
            assert getattr(call.func, "value", None) is None or getattr(call.func.value, "id", "") in {
                "json",
                "orjson",
            }, f"{rel}:{call.lineno}: {attr}"
    for rel, call in calls("load"):
        value = keyword(call, "allow_pickle")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
            f"{rel}:{call.lineno}"
        )


def test_deepspeed_pickles_are_read_only_after_manifest_verification() -> None:
    """DeepSpeed's ``load_checkpoint`` (``torch.load(weights_only=False)``) is the one pickle reader:
    every call sits in a function that verifies the files against the manifest first."""
    found = []
    for rel, tree in parsed():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            inner = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            loads = [c for c in inner if getattr(c.func, "attr", None) == "load_checkpoint"]
            verifies = [c.lineno for c in inner if getattr(c.func, "id", None) == "verify_deepspeed_files"]
            for c in loads:
                found.append((rel, fn.name))
                assert verifies and min(verifies) < c.lineno, f"{rel}:{c.lineno} loads before verifying"
    assert found == [("npr_pipelines/training/deepspeed_strategy.py", "load")]


def test_the_io_manager_never_pickles(tmp_path: Path) -> None:
    import dagster as dg

    from assets.io_manager import NprIOManager
    from npr_pipelines.definitions import build_definitions

    io_managers = {
        key: res for key, res in build_definitions("small").resources.items() if isinstance(res, dg.IOManager)
    }
    assert list(io_managers) == ["io_manager"] and isinstance(io_managers["io_manager"], NprIOManager)
    manager = NprIOManager(base_uri=str(tmp_path))
    context = dg.build_output_context(asset_key=dg.AssetKey("thing"))
    with pytest.raises(TypeError, match="never pickles"):
        manager.handle_output(context, object())
    assert list(tmp_path.iterdir()) == []


# -- credentials ---------------------------------------------------------------------------------------

SECRET_FIELD = re.compile(r"secret|password|passwd|token|credential|api_?key|access_?key", re.IGNORECASE)


def test_no_resource_takes_credentials_as_config() -> None:
    """Credentials come from the environment (or a Dagster ``EnvVar``), never from a config field that
    would be stored with the run."""
    import resources

    fields = {
        f"{name}.{field}" for name in resources.__all__ for field in getattr(resources, name).model_fields
    }
    assert len(fields) >= 8
    assert [f for f in fields if SECRET_FIELD.search(f)] == []
