"""The cluster profile's stage path: a training stage submitted by its asset as a Ray Job through
dagster-ray's ``PipesRayJobClient``, against a Ray head (dashboard + Jobs API) on 127.0.0.1 with token
authentication on.

The head is ``ray start --head --block`` in its own session, with its own temp dir and free ports; it is
stopped by signalling that process (never ``ray stop``, which stops every Ray on the machine). The job
runs the installed package (no ``working_dir`` upload: the head shares this filesystem) and the real
``npr_zero`` driver on the ``small`` toy profile (2 RL steps).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import pandas as pd
import psutil
import pytest
from _support import free_port

from assets.common import read_checkpoint
from assets.configs import stage_configs
from assets.data import _problems_frame, frame_version
from assets.training import npr_zero_policy
from npr_pipelines.compute.stage_job import (
    DRIVERS,
    ENTRYPOINT_MODULE,
    TAG_RAY_JOB,
    StageSpec,
    config_json,
    get_driver,
    stage_runtime_env,
)
from npr_pipelines.storage import Storage
from npr_pipelines.storage.checkpoints import checkpoint_ref, publish_checkpoint
from npr_pipelines.toy.bootstrap import bootstrap_base_model
from npr_pipelines.toy.problems import TRAIN
from npr_pipelines.toy.profiles import SMALL
from resources import MlflowResource, PipelineSettings, RayResource, StorageResource

try:
    from toy_fixtures import toy_cache_dir
except ImportError:  # tests/ imported as a package
    from tests.toy_fixtures import toy_cache_dir  # noqa: F401

LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1"}


# ------------------------------------------------------------------------------ no cluster needed
def test_runtime_env_uploads_nothing_unless_asked() -> None:
    env = stage_runtime_env(env_vars={"MLFLOW_RUN_ID": "abc"})
    assert env == {"env_vars": {"MLFLOW_RUN_ID": "abc"}}  # no working_dir, no py_modules: no upload


def test_runtime_env_working_dir_is_code_only(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _zip_files

    files = {
        "npr_pipelines/__init__.py": "",
        "npr_pipelines/data/problems.py": "",  # code in a directory named like a data dir
        "assets/training.py": "",
        "pyproject.toml": "",
        ".npr/artifacts/checkpoints/npr-000001/model.safetensors": "w",
        ".npr/mlflow.db": "",
        ".venv/lib/site.py": "",
        ".git/HEAD": "",
        "data/train.jsonl": "",
        "work/npr_zero/k/checkpoints/step-000001/model.safetensors": "w",
        "notes/model.safetensors": "w",
        "npr_pipelines/__pycache__/x.cpython-311.pyc": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = stage_runtime_env(working_dir=tmp_path)
    assert env["working_dir"] == str(tmp_path.resolve())
    # Package it the way Ray does for an upload, and look at what would travel.
    zipped = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), env["excludes"], str(zipped), include_gitignore=True)
    with zipfile.ZipFile(zipped) as z:
        uploaded = {n for n in z.namelist() if not n.endswith("/")}
    assert uploaded == {
        "npr_pipelines/__init__.py",
        "npr_pipelines/data/problems.py",
        "assets/training.py",
        "pyproject.toml",
    }


def test_runtime_env_refuses_secrets() -> None:
    for name in ("MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "HF_TOKEN", "API_KEY"):
        with pytest.raises(ValueError, match="secret"):
            stage_runtime_env(env_vars={name: "x"})
    with pytest.raises(ValueError, match="not a directory"):
        stage_runtime_env(working_dir="/nonexistent/npr")


def test_every_stage_config_round_trips_through_the_spec() -> None:
    configs = stage_configs("small")
    by_stage = {"npr_zero": "npr_zero", "npr": "papo", "sr": "sr", "npr_beta": "sft", "sr_beta": "sft"}
    assert set(by_stage.values()) == set(DRIVERS)
    for stage, driver in by_stage.items():
        values = json.loads(json.dumps(config_json(configs[stage])))  # as it travels in the Pipes extras
        assert get_driver(driver).make_config(values) == configs[stage], stage
    changed = {**config_json(configs["npr_zero"]), "not_a_field": 1}
    with pytest.raises(ValueError, match="round-trip"):
        get_driver("npr_zero").make_config(changed)


def test_spec_from_extras_is_strict() -> None:
    spec = StageSpec(
        stage="npr_zero", driver="npr_zero", run_key="k", config={}, init_uri="/a", data_uri="/b",
        storage_uri="/c", tracking_uri="sqlite:///x.db", mlflow_run_id="r",
    )  # fmt: skip
    assert StageSpec.from_extras(json.loads(json.dumps(spec.to_extras()))) == spec
    with pytest.raises(ValueError, match="unknown stage spec fields"):
        StageSpec.from_extras({**spec.to_extras(), "pickle_path": "/x.pkl"})
    with pytest.raises(KeyError, match="unknown stage driver"):
        StageSpec.from_extras({**spec.to_extras(), "driver": "os:system"})


# ------------------------------------------------------------------------------------ Ray head
@dataclass
class RayHead:
    url: str
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the Jobs API answers (401 without a token: it is up, and auth is on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the Ray head did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@pytest.fixture(scope="module")
def ray_head_process(tmp_path_factory) -> Iterator[RayHead]:
    """A Ray head started (not yet waited for) for this module: dashboard and Jobs API on 127.0.0.1."""
    root = tmp_path_factory.mktemp("ray-head")
    # A short temp dir: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
    temp_dir = Path("/tmp") / f"npr-ray-{os.getpid()}-{root.name[-6:]}"
    ports = {
        name: free_port()
        for name in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                     "node-manager-port", "object-manager-port")
    }  # fmt: skip
    # No RAY_AUTH_MODE: a new head turns token authentication on by default (asserted below).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    log = root / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(url=f"http://127.0.0.1:{ports['dashboard-port']}", proc=proc, log=log)
    try:
        yield head
    finally:
        procs = head.processes()
        proc.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        _, alive = psutil.wait_procs(procs, timeout=30)
        for p in alive:  # only processes of this head, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.fixture(scope="module")
def small_base(ray_head_process: RayHead, toy_cache_dir: Path) -> Path:
    """The ``small`` toy base model (bootstrapped while the head starts; a cache hit after other tests)."""
    return bootstrap_base_model(replace(SMALL.bootstrap, cache_dir=str(toy_cache_dir)))


@pytest.fixture(scope="module")
def ray_head(ray_head_process: RayHead, small_base: Path) -> RayHead:
    ray_head_process.wait_ready()
    return ray_head_process


def _listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_head_is_loopback_only_with_token_auth(ray_head: RayHead) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.url}/api/jobs/", timeout=10)
    assert err.value.code == 401  # the Jobs API refuses a client without the token
    deadline = time.monotonic() + 60  # the raylet can open its listeners after the Jobs API answers
    while True:
        sockets = _listeners(ray_head.processes())
        if {"gcs_server", "raylet"} <= {name for name, _, _ in sockets} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
    assert int(ray_head.url.rsplit(":", 1)[1]) in {port for _, _, port in sockets}
    assert [s for s in sockets if s[1] not in LOOPBACK_IPS] == []


# ---------------------------------------------------------------------------- the stage as a job
@dataclass
class StageRunResult:
    result: dg.ExecuteInProcessResult
    instance: dg.DagsterInstance
    store: Storage
    tracking_uri: str
    elapsed_s: float


def _materialize_npr_zero(
    root: Path, base_dir: Path, ray: RayResource, *, broken_base: bool = False
) -> StageRunResult:
    """Materialize ``npr_zero_policy`` (small profile) from stub upstreams, all state under ``root``;
    ``broken_base`` points the base reference at a directory that was never published."""
    store = Storage(str(root / "artifacts"))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    problems = _problems_frame(TRAIN, 16, 0, SMALL)
    uri, version = publish_checkpoint(store, "base", "small", 0, base_dir)
    if broken_base:
        uri = store.uri("checkpoints", "base", "never-published")
    base_ref = checkpoint_ref(stage="base", step=0, uri=uri, data_version=version, run_id=None)

    @dg.asset(name="base_model")
    def base_stub() -> dg.Output[dict]:
        return dg.Output(base_ref, data_version=dg.DataVersion(version))

    @dg.asset(name="train_problems")
    def problems_stub() -> dg.Output[pd.DataFrame]:
        return dg.Output(problems, data_version=dg.DataVersion(frame_version(problems)))

    instance = dg.DagsterInstance.ephemeral()
    start = time.monotonic()
    result = dg.materialize_to_memory(
        [base_stub, problems_stub, npr_zero_policy],
        instance=instance,
        resources={
            "settings": PipelineSettings(profile="small", home=str(root / "home")),
            "storage": StorageResource(base_uri=store.base_uri),
            "mlflow": MlflowResource(tracking_uri=tracking_uri, ui_url=""),
            "ray": ray,
        },
        raise_on_error=not broken_base,
    )
    return StageRunResult(result, instance, store, tracking_uri, time.monotonic() - start)


def _cluster_profile(head: RayHead, root: Path) -> RayResource:
    return RayResource(
        job_submission_address=head.url,
        num_cpus=1,
        job_python=sys.executable,  # the head shares this filesystem: nothing is uploaded
        job_work_dir=str(root / "job-work"),
    )


@pytest.fixture(scope="module")
def job_run(ray_head: RayHead, small_base: Path, tmp_path_factory) -> StageRunResult:
    """``npr_zero_policy`` materialized in the cluster profile: a Ray Job on the head, through Pipes."""
    root = tmp_path_factory.mktemp("job-run")
    run = _materialize_npr_zero(root, small_base, _cluster_profile(ray_head, root))
    print(f"\nnpr_zero through PipesRayJobClient: {run.elapsed_s:.1f} s")
    return run


def test_training_stage_runs_as_a_ray_job_through_pipes(
    job_run: StageRunResult, ray_head: RayHead, small_base: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    from transformers import AutoModelForCausalLM

    result, store = job_run.result, job_run.store
    assert result.success
    ref = result.output_for_node("npr_zero_policy")
    config = stage_configs("small")["npr_zero"]

    # The returned checkpoint: published (manifest verified) in storage, indexed, registered, loadable.
    assert ref["step"] == config.steps and ref["partition"] == f"npr_zero-{config.steps:06d}"
    assert ref["uri"].startswith(store.uri("checkpoints", "npr_zero"))
    store.verify_dir(ref["uri"])
    assert read_checkpoint(store, ref["partition"])["uri"] == ref["uri"]
    assert job_run.instance.has_dynamic_partition("checkpoints", ref["partition"])
    local = tmp_path / "fetched"
    store.fetch_dir(ref["uri"], local)
    trained = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=False, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(small_base, trust_remote_code=False, use_safetensors=True)
    changed = [n for n, p in trained.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert changed, "the published checkpoint equals the base model: the job did not train"

    # The MLflow run: the asset's own stage run, which the job logged its steps into.
    client = MlflowClient(tracking_uri=job_run.tracking_uri)
    run = client.get_run(ref["mlflow_run_id"])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["npr.stage"], tags["dagster.asset_key"], tags["dagster.run_id"]) == (
        "npr_zero",
        "npr_zero_policy",
        result.run_id,
    )
    stage_runs = client.search_runs([run.info.experiment_id], "tags.`npr.kind` = 'stage'")
    assert [r.info.run_id for r in stage_runs] == [run.info.run_id]  # the job opened no run of its own
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted(m.step for m in history) == list(range(1, config.steps + 1))
    assert "final_reward_mean" in run.data.metrics and "wall_s_this_call" in run.data.metrics

    # The Ray job: the one tagged on the run; it succeeded, and nothing was uploaded with it.
    materialization = result.asset_materializations_for_node("npr_zero_policy")[0]
    assert materialization.metadata["uri"].value == ref["uri"]
    job_id = materialization.metadata["ray_job_id"].value
    assert tags[TAG_RAY_JOB] == job_id  # set by the job itself, from inside the cluster
    info = JobSubmissionClient(ray_head.url).get_job_info(job_id)  # token from Ray's own sources
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == f"{sys.executable} -m {ENTRYPOINT_MODULE}"
    assert not {"working_dir", "py_modules"} & set(info.runtime_env or {})
    assert info.runtime_env["env_vars"]["MLFLOW_RUN_ID"] == run.info.run_id
    print(f"Ray job {job_id}: {(info.end_time - info.start_time) / 1000:.1f} s on the head")


@pytest.mark.slow  # a second job (~15 s)
def test_a_failing_job_fails_the_asset_and_its_mlflow_run(
    ray_head: RayHead, small_base: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    run = _materialize_npr_zero(tmp_path, small_base, _cluster_profile(ray_head, tmp_path), broken_base=True)
    assert not run.result.success
    (failure,) = [e for e in run.result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "npr_zero_policy"
    error = failure.step_failure_data.error.to_string()
    assert "failed with status FAILED" in error  # the job's fate, not only what Pipes heard
    assert "never-published" in error  # with the job's own error
    client = MlflowClient(tracking_uri=run.tracking_uri)
    (stage_run,) = client.search_runs(
        [client.get_experiment_by_name("npr-pipelines").experiment_id], "tags.`npr.kind` = 'stage'"
    )
    assert stage_run.info.status == "FAILED"
    jobs = JobSubmissionClient(ray_head.url)
    (job,) = [j for j in jobs.list_jobs() if (j.metadata or {}).get("dagster/run-id") == run.result.run_id]
    assert job.status == JobStatus.FAILED
    assert "never-published" in jobs.get_job_logs(job.submission_id)  # the job's own error, in its log
    assert not run.store.exists("checkpoints/npr_zero")


@pytest.mark.slow  # starts a second (in-process) Ray: ~20 s more
def test_local_ray_task_path_trains_the_same_weights(
    job_run: StageRunResult, small_base: Path, tmp_path: Path
) -> None:
    """The embedded path (a Ray task in this process's local Ray) and the job path train the same
    thing: the config and the data survive the trip through the Pipes extras and storage."""
    from npr_pipelines.compute import local_ray

    with local_ray(num_cpus=1, log_to_driver=False):
        local = _materialize_npr_zero(tmp_path, small_base, RayResource(num_cpus=1))
    assert local.result.success
    ref_local = local.result.output_for_node("npr_zero_policy")
    ref_job = job_run.result.output_for_node("npr_zero_policy")
    meta = local.result.asset_materializations_for_node("npr_zero_policy")[0].metadata
    assert "ray_job_id" not in meta
    assert (
        meta["run_key"].value
        == job_run.result.asset_materializations_for_node("npr_zero_policy")[0].metadata["run_key"].value
    )
    weights = [
        s.read_manifest(r["uri"]).files["model.safetensors"].sha256
        for s, r in ((local.store, ref_local), (job_run.store, ref_job))
    ]
    assert weights[0] == weights[1]
