"""Local Ray bootstrap: loopback-only listeners, token authentication on, tasks and actors work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from npr_pipelines.compute import RayInfo, ensure_ray, local_ray
from npr_pipelines.compute.ray_local import _init_kwargs, _target_address

ray = pytest.importorskip("ray")

LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1"}  # gRPC servers bind dual-stack sockets (IPv4-mapped)


def ray_processes() -> list[psutil.Process]:
    """This driver plus everything it spawned (GCS, raylet, agents, workers)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def listening_sockets(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # idle workers come and go
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


@pytest.fixture(scope="module")
def ray_info() -> Iterator[RayInfo]:
    from ray._private import ray_constants

    flag_before = (os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER)
    with local_ray(num_cpus=2, log_to_driver=False) as info:
        children = psutil.Process().children(recursive=True)
        yield info
    # Teardown checks: the cluster's processes are gone and the loopback override is undone.
    assert not ray.is_initialized()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], alive
    assert (
        os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
        ray_constants.ENABLE_RAY_CLUSTER,
    ) == flag_before


def test_task_and_actor_round_trip(ray_info: RayInfo) -> None:
    @ray.remote
    def square(x: int) -> tuple[int, str]:
        return x * x, ray.util.get_node_ip_address()

    @ray.remote
    class Counter:
        def __init__(self, start: int) -> None:
            self.value = start

        def add(self, n: int) -> int:
            self.value += n
            return self.value

    assert ray.get([square.remote(i) for i in range(4)]) == [(i * i, "127.0.0.1") for i in range(4)]
    counter = Counter.remote(10)
    assert ray.get([counter.add.remote(1), counter.add.remote(2)]) == [11, 13]
    assert ray.get(ray.put({"a": [1, 2]})) == {"a": [1, 2]}


def test_node_ip_is_loopback(ray_info: RayInfo) -> None:
    assert ray_info.node_ip == "127.0.0.1"
    assert ray_info.address.startswith("127.0.0.1:")
    assert ray_info.started_locally and ray_info.namespace == "npr"
    assert ray_info.dashboard_url is None
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    assert "node:127.0.0.1" in ray.cluster_resources()
    assert ray.cluster_resources()["CPU"] == 2


def test_every_ray_listener_is_on_loopback(ray_info: RayInfo) -> None:
    sockets = listening_sockets(ray_processes())
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check is not vacuous
    assert int(ray_info.address.rsplit(":", 1)[1]) in {port for _, _, port in sockets}
    exposed = [s for s in sockets if s[1] not in LOOPBACK_IPS]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"


def _auth_token() -> str:
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def test_token_authentication_is_enforced(ray_info: RayInfo) -> None:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    assert ray_info.token_auth
    assert os.environ["RAY_AUTH_MODE"] == "token"  # inherited by the raylet, workers and Jobs clients
    token = _auth_token()
    assert len(token) >= 32

    # A raw gRPC client (no Ray interceptor) is refused without the token and served with it.
    with grpc.insecure_channel(ray_info.address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetAllNodeInfoRequest()
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAllNodeInfo(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAllNodeInfo(
                request, timeout=10, metadata=[("authorization", "Bearer " + "0" * len(token))]
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetAllNodeInfo(request, timeout=10, metadata=[("authorization", f"Bearer {token}")])
        assert [n.node_manager_address for n in reply.node_info_list] == ["127.0.0.1"]


CONNECT_SCRIPT = """
import json, sys
import ray
from npr_pipelines.compute import ensure_ray, shutdown_ray
info = ensure_ray(sys.argv[1], num_cpus=64)  # num_cpus must be dropped when connecting
value = ray.get(ray.remote(lambda: 41 + 1).remote())
print(json.dumps({"info": info.__dict__, "value": value}))
shutdown_ray()
"""


def test_another_process_connects_by_loopback_address(ray_info: RayInfo) -> None:
    # A second driver (e.g. a Dagster code server) attaching by address: without the loopback flag
    # Ray would rewrite 127.0.0.1 to eth0's IP; without a token the GCS would refuse it.
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    done = subprocess.run(
        [sys.executable, "-c", CONNECT_SCRIPT, ray_info.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["value"] == 42
    info = result["info"]
    assert info["address"] == ray_info.address and info["node_ip"] == "127.0.0.1"
    assert info["started_locally"] is False and info["token_auth"] is True


def test_ensure_ray_is_idempotent(ray_info: RayInfo) -> None:
    start = time.monotonic()
    assert ensure_ray() is ray_info
    assert ensure_ray(num_cpus=1, namespace="other") is ray_info
    assert time.monotonic() - start < 1


def test_init_kwargs_local_and_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    common = dict(namespace="npr", include_dashboard=False, dashboard_port=None, runtime_env=None, extra={})
    local = _init_kwargs(None, num_cpus=2, **common)
    assert local["address"] == "local" and local["num_cpus"] == 2
    assert local["_node_ip_address"] == local["dashboard_host"] == "127.0.0.1"
    assert local["include_dashboard"] is False

    remote = _init_kwargs("10.0.0.5:6379", num_cpus=2, **{**common, "include_dashboard": True})
    assert remote == {"namespace": "npr", "address": "10.0.0.5:6379"}  # never num_cpus when connecting

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert _target_address(None) == "10.0.0.5:6379"
    assert _target_address("local") is None  # local_ray ignores RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    assert _target_address(None) is None
