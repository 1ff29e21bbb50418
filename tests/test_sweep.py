"""Sweeps: the sweep config and its checks, the summary, the CLI's errors, and a real Tune sweep.

Cheap tests first (no Ray). The last test runs the smoke preset (2 trials, side by side) on a
local Ray with 2 CPUs against a real SQLite MLflow store, interrupts it after the first trial
completes (what Ctrl+C does), resumes it, and checks that nothing finished was run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.sweep.driver import SWEEP_FILE, build_scheduler, plan_sweep, saved_trial_statuses, to_tune
from pipelines.sweep.spec import base_config, identity, load_sweep_config, sweep_config_from_dict, validate_sweep
from pipelines.sweep.summary import accuracy_columns, plot_summary, render_leaderboard, write_trials_table
from pipelines.sweep.trial import ASHA_TIME_ATTR, INTERRUPT_ENV, tag_epoch_report
from rna_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "sweep_smoke.yaml"
ABLATION = REPO / "configs" / "sweep_random_space_ablation.yaml"
STRATEGIES = REPO / "configs" / "sweep_strategies.yaml"
PY = sys.executable


def _smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


# ----------------------------------------------------------------------------- the sweep config


def test_smoke_preset_parses_and_validates():
    sc = load_sweep_config(str(SMOKE))
    validate_sweep(sc)
    s = sc.sweep
    # the metric is named by the PGD steps the trials' per-epoch evaluation runs (eval_pgd_steps: 2)
    assert (s.search, s.metric, s.mode, s.scheduler, s.max_concurrent_trials) == ("grid", "pgd2_acc", "max", "asha", 2)
    assert s.num_trials() == 2 and [d.key for d in s.space] == ["model.norm"]
    assert s.space[0].values == ("bn,gns:1", "bn,in,bgn:8")
    assert to_tune(s.space[0]) == {"grid_search": ["bn,gns:1", "bn,in,bgn:8"]}
    b = base_config(sc)
    assert (b.model.name, b.data.dataset, b.ray.num_workers, b.ray.cpus_per_worker) == (
        "small_cnn",
        "synthetic",
        1,
        0.5,
    )
    assert 2 * (b.ray.num_workers * b.ray.cpus_per_worker + s.trial_cpus) <= 2  # both trials fit 2 CPUs at once


def test_ablation_preset_is_the_papers_random_space_study():
    sc = load_sweep_config(str(ABLATION))
    validate_sweep(sc)  # every space builds on resnet18 (groups divide 64..512 channels)
    dims = {d.key: d for d in sc.sweep.space}
    norms = dims["model.norm"].values
    assert {"bn,in", "bn,gn:8", "bn,gns:1", "bn,ln", "bn,in,ln,gns:1"} <= set(norms)
    assert dims["train.sampling"].values == ("uniform", "shared")
    assert sc.sweep.num_trials() == 2 * len(norms)
    b = base_config(sc)
    assert (b.model.name, b.data.dataset, b.train.epochs, b.train.attack.steps, b.train.lr) == (
        "resnet18",
        "cifar10",
        200,
        10,
        0.1,
    )
    assert 1 <= b.ray.num_workers <= 2 and b.ray.use_gpu == "true" and b.train.eval_every == 1


def test_strategies_preset_compares_the_sampling_strategies_on_real_data():
    sc = load_sweep_config(str(STRATEGIES))
    s = sc.sweep
    assert [d.key for d in s.space] == ["train.sampling"] and s.space[0].values == ("uniform", "shared", "far:0.5")
    assert (s.scheduler, s.metric, s.num_trials(), s.max_concurrent_trials) == ("none", "pgd10_acc", 3, 3)
    b = base_config(sc)
    assert (b.model.name, b.model.norm, b.data.dataset, b.data.data_dir) == (
        "small_cnn",
        "bn,gns:1",
        "cifar10",
        "./data/cifar10",
    )
    assert 0 < b.data.train_limit <= 4096 and b.data.eval_limit >= 256 and b.train.mode == "blackbox"
    assert 3 * (b.ray.num_workers * b.ray.cpus_per_worker + s.trial_cpus) <= 2  # the three trials fit 2 CPUs at once


def test_space_forms_domains_and_overrides():
    data = _smoke_dict()
    data["sweep"] = {
        "search": "random",
        "num_samples": 3,
        "seed": 7,
        "space": {
            "model": {"norm": ["bn,gns:1", "bn,gn:8,gn:16"]},  # nested section + list shorthand (choice under random)
            "train.sampling": {"choice": ["uniform", "shared", "far:0.5"]},
            "train.lr": {"loguniform": [0.01, 0.2]},
            "train.seed": {"randint": [0, 3]},
            "train.mode": {"grid": ["blackbox", "whitebox"]},
        },
    }
    sc = sweep_config_from_dict(data, ["sweep.max_concurrent_trials=1", "train.epochs=3"])
    validate_sweep(sc)
    dims = {d.key: d for d in sc.sweep.space}
    assert dims["model.norm"].kind == "choice" and dims["train.mode"].kind == "grid"
    assert sc.sweep.max_concurrent_trials == 1 and base_config(sc).train.epochs == 3 and sc.sweep.seed == 7
    assert sc.sweep.num_trials() == 3 * 2  # num_samples x the grid
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(to_tune(dims["train.lr"]), Float) and to_tune(dims["train.lr"]).lower == 0.01
    seed = to_tune(dims["train.seed"])
    assert isinstance(seed, Integer) and (seed.lower, seed.upper) == (0, 4)  # ours inclusive, Tune's exclusive
    assert isinstance(to_tune(dims["train.sampling"]), Categorical)
    # under grid search a plain list is a grid, and sampled domains are refused
    data["sweep"] = {"search": "grid", "space": {"model.norm": ["bn", "bn,in"]}}
    assert sweep_config_from_dict(data).sweep.space[0].kind == "grid"
    data["sweep"]["space"]["train.lr"] = {"uniform": [0.01, 0.1]}
    with pytest.raises(ConfigError, match="search is grid but sweep.space.train.lr is uniform"):
        sweep_config_from_dict(data)


def test_arms_set_several_keys_together_and_cross_the_space():
    """An arm is one grid value that sets a method with its options (what independent keys cannot)."""
    from pipelines.sweep.driver import SweepPlan, _param_space
    from pipelines.sweep.spec import arm_params, trial_config
    from pipelines.tracking import RunRef

    data = _smoke_dict()
    data["sweep"] = {
        "space": {"train.lr": {"grid": [0.05, 0.1]}},
        "arms": {
            "bn": {"model.norm": "bn"},
            "rpt": {"model": {"method": "rpt", "norm": "bn", "precisions": "4-8"}},  # nested form
            "rna_eot": {"model.norm": "bn,gns:1", "train.mode": "eot"},
        },
    }
    sc = sweep_config_from_dict(data, ["sweep.arms.rna_eot.train.eot_iter=3"])  # --set reaches an arm
    validate_sweep(sc)
    spec = sc.sweep
    assert [a.name for a in spec.arms] == ["bn", "rpt", "rna_eot"] and spec.num_trials() == 3 * 2
    assert spec.arm("rna_eot").as_dict() == {"model.norm": "bn,gns:1", "train.mode": "eot", "train.eot_iter": 3}
    cfg = trial_config(base_config(sc), arm_params(spec, "rpt", {"train.lr": 0.05}))
    assert (cfg.model.method, cfg.model.precisions, cfg.train.lr, cfg.train.mode) == ("rpt", "4-8", 0.05, "blackbox")
    cfg = trial_config(base_config(sc), arm_params(spec, "rna_eot", {"train.lr": 0.1}))
    assert (cfg.model.method, cfg.model.norm, cfg.train.mode, cfg.train.eot_iter) == ("rna", "bn,gns:1", "eot", 3)
    # Tune crosses the arm names with the space; the trial looks the settings up by name
    plan = SweepPlan(sc, "x", "/tmp/x", "/tmp/x/trials", None)
    ps = _param_space(plan, RunRef("sqlite:///x.db", "0", "r"))
    assert ps["arm"] == {"grid_search": ["bn", "rpt", "rna_eot"]}
    assert ps["params"]["train.lr"] == {"grid_search": [0.05, 0.1]}
    assert ps["sweep"]["arms"]["rpt"]["model.method"] == "rpt"
    # the flattened form (MLflow params, the resume identity) reads back
    again = sweep_config_from_dict({**data, "sweep": {**data["sweep"], "arms": identity(sc)["sweep"]["arms"]}})
    assert again.sweep.arms == spec.arms
    # arms alone make a sweep (no space needed)
    data["sweep"] = {"arms": {"a": {"model.norm": "bn"}, "b": {"model.norm": "bn,gns:1"}}}
    assert sweep_config_from_dict(data).sweep.num_trials() == 2


@pytest.mark.parametrize(
    "arms, space, needle",
    [
        ({"a": {"model.normm": "bn"}}, None, "not a config key (did you mean model.norm?)"),
        ({"a": {"model.norm": "bn,zz"}}, None, "zz"),
        ({"a": {"model.method": "rpt", "model.norm": "bn,gns:1"}}, None, "rpt"),
        ({"a": {"mlflow.experiment": "x"}}, None, "cannot be swept"),
        ({"a b": {"model.norm": "bn"}}, None, "arm name 'a b'"),
        ({"a": {}}, None, "must map config keys to values"),
        ({"a": {"model.norm": "bn"}}, {"model.norm": {"grid": ["bn"]}}, "both in sweep.space and in sweep.arms"),
    ],
    ids=["unknown key", "unknown norm", "bad combination", "unsweepable", "bad name", "empty", "key twice"],
)
def test_bad_arms_are_one_line_config_errors(arms, space, needle):
    data = _smoke_dict()
    data["sweep"] = {"arms": arms, **({"space": space} if space else {})}
    with pytest.raises(ConfigError) as info:
        validate_sweep(sweep_config_from_dict(data))
    message = str(info.value)
    assert needle in message and "\n" not in message, message


@pytest.mark.parametrize(
    "space, extra, needle",
    [
        ({"train.lrr": {"grid": [0.1]}}, {}, "'train.lrr' is not a config key (did you mean train.lr?)"),
        ({"model.norm": {"grid": ["bn,gns:1", "bn,zz"]}}, {}, "zz"),
        ({"model.norm": {"grid": ["bn,gn:3"]}}, {}, "3 groups do not divide"),  # small_cnn has 16 channels
        ({"model.norm": {"grid": ["bn,gns:1", "gns:1,gn:16"]}}, {}, "two identical candidates at layer 'norm1'"),
        ({"train.sampling": {"grid": ["uniform", "far:2"]}}, {}, "far:2"),
        ({"train.lr": {"grid": [0.1, -1]}}, {}, "train.lr must be positive"),
        ({"mlflow.experiment": {"grid": ["a", "b"]}}, {}, "cannot be swept"),
        ({"model.norm": {"grid": ["bn", "bn"]}}, {}, "lists a value twice"),
        ({"model.norm": "bn"}, {}, "single value"),
        ({"model.norm": {"grid": ["bn"], "choice": ["in"]}}, {}, "exactly one of"),
        ({"train.lr": {"loguniform": [0, 0.1]}}, {"search": "random"}, "low > 0"),
        ({"train.epochs": {"uniform": [1, 3]}}, {"search": "random"}, "integer; use randint"),
        ({"model.norm": {"sample": ["bn"]}}, {}, "'model.norm.sample' is not a config key (did you mean model.norm?)"),
        ({"model.norm": {"grid": ["bn"]}}, {"metric": "acc_eot_pgd_eot"}, "not reported every epoch"),
        ({"model.norm": {"grid": ["bn"]}}, {"metric": "pgd20_acc"}, "pgd<k>_acc names the PGD steps"),  # 2 steps run
        ({"train.eval_pgd_steps": {"grid": [2, 3]}}, {"metric": "pgd2_acc"}, "cannot then be swept"),
        ({"model.norm": {"grid": ["bn"]}}, {"scheduler": "hyperband"}, "sweep.scheduler"),
        ({"model.norm": {"grid": ["bn"]}}, {"searcher": "grid"}, "unknown config key 'sweep.searcher'"),
        ({"train.eval_every": {"grid": [1, 2]}}, {"metric": "pgd2_acc"}, "needs train.eval_every: 1"),
    ],
    ids=[
        "unknown key",
        "unknown norm",
        "groups do not divide",
        "identical candidates",
        "bad strategy",
        "bad lr",
        "unsweepable",
        "duplicate",
        "scalar",
        "two domains",
        "log low",
        "float range on int",
        "unknown domain",
        "final metric",
        "steps the trials do not run",
        "metric named by a swept key",
        "bad scheduler",
        "bad sweep key",
        "metric needs eval every epoch",
    ],
)
def test_bad_sweeps_are_one_line_config_errors(space, extra, needle):
    data = _smoke_dict()
    data["sweep"] = {"space": space, **extra}
    with pytest.raises(ConfigError) as info:
        validate_sweep(sweep_config_from_dict(data))
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_no_sweep_section_or_space():
    with pytest.raises(ConfigError, match="no sweep: section"):
        sweep_config_from_dict(yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text()))
    data = _smoke_dict()
    data["sweep"] = {"search": "grid"}
    with pytest.raises(ConfigError, match="needs a space"):
        sweep_config_from_dict(data)


def test_tune_sees_the_asha_time_only_before_the_last_epoch():
    """A trial at its last epoch must not be stopped while it runs its final evaluation."""
    reports = [tag_epoch_report({"epoch": float(e), "pgd2_acc": 0.1}, epochs=3) for e in (1, 2, 3)]
    assert [r.get(ASHA_TIME_ATTR) for r in reports] == [1, 2, None]
    assert all(r["pgd2_acc"] == 0.1 for r in reports)


def test_asha_stops_a_weak_trial_between_epochs_but_never_in_its_last_epoch():
    """Tune's real ASHAScheduler as the sweep builds it, fed the reports the trials send."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    sc = load_sweep_config(str(SMOKE), ["train.epochs=3", "sweep.asha.reduction_factor=2"])
    sched = build_scheduler(sc.sweep, base_config(sc))
    assert sched.set_search_properties(sc.sweep.metric, sc.sweep.mode)  # what TuneConfig does
    trials = {n: SimpleNamespace(trial_id=n) for n in ("good", "bad", "worst_at_end")}
    for t in trials.values():
        sched.on_trial_add(None, t)

    def report(name: str, epoch: int, acc: float) -> str:
        return sched.on_trial_result(None, trials[name], tag_epoch_report({"epoch": float(epoch), "pgd2_acc": acc}, 3))

    assert report("good", 1, 0.5) == TrialScheduler.CONTINUE
    assert report("bad", 1, 0.1) == TrialScheduler.STOP  # below the rung's median after epoch 1
    assert report("good", 2, 0.6) == TrialScheduler.CONTINUE
    assert report("worst_at_end", 1, 0.5) == TrialScheduler.CONTINUE
    assert report("worst_at_end", 3, 0.0) == TrialScheduler.CONTINUE  # last epoch: its final evaluation runs
    assert build_scheduler(load_sweep_config(str(SMOKE), ["sweep.scheduler=none"]).sweep, base_config(sc)) is None


