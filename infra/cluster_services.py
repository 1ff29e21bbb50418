"""The local cluster's services (`infra/local_cluster.py`): the S3-compatible object store (moto's
server, with the bucket every `s3://` URI of the stack names) and the MLflow tracking server behind
basic auth, artifacts proxied to that store; both on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from cluster_processes import ClusterError, answers, start_process, wait_until

BIN = Path(sys.executable).parent  # the venv whose ray, mlflow and moto_server the stack runs
BUCKET = "rna"
JOB_USER = "rna"
ADMIN_USER = "admin"
REGION = "us-east-1"


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
