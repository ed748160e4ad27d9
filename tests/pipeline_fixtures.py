"""One run of the whole pipeline (``small`` profile), shared by every test of the session that needs it.

``small_pipeline`` runs the main job the way ``npr run`` does (``assets.jobs.run_main``: phase 1
materializes every stage asset, phase 2 evaluates each stage's final checkpoint through
``benchmark_scores``) in its own ``NPR_HOME`` and ``DAGSTER_HOME`` under the session's temp directory,
with a local Ray on 127.0.0.1 and MLflow in sqlite. Tests read what it left (the Dagster instance, the
MLflow store, the artifacts); they never re-run its stages.

The instance launches runs in this process (``SyncInMemoryRunLauncher``, ``DefaultRunCoordinator``),
so runs that the backfill daemon's iteration submits execute synchronously here, on the same Ray.
Ray stays attached while the tests that use the run need it; ``release_ray`` detaches it after a module
(other modules start and stop their own clusters and check that nothing is left running).

The run's environment holds recognisable fake credentials (``FAKE_SECRETS``, set before Ray starts so
its processes inherit them) and what it prints (``sys.stdout``/``sys.stderr`` and ``run_main``'s log
lines) is copied to ``home/run_output.log``: ``test_secret_leak`` searches everything the run wrote.

``conftest.py`` imports the fixtures from here, so every test module can request them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from npr_pipelines.cli import DAGSTER_YAML as CLI_DAGSTER_YAML

try:
    from toy_fixtures import session_toy_cache
except ImportError:  # tests/ imported as a package
    from tests.toy_fixtures import session_toy_cache

TESTS = Path(__file__).resolve().parent
#: The code location of the small profile, as a workspace loads it (by file).
SMALL_DEFINITIONS_FILE = TESTS / "small_definitions.py"

#: The instance: in-process run launching, runs start as soon as they are submitted, no telemetry;
#: the same pool limit as ``npr run`` (one compute step at a time).
DAGSTER_YAML = (
    CLI_DAGSTER_YAML
    + """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher.sync_in_memory_run_launcher
  class: SyncInMemoryRunLauncher
"""
)

#: Variables that would point the run somewhere else than its own home, local Ray and toy benchmarks.
FOREIGN_ENV = (
    "NPR_BENCHMARK_DIR",
    "NPR_RAY_ADDRESS",
    "RAY_ADDRESS",
    "NPR_TRAIN_PROBLEMS",
    "MLFLOW_TRACKING_URI",
    "NPR_STORAGE_URI",
)

#: Fake credentials in the run's environment; nothing the run writes may contain them.
FAKE_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "npr-fake-secret-XYZ-7c41e09b",
    "MLFLOW_TRACKING_TOKEN": "npr-fake-mlflow-token-2f9d6a51",
}


@dataclass
class SmallPipeline:
    """What the session's pipeline run left behind."""

    home: Path
    dagster_home: Path
    summary: dict[str, Any]
    wall_s: float  # run_main's wall time, measured around the call
    instance: Any  # the open ``DagsterInstance`` the run used
    defs: Any  # the ``Definitions`` it ran
    secrets: dict[str, str] = field(default_factory=dict)  # the fake credentials it ran with
    output_log: Path | None = None  # what it printed
    ray_session_dir: Path | None = None  # the local Ray's session directory (its logs)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    def environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process at the run's state again (what ``npr`` exports), for a test's duration."""
        monkeypatch.setenv("NPR_HOME", str(self.home))
        monkeypatch.setenv("DAGSTER_HOME", str(self.dagster_home))
        monkeypatch.setenv("NPR_PROFILE", "small")
        for var in FOREIGN_ENV:
            monkeypatch.delenv(var, raising=False)

    def latest_materialization(self, asset: str, partition: str | None = None) -> Any:
        """The latest ``AssetMaterialization`` event record of ``asset`` (or of one of its partitions)."""
        import dagster as dg

        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
            ),
            limit=1,
        ).records
        if not records:
            raise LookupError(f"{asset} {partition or ''} was never materialized")
        return records[0]

    def data_version(self, asset: str) -> str:
        """The Dagster data version of the latest materialization of ``asset``."""
        from dagster._core.definitions.data_version import DATA_VERSION_TAG

        return self.latest_materialization(asset).asset_materialization.tags[DATA_VERSION_TAG]


class _Tee:
    """A text stream that also copies everything written to ``sink``."""

    def __init__(self, stream: IO[str], sink: IO[str]) -> None:
        self._stream, self._sink = stream, sink

    def write(self, text: str) -> int:
        self._sink.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._sink.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, ...
        return getattr(self._stream, name)


@contextmanager
def tee_output(path: Path) -> Iterator[IO[str]]:
    """Copy ``sys.stdout`` and ``sys.stderr`` into ``path`` for the block (and yield the file)."""
    with open(path, "w", encoding="utf-8", errors="replace") as sink:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], sink), _Tee(saved[1], sink)
        try:
            yield sink
        finally:
            sys.stdout, sys.stderr = saved


def ray_session_dir() -> Path | None:
    """The session directory of the Ray this process is attached to (None when it is not)."""
    import ray

    if not ray.is_initialized():
        return None
    from npr_pipelines.compute import ensure_ray

    session = ensure_ray().session_dir  # attached already: returns its info, starts nothing
    return Path(session) if session else None


def new_home(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path]:
    """A fresh ``NPR_HOME`` and its ``DAGSTER_HOME`` (with ``DAGSTER_YAML``). The base model is the small
    profile's bootstrap, cached by config: every home shares the session's cache with
    ``toy_fixtures.small_toy_base`` (whichever runs first trains it, the others reuse it)."""
    home = tmp_path_factory.mktemp(name)
    shared = session_toy_cache(tmp_path_factory) / "toy_base"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "cache").mkdir()
    (home / "cache" / "toy_base").symlink_to(shared, target_is_directory=True)
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    return home, dagster_home


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallPipeline]:
    """The main job of the ``small`` profile, run once per session (about a minute on 2 idle cores)."""
    import dagster as dg

    from assets.jobs import run_main
    from npr_pipelines.compute import shutdown_ray
    from npr_pipelines.definitions import build_definitions

    home, dagster_home = new_home(tmp_path_factory, "npr-small-pipeline")
    run = SmallPipeline(home, dagster_home, {}, 0.0, None, None, dict(FAKE_SECRETS), home / "run_output.log")
    with pytest.MonkeyPatch.context() as mp:
        run.environment(mp)
        for var, value in run.secrets.items():
            mp.setenv(var, value)
        run.defs = build_definitions("small")
        run.instance = dg.DagsterInstance.from_config(str(dagster_home))
        try:
            start = time.perf_counter()
            with tee_output(run.output_log) as sink:
                run.summary = run_main(run.defs, run.instance, home, log=lambda *a: print(*a, file=sink))
            run.wall_s = time.perf_counter() - start
            run.ray_session_dir = ray_session_dir()
        except BaseException:
            run.instance.dispose()
            shutdown_ray()
            raise
    print(f"\nsmall pipeline: run_main took {run.wall_s:.1f} s ({json.dumps(run.summary['eval'])})")
    try:
        yield run
    finally:
        run.instance.dispose()
        shutdown_ray()


@pytest.fixture(scope="module")
def release_ray() -> Iterator[None]:
    """Detach this process from Ray after the module (a no-op when it is not attached)."""
    yield
    from npr_pipelines.compute import shutdown_ray

    shutdown_ray()


__all__ = ["FAKE_SECRETS", "SMALL_DEFINITIONS_FILE", "SmallPipeline", "release_ray", "small_pipeline"]
