"""The local cluster (`infra/local_cluster.py`): nodes that share no disk, object storage, a tracking
server, authentication; and our jobs on it through `ray job submit`, unchanged.

One stack for the whole module (it takes a minute or more to come up on 2 cores): a 0-CPU head and
two 1-CPU worker nodes, each worker node in its own mount namespace with a private tmpfs; moto's S3
server; `mlflow server` behind basic auth with artifacts proxied to S3. Torn down by the process ids
`up` recorded (`down`), never `ray stop`.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local_cluster.py"
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="worker nodes need mount namespaces (root)"),
]


def cluster_cmd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def stack():
    existing = os.environ.get("RNA_TEST_CLUSTER_DIR")  # a cluster already up (while working on these tests)
    if existing:
        state = json.loads((Path(existing) / "cluster.json").read_text())
        yield {"dir": Path(existing), "state": state, "env": {**clean_env(), **state["user_env"]}}
        return
    folder = Path(tempfile.mkdtemp(prefix="rnac-", dir="/tmp"))  # short: Ray's socket paths live under it
    up = cluster_cmd("up", "--dir", str(folder), "--workers", "2")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((folder / "cluster.json").read_text())
        yield {"dir": folder, "state": state, "env": {**clean_env(), **state["user_env"]}}
    finally:
        down = cluster_cmd("down", "--dir", str(folder), timeout=300)
        left = [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]
        assert down.returncode == 0, down.stderr
        assert left == [], [p.info["cmdline"][:3] for p in left]  # every process it started is gone


def clean_env() -> dict[str, str]:
    """This environment without anything that points at another cluster, store or credentials."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_EXPERIMENT_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("AWS_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


