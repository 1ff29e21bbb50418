"""A Ray cluster on this machine that shares no disk: the stack a team runs, on 127.0.0.1.

    python infra/local_cluster.py up   [--dir DIR] [--workers 2] [--cpus-per-node 1]   # make cluster-up
    eval "$(python infra/local_cluster.py env [--dir DIR])"     # the settings a user of the cluster needs
    ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml \
        --set ray.storage_path=s3://rna/ray_results --set data.dataset=synthetic
    python infra/local_cluster.py status [--dir DIR]
    python infra/local_cluster.py kill-node worker-2 [--dir DIR]  # drill: a node dies (SIGKILL, no clean-up)
    python infra/local_cluster.py down [--dir DIR]                # make cluster-down

What `up` starts (each process in its own session; their ids go to `DIR/cluster.json`, and `down`
stops exactly those and what they started, never `ray stop`):
- an S3-compatible object store (moto's server) with the bucket `rna`: `ray.storage_path`, datasets
  and MLflow's artifacts are `s3://rna/...`, reached with `AWS_ENDPOINT_URL` and a key pair;
- an MLflow tracking server (SQLite on the head, artifacts proxied to `s3://rna/mlflow`) behind
  MLflow's basic-auth app: every request needs `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`
  (the job user `rna`; the admin's password is in `DIR/secrets/`);
- a Ray head (no CPUs: it runs drivers and the job server, as on a real cluster) and `--workers`
  worker nodes, with Ray's token authentication on (`DIR/secrets/ray_auth_token`). Each worker node
  runs in its own mount namespace (`unshare -m`) with a private tmpfs over `DIR` (so it sees none of
  the head's files) and its temporary and working folders on it (`TMPDIR`): a job that relies on a
  disk shared with the driver fails here as it would on a real cluster.
Every listening socket is on 127.0.0.1 (`infra/ray_node.py` says how Ray is made to do that) and
the Ray and MLflow ones also refuse clients without the token or the credentials.

Needs root (mount namespaces) and the `cluster` extras (`pip install -e '.[cluster]'`: moto's
server, Flask-WTF for MLflow's auth app, psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
DEFAULT_DIR = os.environ.get("RNA_CLUSTER_DIR", "/tmp/rna-cluster")
EXIT_USAGE = 2


from cluster_nodes import WORKER_PORTS, base_env, start_head, start_worker, wait_for_nodes, with_retries  # noqa: E402
from cluster_processes import (  # noqa: E402  (run as a script: infra/ is on sys.path)
    ClusterError,
    free_ports,
    free_range,
    is_ours,
    stop_process,
)
from cluster_services import ADMIN_USER, BIN, BUCKET, JOB_USER, REGION, start_object_store, start_tracking_server  # noqa: E402

# ------------------------------------------------------------------------------------------ state


def state_path(folder: Path) -> Path:
    return folder / STATE_FILE


def read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(folder).read_text())
    except FileNotFoundError:
        return None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (secrets, and files that hold them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    write_private(state_path(folder), json.dumps(state, indent=1, sort_keys=True))
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(state["user_env"].items())]
    write_private(
        folder / ENV_FILE,
        '# eval "$(python infra/local_cluster.py env)" or source this file\n' + "\n".join(lines) + "\n",
    )


# ------------------------------------------------------------------------------------------- up


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the local cluster needs root (worker nodes get their own mount namespace); run it as root")
    if shutil.which("unshare") is None:
        raise ClusterError("`unshare` (util-linux) is missing; install util-linux")
    for tool in ("ray", "mlflow", "moto_server"):
        if not (BIN / tool).exists():
            raise ClusterError(f"{BIN / tool} is missing; install the cluster extras: pip install -e '.[cluster]'")
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it)
    except ImportError:
        raise ClusterError("Flask-WTF is missing (MLflow's auth app needs it); pip install -e '.[cluster]'") from None


def make_secrets(folder: Path) -> dict[str, str]:
    values = {
        "ray_auth_token": secrets.token_hex(32),
        "mlflow_admin_password": secrets.token_urlsafe(18),
        "mlflow_password": secrets.token_urlsafe(18),
        "mlflow_flask_secret": secrets.token_hex(24),
        "aws_access_key_id": "RNA" + secrets.token_hex(8).upper(),
        "aws_secret_access_key": secrets.token_urlsafe(30),
    }
    for name, value in values.items():
        write_private(folder / "secrets" / name, value)
    return values


def up(folder: Path, workers: int, cpus_per_node: float, object_store_mb: int) -> dict[str, Any]:
    check_prerequisites()
    old = read_state(folder)
    if old is not None:
        alive = [n for n, e in old["processes"].items() if is_ours(e)]
        if alive:
            raise ClusterError(
                f"a cluster already runs from {folder} ({', '.join(alive)}); "
                f"stop it with `python infra/local_cluster.py down --dir {folder}`"
            )
    if len(str(folder)) > 40:
        raise ClusterError(f"--dir {folder} is too long for Ray's socket paths; use a folder of <= 40 characters")
    for sub in ("head", "logs", "nodes", "base", "secrets"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    sec = make_secrets(folder)
    rng = random.Random()
    single = free_ports(13 + 6 * workers)
    taken = set(single)
    take = iter(single)
    ports: dict[str, Any] = {
        "s3": next(take),
        "mlflow": next(take),
        "gcs": next(take),
        "dashboard": next(take),
        "client_server": next(take),
        "autoscaler_metrics": next(take),
        "dashboard_metrics": next(take),
    }
    node_keys = ("agent_http", "agent_grpc", "runtime_env_agent", "metrics_export", "node_manager", "object_manager")
    nodes = ["head"] + [f"worker-{i + 1}" for i in range(workers)]
    node_ports: dict[str, dict[str, int]] = {}
    for node in nodes:
        node_ports[node] = {k: next(take) for k in node_keys}
        base = free_range(WORKER_PORTS, taken, rng)
        taken.update(range(base, base + WORKER_PORTS))
        node_ports[node]["min_worker"], node_ports[node]["max_worker"] = base, base + WORKER_PORTS - 1
    ports["nodes"] = node_ports

    s3_url = f"http://127.0.0.1:{ports['s3']}"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    cluster_env = {  # what every node has in its environment (on Kubernetes: the pods' env and secrets)
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": sec["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": sec["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": s3_url,  # MLflow's own S3 client (the server's artifact proxy)
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_TRACKING_USERNAME": JOB_USER,
        "MLFLOW_TRACKING_PASSWORD": sec["mlflow_password"],
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds loopback; see infra/ray_node.py
    }
    user_env = {
        **cluster_env,
        "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}",
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}",
        "RAY_AUTH_TOKEN_PATH": str(folder / "secrets" / "ray_auth_token"),
        "RNA_CLUSTER_DIR": str(folder),
        "RNA_STORAGE": f"s3://{BUCKET}",
    }
    state: dict[str, Any] = {
        "format": 1,
        "dir": str(folder),
        "bucket": BUCKET,
        "ports": ports,
        "nodes": nodes,
        "cluster_env": cluster_env,
        "user_env": user_env,
        "mlflow": {"url": mlflow_url, "user": JOB_USER, "admin": ADMIN_USER},
        "processes": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env = base_env()
    try:
        start_object_store(folder, state, env, cluster_env, s3_url)
        start_tracking_server(folder, state, env, cluster_env, sec, ports["mlflow"])
        # One node at a time: a raylet gives its agents 15 s to start, which three nodes starting at once
        # on a loaded 2-core machine can miss (the raylet then exits); a node that exits is started again.
        with_retries("head", state, lambda: start_head(folder, state, env, cluster_env, sec, ports, object_store_mb))
        for node in nodes[1:]:
            with_retries(
                node,
                state,
                lambda node=node: start_worker(
                    folder, state, env, cluster_env, sec, ports, node, cpus_per_node, object_store_mb
                ),
            )
        wait_for_nodes(folder, state, user_env, len(nodes))
    except BaseException:
        stop_all(state, grace=10)
        write_state(folder, state)
        raise
    write_state(folder, state)
    return state


# ---------------------------------------------------------------------------------------- down


def stop_all(state: dict[str, Any], grace: float = 30) -> list[str]:
    """Stop every recorded process, workers first; returns the names that were still running."""
    order = [n for n in state["processes"] if n.startswith("worker-")] + ["head", "mlflow", "s3"]
    stopped = []
    for name in order:
        entry = state["processes"].get(name)
        if entry and is_ours(entry):
            stopped.append(name)
            stop_process(entry, grace)
    return stopped


def down(folder: Path) -> list[str]:
    state = read_state(folder)
    if state is None:
        return []
    stopped = stop_all(state)
    state_path(folder).unlink(missing_ok=True)
    (folder / ENV_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / "secrets", ignore_errors=True)
    return stopped


def kill_node(folder: Path, node: str) -> None:
    state = read_state(folder)
    if state is None:
        raise ClusterError(f"no cluster runs from {folder}")
    entry = state["processes"].get(node)
    if entry is None or not node.startswith("worker-"):
        workers = ", ".join(n for n in state["processes"] if n.startswith("worker-"))
        raise ClusterError(f"{node} is not a worker node of this cluster (its worker nodes: {workers})")
    stop_process(entry, grace=0, hard=True)


def status(folder: Path) -> dict[str, bool]:
    state = read_state(folder)
    if state is None:
        raise ClusterError(f"no cluster runs from {folder}; start one with `python infra/local_cluster.py up`")
    return {name: is_ours(entry) for name, entry in state["processes"].items()}


# ----------------------------------------------------------------------------------------- main


def describe(state: dict[str, Any]) -> str:
    e = state["user_env"]
    return (
        f"cluster up: {len(state['nodes']) - 1} worker node(s) + head; folder {state['dir']}\n"
        f"  Ray dashboard   {e['RAY_API_SERVER_ADDRESS']}   (token: {e['RAY_AUTH_TOKEN_PATH']})\n"
        f"  MLflow          {e['MLFLOW_TRACKING_URI']}   (user {JOB_USER}; "
        f"password in {state['dir']}/secrets/mlflow_password)\n"
        f"  object store    {e['AWS_ENDPOINT_URL']}   bucket s3://{state['bucket']}\n"
        f"Use it:\n"
        f'  eval "$(python infra/local_cluster.py env --dir {state["dir"]})"\n'
        f"  ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml \\\n"
        f"      --set ray.storage_path=s3://{state['bucket']}/ray_results --set data.dataset=synthetic\n"
        f"  (real data: upload train.parquet and test.parquet to s3://{state['bucket']}/data/cifar10/ and set "
        f"data.data_dir to that URI)\n"
        f"Stop it:  python infra/local_cluster.py down --dir {state['dir']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local_cluster.py", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("up", "down", "status", "env", "kill-node"))
    p.add_argument("node", nargs="?", help="kill-node: the worker node (worker-1, worker-2, ...)")
    p.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"the cluster's folder (default {DEFAULT_DIR}, or $RNA_CLUSTER_DIR)"
    )
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs each worker node offers (default 1)")
    p.add_argument("--object-store-mb", type=int, default=512, help="Ray object store per node, MiB (default 512)")
    args = p.parse_args(argv)
    folder = Path(args.dir).expanduser().absolute()
    try:
        if args.command == "up":
            if args.workers < 1:
                raise ClusterError("--workers must be at least 1")
            print(describe(up(folder, args.workers, args.cpus_per_node, args.object_store_mb)))
        elif args.command == "down":
            stopped = down(folder)
            print(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running from {folder}")
        elif args.command == "status":
            for name, alive in status(folder).items():
                print(f"{name:10s} {'running' if alive else 'stopped'}")
        elif args.command == "env":
            state = read_state(folder)
            if state is None:
                raise ClusterError(f"no cluster runs from {folder}; start one with `python infra/local_cluster.py up`")
            print((folder / ENV_FILE).read_text(), end="")
        elif args.command == "kill-node":
            if not args.node:
                raise ClusterError("kill-node needs the node's name, e.g. worker-2")
            kill_node(folder, args.node)
            print(f"killed {args.node} (SIGKILL, no clean-up)")
    except ClusterError as e:
        print(f"local_cluster.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