def test_plan_refuses_foreign_folders_and_changed_sweeps(tmp_path, monkeypatch):
    from pipelines.run_folder import write_job_file

    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    sc = load_sweep_config(str(SMOKE), [f"ray.storage_path={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        plan_sweep(sc, str(SMOKE), resume=True)
    fresh = plan_sweep(sc, str(SMOKE))
    assert fresh.name == "sweep_smoke" and fresh.sweep_dir == f"{tmp_path}/runs/sweep_smoke" and fresh.stored is None
    assert fresh.trials_dir == f"{tmp_path}/runs/sweep_smoke/trials"
    (tmp_path / "runs" / "other").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not written by jobs/sweep.py"):
        plan_sweep(load_sweep_config(str(SMOKE), [f"ray.storage_path={tmp_path}/runs", "sweep.name=other"]))
    write_job_file(fresh.sweep_dir, {"identity": identity(fresh.cfg), "mlflow": {}}, name=SWEEP_FILE)
    again = plan_sweep(sc, str(SMOKE))  # the folder exists: a resume, without --resume
    assert again.stored is not None
    changed = load_sweep_config(str(SMOKE), [f"ray.storage_path={tmp_path}/runs", "train.lr=0.2"])
    with pytest.raises(ConfigError, match=r"the sweep changed at base.train.lr \(0.05 then, 0.2 now\)"):
        plan_sweep(changed, str(SMOKE))
    # how many run at once may change on resume
    fewer = load_sweep_config(str(SMOKE), [f"ray.storage_path={tmp_path}/runs", "sweep.max_concurrent_trials=1"])
    assert plan_sweep(fewer, str(SMOKE)).stored is not None


def test_a_sweep_stopped_before_its_file_is_written_leaves_no_orphan_parent_run(tmp_path, monkeypatch):
    """Ctrl+C between creating the parent MLflow run and writing rna_sweep.json: the next start adopts it."""
    import pipelines.sweep.driver as sweep
    from pipelines import tracking
    from pipelines.train import JOB_FILE_TAG

    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    sc = load_sweep_config(str(SMOKE), [f"ray.storage_path={tmp_path}/runs"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sweep, "write_job_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(sc, config_path=str(SMOKE), echo=lambda s: None)
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(base_config(sc).mlflow.experiment)
    (orphan,) = client.search_runs([exp.experiment_id])
    assert orphan.info.status == "KILLED" and orphan.data.tags[JOB_FILE_TAG] == "pending"
    plan = plan_sweep(sc, str(SMOKE))
    assert plan.stored is None  # nothing on disk names that run

    lines: list[str] = []
    _, ref = sweep.open_parent(plan, "sweep: {}", lines.append)
    assert ref.run_id == orphan.info.run_id and len(client.search_runs([exp.experiment_id])) == 1
    assert client.get_run(ref.run_id).info.status == "RUNNING"
    assert lines == [
        f"reusing MLflow parent run {ref.run_id} of an earlier attempt stopped before {SWEEP_FILE} was written"
    ]
    tracking.end_run(client, ref.run_id, "KILLED")


# ----------------------------------------------------------------------------- the summary


def _rows():
    base = {
        "status": "completed",
        "train_mode": "blackbox",
        "seed": 0,
        "epochs_done": 2,
        "best_pgd2_acc": None,
        "clean_acc": 0.55,
        "acc_natural_transfer": 0.5,
        "acc_pgd20_steps2_transfer": 0.3,
        "acc_eot_pgd_steps2_eot": 0.1,
        "seconds": 12.5,
    }
    specs = [
        ("t0", "bn,gns:1", 2, "uniform", 0.31),
        ("t1", "bn,in,ln", 3, "uniform", 0.42),
        ("t2", "bn,gns:1", 2, "shared", 0.12),
        ("t3", "bn,in,ln", 3, "shared", None),
    ]
    rows = []
    for tid, norm, k, s, acc in specs:
        rows.append(
            {
                **base,
                "trial_id": tid,
                "mlflow_run_id": f"run-{tid}",
                "model.norm": norm,
                "train.sampling": s,
                "norm": norm,
                "space_size": k,
                "num_paths": float(k**4),
                "sampling": s,
                "pgd2_acc": acc,
                "status": "completed" if acc is not None else "error",
            }
        )
    rows.sort(key=lambda r: (r["pgd2_acc"] is None, -(r["pgd2_acc"] or 0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def test_summary_table_leaderboard_and_plots(tmp_path):
    sc = load_sweep_config(str(SMOKE))
    data = _smoke_dict()
    data["sweep"]["space"] = {
        "model.norm": {"grid": ["bn,gns:1", "bn,in,ln"]},
        "train.sampling": {"grid": ["uniform", "shared"]},
    }
    spec = sweep_config_from_dict(data).sweep
    rows = _rows()
    write_trials_table(rows, str(tmp_path / "trials.parquet"))
    table = pq.read_table(tmp_path / "trials.parquet")
    assert table.column("trial_id").to_pylist() == ["t1", "t0", "t2", "t3"]
    assert (
        str(table.schema.field("space_size").type) == "int64" and str(table.schema.field("pgd2_acc").type) == "double"
    )
    assert table.column("pgd2_acc").to_pylist()[-1] is None and table.column("status").to_pylist()[-1] == "error"

    board = render_leaderboard(rows, spec, "demo", "parent123", base_config(sc))
    lines = [ln for ln in board.splitlines() if ln.startswith("| ")]
    assert lines[0].split(" | ")[:4] == ["| rank", "trial_id", "model.norm", "train.sampling"]
    assert [ln.split(" | ")[1] for ln in lines[1:]] == ["t1", "t0", "t2", "t3"]  # ranked by pgd2_acc, failures last
    assert "| 1 | t1 | bn,in,ln | uniform |" in board and "0.4200" in board
    assert (
        "3 completed" in board and "1 failed" in board and "`parent123`" in board and "on the held-out slice" in board
    )
    assert lines[0].split(" | ")[8:12] == [  # the accuracies the child runs log, named as they log them
        "clean_acc",
        "acc_natural_transfer",
        "acc_pgd20_steps2_transfer",
        "acc_eot_pgd_steps2_eot",
    ]

    assert accuracy_columns(rows) == [
        "clean_acc",
        "pgd2_acc",
        "acc_natural_transfer",
        "acc_pgd20_steps2_transfer",
        "acc_eot_pgd_steps2_eot",
    ]
    with_url = render_leaderboard(rows, spec, "demo", "parent123", base_config(sc), "http://127.0.0.1:5000/#/x")
    assert with_url.rstrip().endswith("http://127.0.0.1:5000/#/x") and "http" not in board

    files = plot_summary(rows, "pgd2_acc", str(tmp_path))
    assert [Path(f).name for f in files] == [
        "robust_acc_vs_space_size.png",
        "robust_acc_by_strategy.png",
        "accuracies_by_trial.png",
    ]
    for f in files:
        blob = Path(f).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert sc.sweep.metric == "pgd2_acc"


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.slow  # runs the job as a process; the in-process checks below stay fast
def test_cli_bad_input_exits_2_with_one_line_and_nothing_started(tmp_path):
    """The real process: exit 2, one stderr line, no traceback, no Ray, nothing written."""
    env = {**os.environ, "RNA_BASE_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            PY,
            str(REPO / "jobs" / "sweep.py"),
            "--config",
            str(SMOKE),
            "--set",
            "sweep.space.train.lr={grid: [0.1, -1]}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sweep.py: error:") and "train.lr=-1" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "--config"),
        (["--config", "configs/nope.yaml"], "does not exist"),
        (["--config", str(REPO / "configs" / "smoke.yaml")], "no sweep: section"),
        (["--config", str(SMOKE), "--set", "sweep.space.model.norm={grid: [bn, 'bn,gn:3']}"], "3 groups do not divide"),
        (["--config", str(SMOKE), "--resume"], "nothing to resume"),
        (
            ["--config", str(SMOKE), "--set", "data.dataset=cifar10", "--set", "data.data_dir=nodata"],
            "cifar10 data not found",
        ),
    ],
    ids=["no config", "missing file", "not a sweep", "bad value", "nothing to resume", "no data"],
)
def test_cli_errors_in_process(argv, needle, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    from jobs.sweep import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a real sweep


def _children(client, parent_run_id: str, experiment_id: str) -> dict[str, dict]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    out = {}
    for r in runs:
        tid = r.data.tags["rna.trial_id"]
        assert tid not in out, f"two child runs for trial {tid}"
        out[tid] = {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "start": r.info.start_time,
            "end": r.info.end_time,
            "params": r.data.params,
            "tags": r.data.tags,
            "loss_steps": sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")),
        }
    return out


def _trial_errors(sweep_dir: Path) -> str:
    """The errors Tune saved for failed trials (error.txt in each trial folder): what a failure needs said."""
    texts = [f"{p.parent.name}: {p.read_text()[-3000:]}" for p in sorted(sweep_dir.rglob("error.txt"))]
    return "\n".join(texts) or "no trial saved an error"


def _checkpoints(trials_dir: Path, trial_id: str) -> dict[str, float]:
    folder = trials_dir / trial_id
    return {p.name: p.stat().st_mtime for p in folder.glob("epoch_*")} if folder.is_dir() else {}


@pytest.fixture
def sweep_env(tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(INTERRUPT_ENV, raising=False)
    yield tmp_path
    ray.shutdown()


@pytest.mark.slow  # starts Ray and runs two training trials
def test_smoke_sweep_runs_trials_side_by_side_and_resumes_without_rerunning(sweep_env, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    from jobs.sweep import main
    from pipelines import tracking

    root = sweep_env
    argv = ["--config", str(SMOKE), "--set", "ray.address=local", "--set", f"ray.storage_path={root}/ray_results"]
    sweep_dir = root / "ray_results" / "sweep_smoke"

    # 1. Both trials start at once (max_concurrent_trials 2 on 2 CPUs); Ctrl+C after the first one completes.
    monkeypatch.setenv(INTERRUPT_ENV, "1")
    rc = main(argv)
    assert rc == 130, f"exit {rc}; {_trial_errors(sweep_dir)}"
    out1 = capsys.readouterr().out
    assert "interrupted: sweep_smoke" in out1 and "--resume" in out1
    stored = json.loads((sweep_dir / SWEEP_FILE).read_text())
    parent = tracking.RunRef.from_dict(stored["mlflow"])
    client = tracking.client_for(parent.tracking_uri)
    assert client.get_run(parent.run_id).info.status == "KILLED"
    first = _children(client, parent.run_id, parent.experiment_id)
    assert len(first) == 2, first.keys()  # both trials had started their training runs
    done = {t: c for t, c in first.items() if c["status"] == "FINISHED"}
    saved = saved_trial_statuses(str(sweep_dir))  # what Tune will resume from
    assert set(saved) == set(first) and "TERMINATED" in saved.values(), saved
    assert {t for t, st in saved.items() if st == "TERMINATED"} <= set(done)
    a, b = sorted(first.values(), key=lambda c: c["end"] or 0)[:2]
    assert b["start"] < a["end"]  # the trials overlapped in time
    for c in first.values():
        assert c["status"] in ("FINISHED", "KILLED") and c["params"]["train.seed"] == "0"
    ckpt_before = {t: _checkpoints(sweep_dir / "trials", t) for t in done}

    # 2. Resume: finished trials are not run again; the interrupted one continues in its own child run.
    monkeypatch.delenv(INTERRUPT_ENV)
    rc = main([*argv, "--resume"])
    assert rc == 0, f"exit {rc}; {_trial_errors(sweep_dir)}"
    out2 = capsys.readouterr().out
    assert "resuming sweep sweep_smoke" in out2 and "done: sweep sweep_smoke, 2 trials (resumed)" in out2
    after = _children(client, parent.run_id, parent.experiment_id)
    assert set(after) == set(first)  # the same two Tune trials, no new ones
    assert all(c["status"] == "FINISHED" for c in after.values())
    for t, c in done.items():  # untouched: same run, same end, no epoch logged twice, no new checkpoint
        assert after[t]["run_id"] == c["run_id"] and after[t]["end"] == c["end"]
        assert after[t]["loss_steps"] == c["loss_steps"]
        assert _checkpoints(sweep_dir / "trials", t) == ckpt_before[t]
    for t in set(first) - set(done):  # resumed into the same MLflow run
        assert after[t]["run_id"] == first[t]["run_id"]
        assert after[t]["tags"]["rna.trial_status"] in ("completed", "early_stopped")
    for c in after.values():
        assert c["tags"]["mlflow.parentRunId"] == parent.run_id and c["tags"]["rna.trial_seed"] == "0"
        assert len(c["loss_steps"]) == len(set(c["loss_steps"])) >= 1
        if c["tags"]["rna.trial_status"] == "completed":
            assert c["loss_steps"] == [1, 2]
    norms = sorted(c["params"]["model.norm"] for c in after.values())
    assert norms == ["bn,gns:1", "bn,in,bgn:8"]  # distinct params, the swept values

    # 3. The parent holds the summary: both trials in the table and the leaderboard, the plots.
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.norm"] == "<swept>"
    assert run.data.metrics["num_trials"] == 2 and 0 <= run.data.metrics["best_pgd2_acc"] <= 1
    names = {a.path for a in client.list_artifacts(parent.run_id, "summary")}
    assert names == {
        f"summary/{n}"
        for n in (
            "trials.parquet",
            "leaderboard.md",
            "robust_acc_vs_space_size.png",
            "robust_acc_by_strategy.png",
            "accuracies_by_trial.png",
        )
    }
    table = pq.read_table(client.download_artifacts(parent.run_id, "summary/trials.parquet")).to_pylist()
    assert {r["trial_id"] for r in table} == set(after)
    assert {r["mlflow_run_id"] for r in table} == {c["run_id"] for c in after.values()}
    assert sorted((r["model.norm"], r["space_size"], r["num_paths"]) for r in table) == [
        ("bn,gns:1", 2, 16.0),
        ("bn,in,bgn:8", 3, 81.0),
    ]
    assert [r["rank"] for r in table] == [1, 2] and table[0]["pgd2_acc"] >= table[1]["pgd2_acc"]
    board = Path(client.download_artifacts(parent.run_id, "summary/leaderboard.md")).read_text()
    assert all(t in board for t in after) and "2 trials" in board
    assert "#/compare-runs?runs=" in board and all(c["run_id"] in board for c in after.values())
    assert {r["clean_acc"] is not None for r in table} == {True}  # the accuracies the compare view shows
    assert run.data.tags["rna.best_trial"] == table[0]["trial_id"]


def test_a_local_ray_has_room_for_a_trial_driver_beside_a_worker_that_takes_every_core():
    from pipelines.cluster import local_cpus

    sc = load_sweep_config(str(REPO / "configs" / "reproduction_cpu.yaml"), ["data.data_dir=/nonexistent"])
    b, s = base_config(sc), sc.sweep
    cores = os.cpu_count() or 1
    assert b.ray.num_workers * b.ray.cpus_per_worker == 2 and s.max_concurrent_trials == 1
    assert local_cpus(b) == max(cores, 2)  # the worker alone
    assert local_cpus(b, s.trial_cpus) == max(cores, 3)  # 2.01 CPUs asked: 3 logical CPUs, not 2
    assert local_cpus(b, 0.0) == local_cpus(b, 1e-12)  # no rounding noise
