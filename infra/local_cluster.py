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
import base64
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv whose ray, mlflow and moto_server the stack runs
STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
DEFAULT_DIR = os.environ.get("RNA_CLUSTER_DIR", "/tmp/rna-cluster")
BUCKET = "rna"
JOB_USER = "rna"
ADMIN_USER = "admin"
REGION = "us-east-1"
WORKER_PORTS = 100  # per node: one per Ray worker process
EXIT_USAGE = 2
RAY_STARTED = "Ray runtime started"  # what `ray start` prints once its node is registered
START_ATTEMPTS = 4  # Ray gives a joining node 30 s to register (fixed); a loaded machine can miss it


class ClusterError(Exception):
    """A problem `up` or `down` reports in one line (exit code 2)."""


# ----------------------------------------------------------------------------------------- ports


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(size: int, taken: set[int], rng: random.Random) -> int:
    """The first port of `size` consecutive free ports (for a node's Ray worker processes)."""
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        if any(p in taken for p in range(base, base + size)):
            continue
        try:
            socks = []
            for p in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ClusterError(f"found no {size} consecutive free ports for Ray workers; free some ports and retry")


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- processes


def start_process(
    name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path, state: dict[str, Any]
) -> dict[str, Any]:
    """Start `cmd` in a new session (its process group is its pid) and record it in `state`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    entry = {"pid": proc.pid, "started": process_start_time(proc.pid), "log": str(log), "offset": offset, "cmd": cmd}
    state["processes"][name] = entry
    return entry


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a process from a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def is_ours(entry: dict[str, Any]) -> bool:
    """Whether the recorded process is still the one we started (alive, same start time)."""
    started = process_start_time(int(entry["pid"]))
    return started is not None and started == entry.get("started")


def descendants(pid: int) -> list[tuple[int, str | None]]:
    """(pid, start time) of every descendant of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append((c, process_start_time(c)))
            todo.append(c)
    return out


def stop_process(entry: dict[str, Any], grace: float, hard: bool = False) -> None:
    """SIGTERM (or SIGKILL when `hard`) the recorded process, then SIGKILL its group and descendants.

    Only processes we started are signalled: the recorded pid if its start time still matches, its
    process group (it led a new session), and the descendants it had when we came to stop it.
    """
    if not is_ours(entry):
        return
    pid = int(entry["pid"])
    family = descendants(pid)
    try:
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + (0 if hard else grace)
    while time.monotonic() < deadline and is_ours(entry):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child, started in family:
        if started is not None and process_start_time(child) == started:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap(pid)


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(what: str, check, entry: dict[str, Any], timeout: float) -> None:
    """Poll `check()` until it is true; fail with the log's tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        # `ray start` that failed can linger after its traceback (its children keep it waiting): failed too
        if not is_ours(entry) or logged_since_start(entry, "Traceback (most recent call last)"):
            raise ClusterError(f"{what} exited while starting; its log {entry['log']} ends with: {tail(entry['log'])}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s; see {entry['log']}: {tail(entry['log'])}")


def logged_since_start(entry: dict[str, Any], text: str) -> bool:
    """Whether the process has written `text` to its log (this start, not an earlier attempt's)."""
    try:
        with open(entry["log"], "rb") as f:
            f.seek(int(entry.get("offset", 0)))
            return text.encode() in f.read()
    except OSError:
        return False


def tail(log: str, lines: int = 3) -> str:
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])


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


def base_env() -> dict[str, str]:
    """This process's environment without settings that would point the stack elsewhere."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_EXPERIMENT_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


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


def start_object_store(folder: Path, state, env, cluster_env, s3_url: str) -> None:
    port = state["ports"]["s3"]
    entry = start_process(
        "s3",
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env,
        folder / "logs" / "s3.log",
        folder,
        state,
    )
    wait_until("the object store (moto)", lambda: answers("127.0.0.1", port), entry, 60)
    # the bucket, created the way any S3 client would (a signed PUT), with the cluster's key pair
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name=REGION,
        aws_access_key_id=cluster_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=cluster_env["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=BUCKET)


def start_tracking_server(folder: Path, state, env, cluster_env, sec, port: int) -> None:
    home = folder / "head" / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    ini = home / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"  # every signed-in user reads; only a run's owner (and admin) writes it
        f"database_uri = sqlite:///{home / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = {
        **env,
        **{
            k: v for k, v in cluster_env.items() if k.startswith(("AWS_", "MLFLOW_S3_"))
        },  # the server writes artifacts to S3
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": sec["mlflow_admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["mlflow_flask_secret"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    entry = start_process(
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
        ],
        server_env,
        folder / "logs" / "mlflow.log",
        home,
        state,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until("the MLflow tracking server", lambda: http_status(f"{url}/health") == 200, entry, 180)
    admin = (ADMIN_USER, sec["mlflow_admin_password"])
    status = http_status(
        f"{url}/api/2.0/mlflow/users/create",
        data={"username": JOB_USER, "password": sec["mlflow_password"]},
        auth=admin,
    )
    if status != 200:
        raise ClusterError(f"creating the MLflow user {JOB_USER} failed (HTTP {status}); see {entry['log']}")


def http_status(url: str, data: dict | None = None, auth: tuple[str, str] | None = None, timeout: float = 5) -> int:
    """The HTTP status of a GET (or a JSON POST with `data`), 0 when nothing answers."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if body:
        req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


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
