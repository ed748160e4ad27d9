"""The cluster profile end to end: the ``small`` toy pipeline on a Ray cluster of three nodes simulated on
this machine (a head and two worker nodes, every one on 127.0.0.1, token authentication on).

The head is ``ray start --head --block`` (dashboard and Jobs API on 127.0.0.1); each worker node is
``ray start --block --address <head> --node-ip-address 127.0.0.1`` through ``tests/ray_worker_start.py``
(the CLI refuses a worker node under the loopback flag; see there), with its own temp dir and ports.
Every node has 2 logical CPUs. All of them are stopped at the end, pass or fail, by signalling the
processes this module started (never ``ray stop``, which would stop every Ray on the machine).

The pipeline runs the way ``npr run`` does (``assets.jobs.run_main``) with the Ray resource in the
cluster profile: every training stage is a Ray Job submitted through dagster-ray Pipes; inside it SFT
trains with DeepSpeed ZeRO-2 on 2 Ray actors placed ``STRICT_SPREAD`` (two distinct nodes) and the RL
stages roll out on 2 engine replicas (``STRICT_SPREAD`` too) whose weights follow the trainer; rejection
sampling and evaluation are Ray tasks on the same cluster, the evaluation decoding on 2 engine
replicas. The test asserts the same assets and the same ``summary.json`` keys as the embedded run
(``test_pipeline``'s contract), the placement (node ids, world size, replica request counts), and that
every final checkpoint reloads to the weights its job reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from _support import free_port
from pipeline_fixtures import FOREIGN_ENV, new_home
from test_pipeline import DESIGN_EVAL_FIELDS, DESIGN_STAGE_FIELDS, DESIGN_STAGES, STAGE_ASSETS

pytestmark = pytest.mark.slow  # ~3-5 minutes on 2 shared cores

TESTS = Path(__file__).resolve().parent
NODE_CPUS = 2
#: Training stages: their asset, and what their job spreads over the cluster.
SFT_STAGES = {"npr_beta": "npr_beta_checkpoint", "sr_beta": "sr_beta_checkpoint"}
RL_STAGES = {"npr_zero": "npr_zero_policy", "npr": "npr_policy", "sr": "sr_policy"}


def _node_ports() -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")  # fmt: skip
    return [f"--{name}={free_port()}" for name in names]


@dataclass
class LocalCluster:
    """A head and worker nodes on 127.0.0.1, each a ``ray start --block`` process of its own session."""

    gcs_address: str
    dashboard_url: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str], log: Path, temp_dir: Path) -> None:
        self.logs.append(log)
        self.temp_dirs.append(temp_dir)
        with open(log, "w") as out:
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in self.logs if log.exists())

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"{log.stem} exited ({proc.returncode}):\n{self.tail()}")

    def stop(self) -> None:
        """Workers first, then the head; each ``--block`` process stops what it started (SIGTERM), and
        whatever of theirs is still alive after that is killed by pid."""
        for proc in reversed(self.procs):
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(tree, timeout=40)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(alive, timeout=10)
        for temp_dir in self.temp_dirs:
            subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _wait_for_dashboard(cluster: LocalCluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        try:
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401: up, with token auth on
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the head's Jobs API did not come up in {timeout} s:\n{cluster.tail()}")


def _wait_for_nodes(cluster: LocalCluster, count: int, timeout: float = 120) -> list[str]:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return alive
        time.sleep(0.5)
    pytest.fail(f"{count} nodes did not join in {timeout} s:\n{cluster.tail()}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Head + 2 worker nodes on 127.0.0.1; this process attached to it as a driver."""
    from npr_pipelines.compute import ensure_ray, shutdown_ray

    shutdown_ray()  # a Ray another module left attached would be reused instead of this cluster
    root = tmp_path_factory.mktemp("ray-cluster")
    tag = f"{os.getpid()}-{root.name[-4:]}"  # short temp dirs: Ray's socket paths must fit AF_UNIX's limit
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = LocalCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", *FOREIGN_ENV)}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats",
              "--object-store-memory=300000000"]  # fmt: skip
    try:
        # No RAY_AUTH_MODE: a new head turns token authentication on (its token: ~/.ray/auth_token).
        head_dir = Path("/tmp") / f"npr-rc-{tag}-h"
        cluster.start(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", *common, f"--port={gcs_port}",
             f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={head_dir}", *_node_ports()],
            env, root / "head.log", head_dir,
        )  # fmt: skip
        _wait_for_dashboard(cluster)
        worker_env = {**env, "RAY_AUTH_MODE": "token"}  # a joining node presents the head's token
        for i in (1, 2):
            node_dir = Path("/tmp") / f"npr-rc-{tag}-w{i}"
            cluster.start(
                [sys.executable, str(TESTS / "ray_worker_start.py"), "start", *common,
                 f"--address={cluster.gcs_address}", f"--temp-dir={node_dir}", *_node_ports()],
                worker_env, root / f"worker{i}.log", node_dir,
            )  # fmt: skip
        ensure_ray(cluster.gcs_address)
        _wait_for_nodes(cluster, 3)
        yield cluster
    finally:
        shutdown_ray()
        cluster.stop()


