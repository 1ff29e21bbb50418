"""State a job finds on disk that no longer holds: a Ray address nobody answers, a job file whose
MLflow run its store lost. Each costs one line and exit code 2 within seconds, before Ray starts
or anything is written; `--set mlflow.if_run_missing=new` starts a new run by explicit request.

These run the real jobs in-process (`jobs/*.main`) against real SQLite MLflow stores; none starts
Ray (every case is refused before it would).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from jobs import evaluate as evaluate_job
from jobs import sweep as sweep_job
from jobs import train as train_job
from pipelines import tracking
from pipelines.cluster import configured_address, recorded_address_file
from pipelines.run_folder import read_job_file, resolve_paths, write_job_file
from pipelines.sweep.spec import identity, load_sweep_config
from rna_core.config import flatten, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "--config",
    str(REPO / "configs/smoke.yaml"),
    "--set",
    "data.dataset=synthetic",
    "--set",
    "ray.num_workers=1",
    "--set",
    "train.epochs=1",
]


def dead_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A base folder, a private Ray temp folder (no record of any cluster) and a SQLite store in it."""
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setenv("RNA_BASE_DIR", str(base))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
    for name in ("RAY_ADDRESS", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return base


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------ stale Ray address


def test_a_recorded_cluster_that_does_not_answer_is_one_line_in_seconds(workdir, capsys):
    port = dead_port()
    record = recorded_address_file()
    record.parent.mkdir(parents=True)
    record.write_text(f"127.0.0.1:{port}")  # what `ray start` leaves behind when killed without `ray stop`
    assert configured_address(load_config(None, []))[0] == f"127.0.0.1:{port}"

    start = time.monotonic()
    code = train_job.main(SMOKE)
    took = time.monotonic() - start

    line = one_error_line(capsys)
    assert code == 2
    assert took < 30, took  # Ray itself waits minutes for a GCS that does not answer
    assert f"127.0.0.1:{port}" in line and str(record) in line and "ray.address=local" in line
    assert sorted(p.name for p in workdir.iterdir()) == []  # no mlflow.db, no run folder


def test_an_explicit_address_that_does_not_answer_names_the_setting(workdir, capsys, monkeypatch):
    port = dead_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert train_job.main(SMOKE) == 2
    line = one_error_line(capsys)
    assert f"127.0.0.1:{port}" in line and "RAY_ADDRESS" in line and "ray.address=local" in line

    monkeypatch.delenv("RAY_ADDRESS")
    assert train_job.main([*SMOKE, "--set", f"ray.address=ray://127.0.0.1:{port}"]) == 2
    assert "(ray.address)" in one_error_line(capsys)
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_an_address_that_answers_passes_the_probe(workdir, monkeypatch):
    from pipelines.cluster import check_ray_address

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listener.getsockname()[1]}")
        check_ray_address(load_config(None, []))  # no error


# ------------------------------------------------------------------- job file names a lost run


def lost_run_store(base: Path) -> tracking.RunRef:
    """What a past job wrote into its job file: its run in the SQLite store of `base`, a file since deleted."""
    assert not (base / "mlflow.db").exists()
    return tracking.RunRef(f"sqlite:///{base}/mlflow.db", "1", "5d0c2ab1e3f94b4e8f6a1c7d2b9e0f13")


def fresh_capture(capsys) -> None:
    capsys.readouterr()  # drop MLflow's log lines from setting the store up


def test_training_job_file_naming_a_lost_run_is_refused_then_started_fresh_on_request(workdir, capsys):
    ref = lost_run_store(workdir)
    cfg = load_config(REPO / "configs/smoke.yaml", ["data.dataset=synthetic", "mlflow.run_name=r1"])
    run_dir = workdir / "ray_results" / "r1"
    write_job_file(str(run_dir), {"format": 1, "run_name": "r1", "config": flatten(cfg), "mlflow": ref.to_dict()})
    before = (run_dir / "rna_job.json").read_text()
    fresh_capture(capsys)

    code = train_job.main([*SMOKE, "--set", "mlflow.run_name=r1", "--set", "ray.address=local"])
    line = one_error_line(capsys)
    assert code == 2
    assert ref.run_id in line and ref.tracking_uri in line and str(run_dir / "rna_job.json") in line
    assert "mlflow.if_run_missing=new" in line
    assert not (workdir / "mlflow.db").exists()  # the lost store is not recreated empty
    assert (run_dir / "rna_job.json").read_text() == before

    # explicit request: a new run in the store, the job file's run left as it was
    opened = tracking.open_run(
        ref.tracking_uri, "exp", "again", {"a": 2}, {}, reopen=ref, if_missing="new", named_by="x"
    )
    assert opened.how == "created" and opened.ref.run_id != ref.run_id
    assert opened.client.get_run(opened.ref.run_id).data.params == {"a": "2"}


