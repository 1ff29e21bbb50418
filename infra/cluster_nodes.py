"""The local cluster's Ray nodes (`infra/local_cluster.py`): the head (no CPUs) and worker nodes,
each worker in its own mount namespace with a private tmpfs, token authentication on, every server
bound to 127.0.0.1 (`infra/ray_node.py`)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster_processes import ClusterError, is_ours, logged_since_start, start_process, stop_process, tail, wait_until
from cluster_services import BIN, http_status

HERE = Path(__file__).resolve().parent
WORKER_PORTS = 100  # per node: one per Ray worker process
RAY_STARTED = "Ray runtime started"  # what `ray start` prints once its node is registered
START_ATTEMPTS = 4  # Ray gives a joining node 30 s to register (fixed); a loaded machine can miss it


def base_env() -> dict[str, str]:
    """This process's environment without settings that would point the stack elsewhere."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_EXPERIMENT_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def ray_env(env, cluster_env, sec, folder: Path) -> dict[str, str]:
    return {
        **env,
        **cluster_env,
        "RAY_AUTH_TOKEN": sec["ray_auth_token"],  # the env var, not a file: worker nodes cannot see DIR
        "RNA_BASE_DIR": str(folder / "base"),  # drivers on the head: relative paths, evaluation results
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # A raylet gives its dashboard agent 15 s to start by default; three nodes starting at once on a
        # loaded 2-core machine take longer, and the raylet then dies.
        "RAY_agent_register_timeout_ms": "180000",
    }


def node_flags(p: dict[str, int], cpus: float, object_store_mb: int, temp_dir: Path) -> list[str]:
    return [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus:g}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={p['agent_http']}",
        f"--dashboard-agent-grpc-port={p['agent_grpc']}",
        f"--runtime-env-agent-port={p['runtime_env_agent']}",
        f"--metrics-export-port={p['metrics_export']}",
        f"--node-manager-port={p['node_manager']}",
        f"--object-manager-port={p['object_manager']}",
        f"--min-worker-port={p['min_worker']}",
        f"--max-worker-port={p['max_worker']}",
        "--disable-usage-stats",
    ]


def start_head(folder: Path, state, env, cluster_env, sec, ports, object_store_mb: int) -> None:
    temp = folder / "head" / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    (folder / "base").mkdir(exist_ok=True)
    head_env = ray_env(env, cluster_env, sec, folder)
    head_env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
    head_env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    cmd = [
        sys.executable,
        str(HERE / "ray_node.py"),
        "--head",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client_server']}",
        *node_flags(ports["nodes"]["head"], 0, object_store_mb, temp),
    ]
    entry = start_process("head", cmd, head_env, folder / "logs" / "head.log", folder / "head", state)
    url = f"http://127.0.0.1:{ports['dashboard']}/api/version"
    wait_until(
        "the Ray head", lambda: logged_since_start(entry, RAY_STARTED) and http_status(url) in (200, 401), entry, 240
    )


def start_worker(folder: Path, state, env, cluster_env, sec, ports, node: str, cpus: float, object_store_mb: int):
    """A worker node in its own mount namespace: a fresh tmpfs over DIR, its folders on it."""
    home = folder / "nodes" / node
    node_env = ray_env(env, cluster_env, sec, folder)
    node_env["TMPDIR"] = str(home / "tmp")
    ray_cmd = [
        sys.executable,
        str(HERE / "ray_node.py"),
        f"--address=127.0.0.1:{ports['gcs']}",
        *node_flags(ports["nodes"][node], cpus, object_store_mb, home / "ray"),
    ]
    script = (
        f"mount -t tmpfs -o size=4g,mode=0700 rna-{node} {shlex.quote(str(folder))} && "
        f"mkdir -p {shlex.quote(str(home))}/ray {shlex.quote(str(home))}/tmp {shlex.quote(str(home))}/work && "
        f'cd {shlex.quote(str(home))}/work && exec "$@"'
    )
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *ray_cmd]
    (folder / "nodes").mkdir(exist_ok=True)
    entry = start_process(node, cmd, node_env, folder / "logs" / f"{node}.log", folder, state)
    wait_until(f"Ray node {node}", lambda: logged_since_start(entry, RAY_STARTED), entry, 240)


def with_retries(name: str, state: dict[str, Any], start, attempts: int = START_ATTEMPTS) -> None:
    """Run `start()`; if the process it started exits while starting, stop what is left and start again."""
    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except ClusterError as e:
            entry = state["processes"].get(name)
            if entry:
                stop_process(entry, grace=5)
            if attempt == attempts or "exited while starting" not in str(e):
                raise
            print(
                f"local_cluster.py: {name} exited while starting (attempt {attempt}); starting it again",
                file=sys.stderr,
            )


def wait_for_nodes(folder: Path, state, user_env, count: int, timeout: float = 180) -> None:
    """Until the head's GCS lists `count` alive nodes (asked with the token, as any client)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    env = {**base_env(), **user_env}
    deadline = time.monotonic() + timeout
    seen = "?"
    while time.monotonic() < deadline:
        for name in state["nodes"]:
            entry = state["processes"][name]
            if not is_ours(entry):
                raise ClusterError(
                    f"Ray node {name} exited while starting; {entry['log']} ends with: {tail(entry['log'])}"
                )
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe, user_env["RAY_ADDRESS"]],
                env=env,
                capture_output=True,
                text=True,
                timeout=max(10.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired:
            continue
        seen = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"
        if seen == str(count):
            return
        time.sleep(2)
    raise ClusterError(f"only {seen} of {count} Ray nodes joined within {timeout:.0f} s; see {folder / 'logs'}")
