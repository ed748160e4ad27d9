"""Ray bootstrap: connect to a cluster, or start a local one bound to 127.0.0.1 with token auth on.

Two Ray 2.60 behaviours shape this module (see spec/platform.md §4):

- Node IP: on Linux Ray uses the default interface's address as the node IP even for a local
  ``ray.init()``, and rewrites ``_node_ip_address="127.0.0.1"`` to it. With
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it keeps loopback, and every Ray listener (GCS, raylet,
  agents, workers) binds 127.0.0.1. That flag is read when ``ray`` is imported, so it is also patched
  on the already-imported module.
- Token authentication is on by default for new clusters: ``ray.init`` writes ``~/.ray/auth_token``
  (if missing) and sets ``RAY_AUTH_MODE=token`` in this process, so the driver and every process it
  spawns (raylet, workers, hence tasks and actors) authenticate. We keep it on: a stray
  ``RAY_AUTH_MODE=disabled`` is dropped (with a warning) before a local start.

Clients in OTHER processes must opt in to send the token: set ``RAY_AUTH_MODE=token`` and make the
token readable (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``). This applies to
the Jobs API (``JobSubmissionClient``, dagster-ray's ``PipesRayJobClient``, ``ray job submit``), to the
dashboard's HTTP API (401 without it) and to plain ``ray.init(address=...)``. Within this process the
variable is already set after a local start, and `ensure_ray` with a loopback address (another
driver on this machine) sets the flag and enables token mode itself when a token file exists, as Ray
does for clusters it auto-detects. ``RAY_AUTH_MODE=token`` stays set after `shutdown_ray` (Ray caches
the mode in-process, so restoring the variable would only make them disagree).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_CLUSTER_FLAG_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_USAGE_STATS_VAR = "RAY_USAGE_STATS_ENABLED"
_AUTH_MODE_VAR = "RAY_AUTH_MODE"


@dataclass(frozen=True)
class RayInfo:
    """What a driver needs to know about the Ray it is attached to."""

    address: str
    """GCS address (``host:port``), usable as ``RAY_ADDRESS`` by other drivers on this machine."""
    node_ip: str
    namespace: str
    started_locally: bool
    """True when `ensure_ray` started this cluster in-process (it dies with `shutdown_ray`)."""
    token_auth: bool
    dashboard_url: str | None = None
    session_dir: str | None = None


_lock = threading.RLock()
_info: RayInfo | None = None
_saved_env: dict[str, str | None] | None = None
_saved_cluster_flag: bool | None = None


def _target_address(address: str | None) -> str | None:
    """The cluster to connect to (argument, else ``RAY_ADDRESS``), or None to start a local one."""
    target = address or os.environ.get("RAY_ADDRESS") or None
    return None if target == "local" else target


def _init_kwargs(
    target: str | None,
    *,
    num_cpus: int | None,
    namespace: str,
    include_dashboard: bool,
    dashboard_port: int | None,
    runtime_env: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (pure: no side effects)."""
    kwargs: dict[str, Any] = {"namespace": namespace, **extra}
    if runtime_env is not None:
        kwargs["runtime_env"] = runtime_env
    if target is not None:
        # Ray rejects num_cpus (and other resource settings) when attaching to an existing cluster.
        ignored = [
            name
            for name, value in (
                ("num_cpus", num_cpus),
                ("dashboard_port", dashboard_port),
                ("include_dashboard", include_dashboard or None),
            )
            if value is not None
        ]
        if ignored:
            logger.info(
                "connecting to Ray at %s: ignoring %s (the cluster's own settings apply)", target, ignored
            )
        kwargs["address"] = target
        return kwargs
    # "local" always starts a new cluster; None would attach to one started by `ray start`.
    kwargs.update(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
    )
    if dashboard_port is not None:
        kwargs["dashboard_port"] = dashboard_port
    return kwargs


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _use_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this node's IP (in this process and the processes it spawns)."""
    global _saved_env, _saved_cluster_flag
    from ray._private import ray_constants

    if _saved_env is None:
        _saved_env = {var: os.environ.get(var) for var in (_CLUSTER_FLAG_VAR, _USAGE_STATS_VAR)}
        _saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_FLAG_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _prepare_local_start() -> None:
    _use_loopback()
    os.environ[_USAGE_STATS_VAR] = "0"
    mode = os.environ.pop(_AUTH_MODE_VAR, None)
    # With the variable unset, ray.init enables token mode itself AND refreshes its cached config;
    # setting "token" ourselves would skip that refresh and could leave the driver without a token.
    if mode is not None and mode.lower() != "token":
        logger.warning(
            "ignoring %s=%s: local Ray clusters keep token authentication on", _AUTH_MODE_VAR, mode
        )


