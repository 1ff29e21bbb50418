"""`ray start` for a node of the local cluster, with every server of the node on 127.0.0.1.

    python infra/ray_node.py --head --node-ip-address=127.0.0.1 --port=... [any `ray start` flag]
    python infra/ray_node.py --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...

Why a wrapper: Ray 2.60 swaps a loopback `--node-ip-address` (and a loopback `--address`) for the
machine's own address, so a node started with plain `ray start` binds its gRPC servers and its
Prometheus endpoints (served without authentication) on every interface. Ray binds them to loopback
only when it treats the machine as single-node (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, what it
does on macOS), and in that mode `ray start --address` refuses to join a head. This wrapper sets
the variable for the node's processes (raylet, agents, workers, job drivers inherit it) and, in
this process only, keeps loopback addresses as given and lets the node join.
`tests/test_local_cluster.py` lists the sockets of every process of the stack, so a Ray release
that changes this behaviour fails there instead of silently exposing a port.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def main(argv: list[str]) -> int:
    os.environ[LOOPBACK_ENV] = "0"  # before Ray is imported: its constants are read at import

    from ray._common.network_utils import is_localhost
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # let `ray start --address` join (its only use in the CLI's checks)
    remap = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if is_localhost(host) else remap(host)
    sys.argv = ["ray", "start", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
