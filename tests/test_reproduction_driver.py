"""experiments/reproduction/run.py end to end on a tiny synthetic CIFAR, started by launch.sh: the sweep
and the evaluations overlap (an arm is evaluated as soon as its training finished, `--eval-jobs` at a
time), stop.sh stops driver and jobs, launch.sh resumes, and the jobs' Ray workers run at niceness 0
rather than Ray's 15.

Real jobs, a real local Ray per job and a real MLflow store under a temporary base folder; the
sweep is cut to two arms and one epoch, the evaluation to two steps on 16 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rna_core.data import make_synthetic
from rna_core.data.parquet import write_parquet_dataset

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "reproduction"
sys.path.insert(0, str(REPO))

from experiments.reproduction import run as driver  # noqa: E402

TWO_ARMS = "{bn: {model.method: rna, model.norm: bn}, rna: {model.method: rna, model.norm: 'bn,gns:1'}}"
NICENESS_PROBE = """
import os, ray
ray.init(num_cpus=1, include_dashboard=False)
@ray.remote
def niceness():
    return os.nice(0)
print("niceness", ray.get(niceness.remote()))
"""


def _when(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")


def test_job_env_asks_for_workers_at_niceness_zero_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.delenv(driver.WORKER_NICENESS_ENV, raising=False)
    env = driver.job_env(tmp_path)
    assert env[driver.WORKER_NICENESS_ENV] == "0" and env["RNA_BASE_DIR"] == str(tmp_path)
    assert env["PYTHONPATH"] == str(driver.REPO)
    monkeypatch.setenv(driver.WORKER_NICENESS_ENV, "5")
    assert driver.job_env(tmp_path)[driver.WORKER_NICENESS_ENV] == "5"


@pytest.mark.slow
def test_the_jobs_ray_workers_run_at_niceness_zero(tmp_path, monkeypatch):
    """Ray's own default is 15: the probe sees it without the driver's environment, 0 with it."""
    monkeypatch.delenv(driver.WORKER_NICENESS_ENV, raising=False)
    seen = {}
    for name, env in (("ray default", {**os.environ}), ("run.py", driver.job_env(tmp_path))):
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run(
            [sys.executable, "-c", NICENESS_PROBE], env=env, capture_output=True, text=True, timeout=180
        )
        assert out.returncode == 0, out.stderr[-2000:]
        seen[name] = int(out.stdout.split("niceness")[-1])
    assert seen == {"ray default": 15, "run.py": 0}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(1)


def _group_alive(base: Path) -> bool:
    pgid = int((base / "pids").read_text().split()[-1])
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_driver_evaluates_each_arm_while_the_sweep_trains_stops_and_resumes(tmp_path):
    """launch.sh, stop.sh once the first arm's evaluation started, launch.sh again to the end."""
    data = tmp_path / "data"
    for split, n in (("train", 256), ("test", 64)):
        ds = make_synthetic(n, split=split, seed=3)
        write_parquet_dataset(data / f"{split}.parquet", ds.images, ds.labels, ds.classes, ds.name)
    base = tmp_path / "base"
    overrides = {
        "sweep.name": "dry",
        "sweep.arms": TWO_ARMS,
        "sweep.metric": "pgd2_acc",
        "train.epochs": 1,
        "train.attack.steps": 1,
        "train.eval_pgd_steps": 2,
        "data.batch_size": 64,
        "data.eval_limit": 32,
    }
    args = ["--sweep-name", "dry", "--arms", "bn,rna", "--steps", "table1,eot", "--cap-limit", "16"]
    args += ["--cap-trials", "1", "--eval-jobs", "2", "--poll-s", "2", "--retries", "0", "--no-report"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "RNA_BASE_DIR": str(base), "RNA_DATA_DIR": str(data), "PYTHON": sys.executable}
    env.pop(driver.WORKER_NICENESS_ENV, None)
    env["RNA_STOP_WAIT_S"] = "120"

    def launch() -> None:
        out = subprocess.run(["bash", str(EXPERIMENT / "launch.sh"), *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and "started: process group" in out.stdout, out.stdout + out.stderr

    launch()
    logs = base / "reproduction" / "logs"
    _wait(lambda: (logs / "eval-bn-table1.log").is_file(), 600, "bn's first evaluation to start")
    stopped_at = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    stop = subprocess.run(["bash", str(EXPERIMENT / "stop.sh")], env=env, capture_output=True, text=True)
    # the driver itself left on Ctrl+C (launch.sh's background start leaves SIGINT ignored by default)
    assert "stopped; resume" in stop.stdout, stop.stdout + stop.stderr + (base / "run.log").read_text()[-3000:]
    assert "run.py: interrupted" in (base / "run.log").read_text()
    state = json.loads((base / driver.STATE).read_text())
    assert state["steps"]["sweep"]["rc"] == 130  # rna was still training
    started = [
        _when(line.split()[1])
        for log in logs.glob("eval-*.log")
        for line in log.read_text().splitlines()
        if line.startswith("### ")
    ]
    assert started and max(started) <= stopped_at  # nothing was started after the interrupt

    launch()  # resumes: bn's trial is kept, rna's training and the evaluations continue
    _wait(lambda: not _group_alive(base), 900, "the resumed experiment to end")
    log = (base / "run.log").read_text()
    state = json.loads((base / driver.STATE).read_text())
    steps = state["steps"]
    units = {"eval/bn/table1", "eval/rna/table1", "eval/rna/eot"}  # bn is deterministic: no eot step
    assert set(steps) == units | {"sweep"} and all(steps[k]["rc"] == 0 for k in steps), log[-4000:]
    assert set(state["trials"]) == {"bn", "rna"} and state["ray_worker_niceness"] == "0"
    # bn, trained before the stop, was evaluated while rna still trained
    assert _when(steps["eval/bn/table1"]["started"]) < _when(steps["sweep"]["finished"])
    # rna's two steps ran side by side (--eval-jobs 2)
    a, b = steps["eval/rna/table1"], steps["eval/rna/eot"]
    assert _when(a["started"]) < _when(b["finished"]) and _when(b["started"]) < _when(a["finished"])
    for key in units:
        assert (Path(steps[key]["out_dir"]) / "results.parquet").is_file(), key
        assert steps[key]["mlflow_run_id"], key