@dataclass
class ClusterRun:
    home: Path
    summary: dict[str, Any]
    wall_s: float
    instance: Any
    nodes: list[str]
    dashboard_url: str

    def materialization(self, asset: str) -> Any:
        event = self.instance.get_latest_materialization_event(_key(asset))
        assert event is not None, f"{asset} was not materialized"
        return event.asset_materialization

    def result(self, asset: str) -> dict[str, Any]:
        """The stage job's result (history, metrics, final checkpoint), as it wrote it to storage."""
        from npr_pipelines.compute.stage_job import result_uri
        from npr_pipelines.storage import Storage

        meta = self.materialization(asset).metadata
        stage = meta["checkpoint"].value.rsplit("-", 1)[0]
        return Storage(str(self.home / "artifacts")).read_json(result_uri(stage, meta["run_key"].value))


def _key(asset: str) -> Any:
    import dagster as dg

    return dg.AssetKey(asset)


@pytest.fixture(scope="module")
def cluster_run(ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRun]:
    """The main job of the ``small`` profile in the cluster profile (``run_main``, as ``npr run``)."""
    import dagster as dg
    import ray

    from assets.jobs import run_main
    from npr_pipelines.definitions import build_definitions
    from resources import RayResource

    home, dagster_home = new_home(tmp_path_factory, "npr-cluster-run")
    ray_resource = RayResource(
        address=ray_cluster.gcs_address,  # rejection sampling and evaluation: Ray tasks on the cluster
        num_cpus=1,
        job_submission_address=ray_cluster.dashboard_url,
        job_python=sys.executable,  # the nodes share this filesystem: nothing is uploaded
        job_work_dir=str(home / "job-work"),
        compute="cluster",
        train_workers=2,
        zero_stage=2,
        placement_strategy="STRICT_SPREAD",
        engine_replicas=2,
        engine_placement_strategy="STRICT_SPREAD",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NPR_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        mp.setenv("NPR_PROFILE", "small")
        for var in FOREIGN_ENV:
            mp.delenv(var, raising=False)
        defs = build_definitions("small", ray=ray_resource)
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        try:
            start = time.perf_counter()
            summary = run_main(defs, instance, home)
            wall = time.perf_counter() - start
            print(f"\ncluster profile: run_main took {wall:.1f} s ({json.dumps(summary['timing'])})")
            nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            yield ClusterRun(home, summary, wall, instance, nodes, ray_cluster.dashboard_url)
        finally:
            instance.dispose()


def test_same_assets_and_summary_keys_as_the_embedded_run(cluster_run: ClusterRun) -> None:
    from assets import ALL_ASSETS
    from assets.data import TOY_BENCHMARK

    written = json.loads((cluster_run.home / "summary.json").read_text())
    assert written == cluster_run.summary
    # test_pipeline's contract for the embedded run (DESIGN.md), key for key
    assert set(written) == {"wall_time_s", "eval", "stages", "timing", "machine"}
    assert set(written["eval"]) == DESIGN_EVAL_FIELDS
    assert set(written["stages"]) == DESIGN_STAGES
    for stage, entry in written["stages"].items():
        assert set(entry) == DESIGN_STAGE_FIELDS, stage
        assert 0.0 <= entry["accuracy"] <= 1.0, stage
    # every asset of the graph materialized, and each stage's final checkpoint evaluated
    for asset in ALL_ASSETS:
        for key in asset.keys:
            assert cluster_run.instance.get_latest_materialization_event(key) is not None, key
    for stage, asset in STAGE_ASSETS.items():
        ckpt = cluster_run.materialization(asset).metadata["checkpoint"].value
        assert ckpt == stage or ckpt.startswith(f"{stage}-"), ckpt  # "base", "<stage>-<step:06d>"
        scores = cluster_run.instance.get_materialized_partitions(_key("benchmark_scores"))
        assert f"{TOY_BENCHMARK}|{ckpt}" in scores, (stage, sorted(scores))  # dimensions in name order


def test_training_stages_ran_as_ray_jobs(cluster_run: ClusterRun) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from npr_pipelines.compute import enable_jobs_client_auth

    enable_jobs_client_auth()
    client = JobSubmissionClient(cluster_run.dashboard_url)
    for asset in (*SFT_STAGES.values(), *RL_STAGES.values()):
        job_id = cluster_run.materialization(asset).metadata["ray_job_id"].value
        info = client.get_job_info(job_id)
        assert info.status == JobStatus.SUCCEEDED, (asset, info.message)
        assert not {"working_dir", "py_modules"} & set(info.runtime_env or {})  # nothing uploaded


def test_deepspeed_sft_spans_two_nodes(cluster_run: ClusterRun) -> None:
    for stage, asset in SFT_STAGES.items():
        result = cluster_run.result(asset)
        strategy = result["metrics"]["strategy"]
        assert (strategy["kind"], strategy["world_size"], strategy["zero_stage"]) == ("deepspeed", 2, 2), (
            stage
        )
        assert strategy["placement_strategy"] == "STRICT_SPREAD"
        assert len(set(strategy["node_ids"])) == 2, strategy  # world size 2 on two distinct Ray nodes
        assert set(strategy["node_ids"]) <= set(cluster_run.nodes)
        assert result["final_step"] == len(result["history"]) > 0
        assert all(h["loss"] > 0 for h in result["history"])


def test_rollouts_on_two_engine_replicas(cluster_run: ClusterRun) -> None:
    synced = 0
    for stage, asset in RL_STAGES.items():
        result = cluster_run.result(asset)
        metrics, pool = result["metrics"], result["metrics"]["engine_pool"]
        assert pool["replica_ids"] == [0, 1], stage
        assert len(set(pool["node_ids"])) == 2 and set(pool["node_ids"]) <= set(cluster_run.nodes), pool
        assert min(pool["requests"]) > 0, pool  # both replicas decoded rollouts
        assert sum(pool["requests"]) == metrics["rollouts"], pool
        # One sync after every update (a step whose rollouts were all filtered out updates nothing).
        updates = sum(not h.get("skipped") for h in result["history"])
        assert pool["weight_version"] == updates, (stage, result["history"])
        assert pool["weights_sha256"] == [metrics["weights_sha256"]] * 2  # replicas hold the final policy
        synced += updates
    assert synced > 0  # the toy's PAPO may keep nothing; NPR-Zero and SR update every step


def test_evaluation_on_two_engine_replicas(cluster_run: ClusterRun) -> None:
    import dagster as dg

    from assets.data import TOY_BENCHMARK

    for asset in STAGE_ASSETS.values():
        ckpt = cluster_run.materialization(asset).metadata["checkpoint"].value
        key = dg.MultiPartitionKey({"checkpoint": ckpt, "benchmark": TOY_BENCHMARK})
        event = cluster_run.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=_key("benchmark_scores"), asset_partitions=[key]), limit=1
        ).records[0]
        pool = event.asset_materialization.metadata["engine_pool"].value
        assert pool["replica_ids"] == [0, 1] and len(set(pool["node_ids"])) == 2, (ckpt, pool)
        assert min(pool["requests"]) > 0, (ckpt, pool)


