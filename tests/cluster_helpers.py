"""Helpers of tests/test_local_cluster.py: commands, clients and processes of the local cluster."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local_cluster.py"
BIN = Path(sys.executable).parent


def cluster_cmd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


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


def s3_client(stack):
    """A boto3 S3 client with the cluster's endpoint and key pair, as a user's job would make one."""
    import boto3

    env = stack["env"]
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def s3_keys(stack, prefix: str) -> list[str]:
    s3 = s3_client(stack)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="rna", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# ------------------------------------------------------------------------------------ drills


def api(stack, path: str) -> object:
    """GET a JSON document from the Ray dashboard (job server, State API) with the cluster's token."""
    token = Path(stack["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(stack["env"]["RAY_API_SERVER_ADDRESS"] + path)
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def job_logs(stack, submission_id: str) -> str:
    return str(api(stack, f"/api/jobs/{submission_id}/logs").get("logs", ""))


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    """Poll `check()` until it returns something true; that value (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def submit_cmd(*args: str, env_vars: dict[str, str] | None = None) -> list[str]:
    """`ray job submit --working-dir . [--runtime-env-json ...] -- python ARGS` (what a user types)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", "."]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    return [*cmd, "--", "python", *args]


def node_processes(state: dict, node: str, title: str) -> list[psutil.Process]:
    """Processes of a worker node (started by its recorded process) whose title starts with `title`."""
    root = psutil.Process(int(state["processes"][node]["pid"]))
    found = []
    for proc in root.children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(title):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def sigkill(proc: psutil.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)


def s3_text(stack, key: str) -> str:
    """An object of the bucket as text ('' when it does not exist)."""
    s3 = s3_client(stack)
    try:
        return s3.get_object(Bucket="rna", Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return ""
