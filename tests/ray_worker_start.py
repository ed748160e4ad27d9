"""``ray start`` for a worker node bound to 127.0.0.1 (tests simulate a multi-node cluster on one machine).

    python tests/ray_worker_start.py start --block --address 127.0.0.1:<gcs port> --node-ip-address 127.0.0.1 ...

Ray 2.60 on Linux binds loopback only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with that flag
the ``ray start`` CLI refuses to start a non-head node ("Multi-node Ray clusters are not supported on
Windows and OSX"); with the flag on instead it rewrites ``127.0.0.1`` (the node IP and the GCS address)
to the default interface's address, where this cluster does not listen. This launcher runs the same CLI
with the flag on in this process only (so the CLI starts a worker node) and the loopback address kept
as given; the processes it spawns (raylet, agents, workers) inherit ``=0`` from the environment and bind
127.0.0.1 like the head. Nothing else about ``ray start`` changes (token auth: the head's token file).
"""

import sys

from ray._private import ray_constants, services


def main() -> int:
    ray_constants.ENABLE_RAY_CLUSTER = True  # let the CLI start a worker node
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 (the cluster listens there)
    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