def _prepare_loopback_connect() -> None:
    # Without the flag, ray.init rewrites 127.0.0.1 in the address to eth0's IP and never connects.
    _use_loopback()
    if _AUTH_MODE_VAR in os.environ:
        return
    # Ray auto-enables token auth only for clusters it finds itself (address None/"auto"); a cluster
    # on this machine uses this machine's token, so do the same for an explicit loopback address.
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # pragma: no cover - other Ray versions
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _restore_env() -> None:
    global _saved_env, _saved_cluster_flag
    if _saved_env is None:
        return
    for var, value in _saved_env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    from ray._private import ray_constants

    if _saved_cluster_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = _saved_cluster_flag
    _saved_env, _saved_cluster_flag = None, None


def token_auth_enabled() -> bool:
    """Whether this process's Ray runs in token-authentication mode."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # pragma: no cover - minimal Ray builds
        return os.environ.get(_AUTH_MODE_VAR, "").lower() == "token"
    return get_authentication_mode() == AuthenticationMode.TOKEN


def enable_jobs_client_auth() -> bool:
    """Make this process's Ray Jobs clients (``JobSubmissionClient``, ``PipesRayJobClient``) send the
    cluster's token, and return whether they will.

    An explicit ``RAY_AUTH_MODE`` is respected. Unset, token mode is turned on when a token is available
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), as Ray does for clusters it
    finds itself; Ray reads the token, this module never does.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            _enable_token_auth,
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # pragma: no cover - other Ray versions
        return token_auth_enabled()
    mode = os.environ.get(_AUTH_MODE_VAR)
    if mode is None:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    elif mode.lower() == "token" and not token_auth_enabled():
        _enable_token_auth()  # set after Ray cached its config: refresh it
    return token_auth_enabled()


def _describe(context: Any | None, *, started_locally: bool, fallback_address: str | None) -> RayInfo:
    import ray

    runtime = ray.get_runtime_context()
    address_info = dict(getattr(context, "address_info", None) or {})
    try:
        address = runtime.gcs_address
    except Exception:  # Ray Client sessions have no GCS address locally
        address = address_info.get("address") or fallback_address or ""
    dashboard = getattr(context, "dashboard_url", None) or None
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    return RayInfo(
        address=address,
        node_ip=address_info.get("node_ip_address") or ray.util.get_node_ip_address(),
        namespace=runtime.namespace,
        started_locally=started_locally,
        token_auth=token_auth_enabled(),
        dashboard_url=dashboard,
        session_dir=address_info.get("session_dir"),
    )


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    namespace: str = "npr",
    include_dashboard: bool = False,
    dashboard_port: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    **init_kwargs: Any,
) -> RayInfo:
    """Attach this process to Ray, once; later calls return the same `RayInfo` (arguments ignored).

    With ``address`` (or ``RAY_ADDRESS``) set, connect to that cluster and never pass ``num_cpus`` or
    dashboard settings. Otherwise (or with ``address="local"``) start a local cluster bound to
    127.0.0.1: node IP 127.0.0.1, dashboard off unless ``include_dashboard`` (then on 127.0.0.1),
    usage stats off, token authentication on (see the module docstring for clients in other
    processes). Extra keyword arguments go to ``ray.init`` unchanged.
    """
    global _info
    with _lock:
        import ray

        if ray.is_initialized():
            if _info is None:  # initialised by someone else (e.g. dagster-ray's LocalRay)
                _info = _describe(None, started_locally=False, fallback_address=address)
            return _info
        target = _target_address(address)
        kwargs = _init_kwargs(
            target,
            num_cpus=num_cpus,
            namespace=namespace,
            include_dashboard=include_dashboard,
            dashboard_port=dashboard_port,
            runtime_env=runtime_env,
            extra=init_kwargs,
        )
        if target is None:
            _prepare_local_start()
        elif _is_loopback(target):
            _prepare_loopback_connect()
        try:
            context = ray.init(**kwargs)
        except BaseException:
            _restore_env()
            raise
        _info = _describe(context, started_locally=target is None, fallback_address=target)
        if target is None and not _info.token_auth:
            logger.warning("local Ray cluster started WITHOUT token authentication")
        logger.info(
            "Ray %s at %s (node %s, namespace %s)",
            "started" if target is None else "connected",
            _info.address,
            _info.node_ip,
            _info.namespace,
        )
        return _info


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping a cluster `ensure_ray` started) and restore the environment."""
    global _info
    with _lock:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _info = None
        _restore_env()


@contextmanager
def local_ray(
    *,
    num_cpus: int | None = None,
    namespace: str = "npr",
    include_dashboard: bool = False,
    dashboard_port: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    **init_kwargs: Any,
) -> Iterator[RayInfo]:
    """A local loopback cluster for the duration of the block (ignores ``RAY_ADDRESS``).

    If Ray is already initialised in this process, yields its info and leaves it running.
    """
    import ray

    owned = not ray.is_initialized()
    info = ensure_ray(
        "local",
        num_cpus=num_cpus,
        namespace=namespace,
        include_dashboard=include_dashboard,
        dashboard_port=dashboard_port,
        runtime_env=runtime_env,
        **init_kwargs,
    )
    try:
        yield info
    finally:
        if owned:
            shutdown_ray()