def _reload_digests(cluster_run: ClusterRun, asset: str, tmp_path: Path) -> tuple[str, str]:
    """Digests of the published final checkpoint reloaded by ``from_pretrained`` and by the torch strategy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from npr_pipelines.storage import Storage
    from npr_pipelines.storage.weights import state_digest
    from npr_pipelines.training.strategy import OptimizerConfig, TorchStrategy

    store = Storage(str(cluster_run.home / "artifacts"))
    uri = cluster_run.materialization(asset).metadata["uri"].value
    local = tmp_path / asset
    store.fetch_dir(uri, local)  # manifest-verified
    loaded = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32, use_safetensors=True)
    strategy = TorchStrategy()
    strategy.setup(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local)), OptimizerConfig())
    strategy.load(local, weights_only=True)
    return state_digest(loaded.state_dict()), state_digest(strategy.unwrap().state_dict())


def test_final_checkpoints_reload_to_the_reported_weights(cluster_run: ClusterRun, tmp_path: Path) -> None:
    for asset in SFT_STAGES.values():
        reported = cluster_run.result(asset)["metrics"]["strategy"]["weights_sha256"]
        assert reported and _reload_digests(cluster_run, asset, tmp_path) == (reported, reported), asset
    for asset in RL_STAGES.values():
        reported = cluster_run.result(asset)["metrics"]["weights_sha256"]
        assert _reload_digests(cluster_run, asset, tmp_path) == (reported, reported), asset