def http(url: str, auth: tuple[str, str] | None = None, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or 127.0.0.1 mapped into IPv6 (`::ffff:127.0.0.1`, how gRPC binds loopback)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def stack_processes(state: dict) -> list[psutil.Process]:
    procs = []
    for entry in state["processes"].values():
        try:
            root = psutil.Process(int(entry["pid"]))
        except psutil.NoSuchProcess:
            continue
        procs += [root, *root.children(recursive=True)]
    return procs


def test_every_socket_is_on_loopback_and_ray_and_mlflow_refuse_clients_without_credentials(stack, tmp_path):
    state, env = stack["state"], stack["env"]
    listening = []
    for proc in stack_processes(state):
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    ports = {p for _, _, p in listening}
    assert state["ports"]["gcs"] in ports and state["ports"]["mlflow"] in ports and state["ports"]["s3"] in ports
    assert len(listening) >= 10, listening  # GCS, raylets, agents, dashboard, MLflow, S3, ...
    exposed = [s for s in listening if not is_loopback(s[1])]
    assert exposed == [], exposed

    # no token: the job server and the GCS refuse (HOME without ~/.ray/auth_token, no token variables)
    no_token = {**clean_env(), "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    dashboard = env["RAY_API_SERVER_ADDRESS"]
    assert http(f"{dashboard}/api/jobs/") in (401, 403)
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "echo", "hi"],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode != 0 and "token" in (submit.stdout + submit.stderr).lower(), submit.stderr[-500:]
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert http(f"{dashboard}/api/jobs/", token=token) == 200  # the same request with the token passes
    joined = subprocess.run(
        [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); print('joined')", env["RAY_ADDRESS"]],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "joined" not in joined.stdout, joined.stdout

    # MLflow: basic auth on every request
    mlflow_url = env["MLFLOW_TRACKING_URI"]
    search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http(search) == 401
    assert http(search, auth=("rna", "wrong")) == 401
    assert http(search, auth=("rna", env["MLFLOW_TRACKING_PASSWORD"])) == 200


def run_job(stack, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python ...` against the cluster, as a user would."""
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", *args],
        env=stack["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlflow_client(stack):
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"] = stack["env"]["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack["env"]["MLFLOW_TRACKING_PASSWORD"]
    return MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])


def s3_keys(stack, prefix: str) -> list[str]:
    import boto3

    env = stack["env"]
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="rna", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


SMOKE = [
    "--config", "configs/smoke.yaml",
    "--set", "data.dataset=synthetic", "--set", "data.synthetic_size=128", "--set", "data.train_limit=128",
    "--set", "data.eval_limit=32", "--set", "train.epochs=2", "--set", "train.eval_pgd_steps=2",
    "--set", "ray.num_workers=2", "--set", "mlflow.experiment=cluster",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(stack):
    """The smoke run trained by `ray job submit` with its two DDP workers on the two worker nodes
    (each offers one CPU, the head none), checkpoints in S3; its MLflow run."""
    run = run_job(stack, "jobs/train.py", *SMOKE, "--set", "ray.storage_path=s3://rna/ray_results",
                  "--set", "mlflow.run_name=two-nodes")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    client = mlflow_client(stack)
    exp = client.get_experiment_by_name("cluster")
    (mlrun,) = client.search_runs([exp.experiment_id], "tags.`rna.run_dir` = 's3://rna/ray_results/two-nodes'")
    return client, mlrun


def test_training_on_two_nodes_writes_checkpoints_to_s3_and_metrics_to_the_server(stack, trained):
    client, mlrun = trained
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # every epoch once
    assert 0.0 <= mlrun.data.metrics["acc_pgd20_steps2_transfer"] <= 1.0
    keys = s3_keys(stack, "ray_results/two-nodes/")
    assert "ray_results/two-nodes/rna_job.json" in keys
    assert any(k.endswith("/checkpoint.pt") for k in keys), keys
    artifacts = [f.path for f in client.list_artifacts(mlrun.info.run_id)]
    assert "checkpoint" in artifacts and "config.yaml" in artifacts
    assert any(k.endswith("checkpoint/checkpoint.pt") for k in s3_keys(stack, "mlflow/"))  # proxied to S3


def test_evaluation_fans_out_over_the_nodes_and_nests_its_run(stack, trained):
    client, mlrun = trained
    run = run_job(stack, "jobs/evaluate.py", "--run-id", mlrun.info.run_id, "--attacks", "natural,fgsm",
                  "--protocols", "transfer", "--limit", "32", "--batch-size", "8", "--shard-size", "8")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    ev = client.search_runs(
        [mlrun.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{mlrun.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert ev.info.status == "FINISHED"
    assert ev.data.metrics["eval_units"] == 8 and ev.data.metrics["eval_units_run"] == 8  # 2 attacks x 4 shards
    assert 0.0 <= ev.data.metrics["acc_fgsm_transfer"] <= ev.data.metrics["acc_natural_transfer"] <= 1.0
    assert "results.parquet" in [f.path for f in client.list_artifacts(ev.info.run_id)]


def test_driver_local_paths_are_refused_before_anything_runs_when_workers_are_elsewhere(stack, tmp_path):
    env = {**stack["env"], "RNA_BASE_DIR": str(tmp_path)}
    for extra, setting in (
        (["--set", f"ray.storage_path={tmp_path}/ray_results"], "ray.storage_path"),
        (["--set", "ray.storage_path=s3://rna/refused"], "the MLflow store"),
    ):
        run_env = dict(env)
        if setting == "the MLflow store":
            run_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
        out = subprocess.run(
            [sys.executable, "jobs/train.py", *SMOKE, *extra],
            env=run_env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [ln for ln in out.stderr.strip().splitlines() if "\tINFO " not in ln]  # Ray's "Connecting to ..."
        assert out.returncode == 2, out.stderr[-2000:]
        assert len(lines) == 1 and setting in lines[0] and "other node" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    assert s3_keys(stack, "refused/") == []


def test_sweep_runs_trials_on_the_cluster_with_a_parent_and_a_child_run_per_trial(stack):
    run = run_job(stack, "jobs/sweep.py", "--config", "configs/sweep_smoke.yaml",
                  "--set", "ray.storage_path=s3://rna/sweeps", "--set", "sweep.name=cluster-sweep",
                  "--set", "sweep.scheduler=none", "--set", "train.epochs=1",
                  "--set", "mlflow.experiment=cluster-sweep")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    client = mlflow_client(stack)
    exp = client.get_experiment_by_name("cluster-sweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert sorted(c.data.params["model.norm"] for c in children) == ["bn,gns:1", "bn,in,bgn:8"]
    assert all(c.info.status == "FINISHED" and "pgd2_acc" in c.data.metrics for c in children)
    assert "rna_sweep.json" in " ".join(s3_keys(stack, "sweeps/cluster-sweep/"))
