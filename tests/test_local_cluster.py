"""The local cluster (`infra/local_cluster.py`): nodes that share no disk, object storage, a tracking
server, authentication; and our jobs on it through `ray job submit`, unchanged.

One stack for the whole module (it takes a minute or more to come up on 2 cores): a 0-CPU head and
two 1-CPU worker nodes, each worker node in its own mount namespace with a private tmpfs; moto's S3
server; `mlflow server` behind basic auth with artifacts proxied to S3. Torn down by the process ids
`up` recorded (`down`), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
from cluster_helpers import (
    BIN,
    REPO,
    api,
    clean_env,
    cluster_cmd,
    http,
    is_loopback,
    job_logs,
    mlflow_client,
    node_processes,
    run_job,
    s3_keys,
    s3_text,
    sigkill,
    stack_processes,
    submit_cmd,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="worker nodes need mount namespaces (root)"),
]


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


TAG = uuid.uuid4().hex[:6]  # run and job names of this module's run (a reused cluster keeps earlier ones)
RUN = f"two-nodes-{TAG}"
SMOKE = [
    "--config", "configs/smoke.yaml",
    "--set", "data.dataset=synthetic", "--set", "data.synthetic_size=128", "--set", "data.train_limit=128",
    "--set", "data.eval_limit=32", "--set", "train.epochs=3", "--set", "train.eval_pgd_steps=2",
    "--set", "train.deterministic=true", "--set", "ray.num_workers=2", "--set", "mlflow.experiment=cluster",
]  # fmt: skip
TRAIN = [*SMOKE, "--set", "ray.storage_path=s3://rna/ray_results", "--set", f"mlflow.run_name={RUN}"]
# Where the drills strike (pipelines/epoch_log.py's test hook): rank 0 waits after logging epoch 1
# (a worker is SIGKILLed then) and epoch 2 (the job is stopped then), on the attempt that first trains it.
DRILL_PAUSE = {"RNA_TEST_PAUSE_AFTER_EPOCH_LOG": "1:240,2:240"}
PER_EPOCH = ("train_loss", "train_acc", "clean_acc", "pgd2_acc", "lr", "epoch", "epoch_seconds", "images_per_second")


def epoch_line(epoch: int) -> re.Pattern:
    """Rank 0's line for `epoch` in the job's log, with the pid of the Ray worker that printed it."""
    return re.compile(rf"RayTrainWorker pid=(\d+)\)\S* \[{RUN}\] epoch {epoch}/3 ")


@pytest.fixture(scope="module")
def trained(stack):
    """The smoke run (3 epochs) trained by `ray job submit` with its two DDP workers on the two worker
    nodes (each offers one CPU, the head none), checkpoints in S3, through two drills: after epoch 1
    the Train worker that is not rank 0 is SIGKILLed (it is in epoch 2's first step, rank 0 just logged
    epoch 1), Ray Train restarts the group from the epoch-1 checkpoint; after epoch 2 `ray job stop`,
    then the same `ray job submit` again, which finishes epoch 3. Its MLflow run and what happened."""
    cmd = submit_cmd("jobs/train.py", *TRAIN, env_vars=DRILL_PAUSE)
    job = f"train-{TAG}"
    first = subprocess.run(
        [*cmd[:3], "--no-wait", "--submission-id", job, *cmd[3:]],
        env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    rank0 = int(wait_for("epoch 1", lambda: epoch_line(1).search(job_logs(stack, job)), 600).group(1))
    workers = {n: node_processes(stack["state"], n, "ray::RayTrainWorker") for n in ("worker-1", "worker-2")}
    assert sorted(len(w) for w in workers.values()) == [1, 1], workers  # one DDP worker on each node
    (killed_node, (victim,)), *_ = [(n, w) for n, w in workers.items() if w[0].pid != rank0]
    # Ray's controller registers a reported checkpoint a moment after the report (its snapshot in S3):
    # the kill waits for it, so the retry starts after epoch 1. Before pipelines/epoch_log.py rank 0
    # logged epoch 1 before reporting it, and here it had not: this wait failed.
    snapshot = f"ray_results/{RUN}/checkpoint_manager_snapshot.json"
    wait_for("epoch 1's checkpoint registered", lambda: "epoch_0001" in s3_text(stack, snapshot), 120)
    sigkill(victim)
    wait_for("epoch 2 after the restart", lambda: epoch_line(2).search(job_logs(stack, job)), 600)
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", job], env=stack["env"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert stop.returncode == 0, stop.stderr[-2000:]
    first_status, first_logs = api(stack, f"/api/jobs/{job}")["status"], job_logs(stack, job)
    again = subprocess.run(cmd, env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    client = mlflow_client(stack)
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id], f"tags.`rna.run_dir` = 's3://rna/ray_results/{RUN}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run for the job, whatever happened
    return {
        "client": client,
        "run": runs[0],
        "killed_node": killed_node,
        "first_status": first_status,
        "first_logs": first_logs,
        "again": again.stdout,
    }


def test_training_on_two_nodes_writes_checkpoints_to_s3_and_metrics_to_the_server(stack, trained):
    client, mlrun = trained["client"], trained["run"]
    assert mlrun.info.status == "FINISHED"
    assert 0.0 <= mlrun.data.metrics["acc_pgd20_steps2_transfer"] <= 1.0
    keys = s3_keys(stack, f"ray_results/{RUN}/")
    assert f"ray_results/{RUN}/rna_job.json" in keys
    assert any(k.endswith("/checkpoint.pt") for k in keys), keys
    artifacts = [f.path for f in client.list_artifacts(mlrun.info.run_id)]
    assert "checkpoint" in artifacts and "config.yaml" in artifacts
    assert any(k.endswith("checkpoint/checkpoint.pt") for k in s3_keys(stack, "mlflow/"))  # proxied to S3


def test_a_train_worker_sigkilled_mid_epoch_resumes_from_s3_and_every_epoch_is_logged_once(trained):
    """Drill: SIGKILL of one Train worker. The epoch-1 checkpoint in S3 is where the retry starts; the
    MLflow run holds one value per epoch of every per-epoch metric. Before pipelines/epoch_log.py, rank
    0 logged an epoch before reporting its checkpoint: a kill then (epoch 1 logged, its checkpoint not
    reported) made the retry start from scratch and log epoch 1 twice; the fixture's wait for the
    registered checkpoint pins that order. (A kill after the report but before Ray's controller
    registered it also retrains epoch 1: it is not logged again, as a run of this drill showed.)"""
    client, run = trained["client"], trained["run"]
    logs = trained["first_logs"]
    assert "A worker died or was killed" in logs  # Ray saw the SIGKILL ...
    assert f"[{RUN}] resuming after epoch 1 from rna/ray_results/{RUN}/epoch_0001" in logs  # ... and resumed
    assert trained["killed_node"] in ("worker-1", "worker-2")
    for name in PER_EPOCH:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == [1, 2, 3], (name, steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "replicas_in_sync")] == [3]  # final: once
    final = client.get_metric_history(run.info.run_id, "acc_natural_transfer")  # + its copy linked to the model
    assert [m.step for m in final] == [3, 3] and len({m.value for m in final}) == 1
    assert run.data.metrics["replicas_in_sync"] == 1.0


def test_ray_job_stop_then_the_same_submit_continues_into_the_same_run(trained):
    """Drill: `ray job stop` during training (after epoch 2), then the same `ray job submit` again:
    it resumes after epoch 2 into the same MLflow run (reopened, then FINISHED), and trains epoch 3."""
    run_id = trained["run"].info.run_id
    assert trained["first_status"] == "STOPPED"
    assert f"[{RUN}] epoch 3/3" not in trained["first_logs"]
    again = trained["again"]
    assert f"resuming MLflow run {run_id}" in again
    assert f"[{RUN}] resuming after epoch 2 from rna/ray_results/{RUN}/epoch_0002" in again
    assert f"[{RUN}] epoch 3/3" in again and f"[{RUN}] epoch 2/3" not in again
    assert trained["run"].info.status == "FINISHED"


def test_two_nodes_give_the_metrics_of_one_node(stack, trained, tmp_path):
    """The same config and seed (train.deterministic=true) with both DDP workers on one node (a Ray of
    the job's own, ray.address=local) gives every epoch's and the final metrics bit for bit: the
    seeded step streams do not depend on placement, each worker runs one torch thread, and a gloo
    all-reduce of two ranks adds the same two numbers in any order. Timings excepted."""
    env = {**clean_env(), "RNA_BASE_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    local = subprocess.run(
        [sys.executable, "jobs/train.py", *SMOKE, "--set", "ray.address=local",
         "--set", f"ray.storage_path={tmp_path}/ray_results", "--set", f"mlflow.run_name={RUN}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-2000:]
    from pipelines.tracking import client_for

    here = client_for(env["MLFLOW_TRACKING_URI"])
    (one,) = here.search_runs([here.get_experiment_by_name("cluster").experiment_id])
    two = trained["run"]
    timing = ("seconds", "per_second", "system/")
    values = {}
    for name, r, client in (("one", one, here), ("two", two, trained["client"])):
        keys = [k for k in r.data.metrics if not any(t in k for t in timing)]
        values[name] = {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)) for k in keys}
    assert values["one"].keys() == values["two"].keys() and len(values["one"]) > 10
    assert values["one"] == values["two"]
    assert one.data.params["resolved.ray.backend"] == two.data.params["resolved.ray.backend"] == "gloo"


EVAL = ["--attacks", "natural,fgsm", "--protocols", "transfer", "--limit", "32", "--batch-size", "8",
        "--shard-size", "8"]  # fmt: skip


def latest_evaluation(client, mlrun):
    return client.search_runs(
        [mlrun.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{mlrun.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )[0]


@pytest.fixture(scope="module")
def evaluated(stack, trained):
    """`jobs/evaluate.py` of the trained run on the cluster, undisturbed: its nested MLflow run."""
    run = run_job(stack, "jobs/evaluate.py", "--run-id", trained["run"].info.run_id, *EVAL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return latest_evaluation(trained["client"], trained["run"])


def test_evaluation_fans_out_over_the_nodes_and_nests_its_run(trained, evaluated):
    ev = evaluated
    assert ev.info.status == "FINISHED"
    assert ev.data.metrics["eval_units"] == 8 and ev.data.metrics["eval_units_run"] == 8  # 2 attacks x 4 shards
    assert 0.0 <= ev.data.metrics["acc_fgsm_transfer"] <= ev.data.metrics["acc_natural_transfer"] <= 1.0
    assert "results.parquet" in [f.path for f in trained["client"].list_artifacts(ev.info.run_id)]


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


def results_table(client, ev, folder: Path):
    """An evaluation's result rows as MLflow holds them, in row order, without the per-run columns."""
    import pandas as pd

    path = client.download_artifacts(ev.info.run_id, "results.parquet", str(folder))
    table = pd.read_parquet(path)
    table = table.drop(columns=[c for c in table.columns if "seconds" in c or c in ("run_id", "mlflow_run_id")])
    return table.sort_values(list(table.columns)).reset_index(drop=True)


def unit_tasks(stack, submission_id: str) -> dict[str, list[dict]]:
    """The attempts of the job's `evaluate_unit` Ray tasks (State API), by task id."""
    job_id = api(stack, f"/api/jobs/{submission_id}")["job_id"]
    query = (
        "/api/v0/tasks?limit=1000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values="
        f"{job_id}&filter_keys=name&filter_predicates=%3D&filter_values=evaluate_unit"
    )
    tasks: dict[str, list[dict]] = {}
    for t in api(stack, query)["data"]["result"]["result"]:
        tasks.setdefault(t["task_id"], []).append(t)
    return {k: sorted(v, key=lambda t: t["attempt_number"]) for k, v in tasks.items()}


def test_a_worker_node_killed_mid_evaluation_has_its_tasks_retried_elsewhere_and_the_same_table(
    stack, trained, evaluated, tmp_path
):
    """Drill, last in the module because it leaves one worker node: `local_cluster.py kill-node
    worker-2` while a unit runs there. Ray retries its tasks on worker-1; the driver writes each unit
    once (8 unit files, eval_units_run 8); the table equals the undisturbed evaluation's."""
    out = stack["dir"] / "base" / f"eval-drill-{TAG}"  # on the head, where the evaluation's driver runs
    job = f"eval-{TAG}"
    # each unit waits 4 s first (a test hook): units of a small model otherwise end before a poll sees one
    pause = {"RNA_TEST_UNIT_PAUSE_S": "4"}
    cmd = submit_cmd(
        "jobs/evaluate.py", "--run-id", trained["run"].info.run_id, *EVAL, "--out", str(out), env_vars=pause
    )
    sub = subprocess.run([*cmd[:3], "--no-wait", "--submission-id", job, *cmd[3:]],
                         env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sub.returncode == 0, sub.stderr[-2000:]
    wait_for("a unit on worker-2", lambda: node_processes(stack["state"], "worker-2", "ray::evaluate_unit"), 600, 0.1)
    kill = cluster_cmd("kill-node", "worker-2", "--dir", str(stack["dir"]), timeout=120)
    assert kill.returncode == 0 and "killed worker-2" in kill.stdout, kill.stderr
    ended = ("SUCCEEDED", "FAILED", "STOPPED")
    status = wait_for("the evaluation", lambda: (s := api(stack, f"/api/jobs/{job}")["status"]) in ended and s, 600)
    assert status == "SUCCEEDED", job_logs(stack, job)[-3000:]

    client = trained["client"]
    ev = latest_evaluation(client, trained["run"])
    assert ev.info.run_id != evaluated.info.run_id and ev.info.status == "FINISHED"
    assert ev.data.metrics["eval_units"] == ev.data.metrics["eval_units_run"] == 8
    assert len(list((out / "units").glob("*.parquet"))) == 8
    tasks = unit_tasks(stack, job)
    assert len(tasks) == 8  # one Ray task per unit (one protocol, nothing shared): the driver submitted none twice
    assert all([a["state"] for a in attempts].count("FINISHED") == 1 for attempts in tasks.values())
    retried = [a for a in tasks.values() if len(a) > 1]
    assert retried, tasks
    for attempts in retried:
        failed, last = attempts[0], attempts[-1]
        assert failed["state"] == "FAILED" and last["state"] == "FINISHED", attempts
        assert failed["node_id"] != last["node_id"], attempts  # elsewhere
    assert results_table(client, ev, tmp_path / "drill").equals(results_table(client, evaluated, tmp_path / "calm"))