def test_a_replaced_store_and_a_deleted_run_count_as_lost(workdir):
    uri = f"sqlite:///{workdir}/mlflow.db"
    kept = tracking.open_run(uri, "exp", "kept", {}, {})
    assert tracking.run_exists(kept.ref)
    gone = tracking.open_run(uri, "exp", "gone", {}, {})
    gone.client.delete_run(gone.ref.run_id)  # the UI's delete: soft, but not a run to log into
    assert not tracking.run_exists(gone.ref)
    foreign = tracking.RunRef(uri, "0", "0123456789abcdef0123456789abcdef")  # a store that replaced the old one
    assert not tracking.run_exists(foreign)
    with pytest.raises(tracking.RunMissingError, match="0123456789abcdef0123456789abcdef"):
        tracking.open_run(uri, "exp", "x", {}, {}, reopen=foreign, named_by="some/rna_job.json")


def test_sweep_file_naming_a_lost_parent_run_is_one_line(workdir, capsys):
    ref = lost_run_store(workdir)
    config = str(REPO / "configs/sweep_smoke.yaml")
    cfg = load_sweep_config(config, ["sweep.name=s1", "ray.address=local"])
    sweep_dir = workdir / "ray_results" / "s1"
    write_job_file(
        str(sweep_dir),
        {"format": 1, "name": "s1", "identity": identity(resolve_paths(cfg)), "mlflow": ref.to_dict()},
        name="rna_sweep.json",
    )
    fresh_capture(capsys)

    code = sweep_job.main(["--config", config, "--set", "sweep.name=s1", "--set", "ray.address=local"])
    line = one_error_line(capsys)
    assert code == 2, line
    assert ref.run_id in line and str(sweep_dir / "rna_sweep.json") in line and "mlflow.if_run_missing=new" in line
    assert not (workdir / "mlflow.db").exists()
    assert read_job_file(str(sweep_dir), "rna_sweep.json")["mlflow"] == ref.to_dict()
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["rna_sweep.json"]


def test_evaluation_file_naming_a_lost_run_is_one_line(workdir, capsys, tmp_path):
    from jobs.evaluate import eval_overrides
    from pipelines.evaluation.plan import plan_evaluation
    from pipelines.evaluation.source import load_source
    from rna_core.builders import model_from_config
    from rna_core.checkpoint import save_checkpoint

    cfg = load_config(REPO / "configs/smoke.yaml", ["data.dataset=synthetic", "ray.address=local"])
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, model_from_config(cfg), epoch=1, config=cfg)
    out = tmp_path / "eval_out"
    args = [
        "--checkpoint",
        str(ckpt),
        "--attacks",
        "fgsm",
        "--limit",
        "8",
        "--out",
        str(out),
        "--set",
        "ray.address=local",
    ]
    ref = lost_run_store(workdir)
    plan = plan_evaluation(load_source(checkpoint=str(ckpt), overrides=eval_overrides(evaluate_job.parse_args(args))))
    write_job_file(
        str(out), {"format": 1, "fingerprint": plan.fingerprint, "mlflow": ref.to_dict()}, name="evaluation.json"
    )
    fresh_capture(capsys)

    code = evaluate_job.main(args)
    line = one_error_line(capsys)
    assert code == 2, line
    assert ref.run_id in line and str(out / "evaluation.json") in line
    assert not (workdir / "mlflow.db").exists()
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json"]
    assert os.environ.get("MLFLOW_TRACKING_URI") == ref.tracking_uri


# ------------------------------------------------------------- services that do not answer at start


def test_an_object_store_or_tracking_server_that_does_not_answer_is_one_line_nothing_written(
    workdir, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    start = time.monotonic()
    assert train_job.main([*SMOKE, "--set", "ray.storage_path=s3://rna/ray_results", "--set", "ray.address=local"]) == 2
    line = one_error_line(capsys)
    assert "ray.storage_path s3://rna/ray_results" in line and "AWS_ENDPOINT_URL" in line, line
    assert time.monotonic() - start < 30

    mlflow_port = dead_port()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}")
    assert train_job.main([*SMOKE, "--set", "ray.address=local"]) == 2
    line = one_error_line(capsys)
    assert f"http://127.0.0.1:{mlflow_port}" in line and "not reachable" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == []
