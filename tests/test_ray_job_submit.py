"""End to end: `ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml`.

Starts a private Ray head on 127.0.0.1 (`ray start --head --block`, its own ports and temp dir),
submits the smoke preset on generated CIFAR-shaped Parquet files, and checks the job SUCCEEDED,
the MLflow run FINISHED and the run folder landed under RNA_BASE_DIR (inherited from the head's
environment, as `infra/start_local.sh` arranges).

Cleanup stops only this test's cluster: SIGTERM to its `ray start --block` process (which shuts
down the processes it started), then SIGKILL to that process group. Not `ray stop`: that kills
every Ray process of the user on the machine, including other sessions' clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _write_parquet_data(folder: Path) -> None:
    from rna_core.data import make_synthetic, write_parquet_dataset

    for split, n in (("train", 256), ("test", 64)):
        ds = make_synthetic(n, num_classes=10, seed=0, split=split)
        write_parquet_dataset(folder / f"{split}.parquet", ds.images, ds.labels, ds.classes, name=f"cifar10-{split}")


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # e.g. 401: token authentication is on; the server is up
            return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("Ray dashboard did not come up")


def _stop_head(head: subprocess.Popen) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(2):  # our session only: whatever outlived the head (a zombie may linger until reaped)
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(1)
    head.wait(timeout=30)


@pytest.mark.slow
def test_ray_job_submit_runs_smoke_preset_to_succeeded():
    from mlflow import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head = None
    try:
        _write_parquet_data(tmp / "data")
        gcs, dash, client_port, agent = _free_ports(4)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_EXPERIMENT_ID")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
            RNA_BASE_DIR=str(tmp / "base"),
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
            RAY_USAGE_STATS_ENABLED="0",
            # Token authentication on (the default when ~/.ray/auth_token exists), and said so
            # explicitly: the `ray job` CLI only sends the token when the mode is `token`.
            RAY_AUTH_MODE="token",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # nothing to drain: stop at once on SIGTERM
        )
        with open(tmp / "head.log", "w") as log:
            head = subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--port={gcs}",
                    f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={client_port}",
                    f"--dashboard-agent-listen-port={agent}",
                    "--num-cpus=2",
                    f"--temp-dir={tmp}/ray",
                ],
                env=env,
                cwd=tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_dashboard(dash, head)

        sid = f"rna-test-{uuid.uuid4().hex[:8]}"
        submit = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dash}",
                f"--submission-id={sid}",
                "--working-dir",
                ".",
                "--",
                "python",
                "jobs/train.py",
                "--config",
                "configs/smoke.yaml",
                "--set",
                f"data.data_dir={tmp}/data",
                "--set",
                "data.eval_limit=64",
                "--set",
                "train.attack.steps=1",
                "--set",
                "train.eval_pgd_steps=2",
                "--set",
                "mlflow.run_name=submitted",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        out = submit.stdout + submit.stderr
        status = subprocess.run(
            [RAY, "job", "status", f"--address=http://127.0.0.1:{dash}", sid],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "succeeded" in (status.stdout + status.stderr).lower(), (status.stdout, status.stderr, out[-4000:])
        assert submit.returncode == 0, out[-4000:]
        assert "epoch 1/2" in out and "epoch 2/2" in out and "mlflow ui" in out, out[-4000:]

        # the job's relative paths resolved against RNA_BASE_DIR from the head's environment
        run_dir = tmp / "base" / "ray_results" / "submitted"
        assert (run_dir / "rna_job.json").is_file(), out[-4000:]
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("rna-smoke")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "submitted"
        assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")) == [1, 2]
        assert 0.0 <= runs[0].data.metrics["acc_eot_pgd_steps2_eot"] <= 1.0  # eval_pgd_steps=2 is in the name
        assert "pgd2_acc" in runs[0].data.metrics and "pgd20_acc" not in runs[0].data.metrics
        assert runs[0].data.params["data.data_dir"] == f"{tmp}/data"
    finally:
        if head is not None:
            _stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
