"""The evaluation fan-out (pipelines/evaluation/, jobs/evaluate.py) on a real local Ray and MLflow store.

One SQLite MLflow store for the module, with a small_cnn over the paper's space bn,gns:1 saved as a
training job saves it and its test set written as a Parquet dataset, the way users' data arrives.
Planning and bad-input tests use its seeded initial weights (no training, no Ray); the fan-out
tests (`slow`) train it for two epochs in-process on a low-contrast synthetic task (so eps 8/255 is
a real threat) and run on one local Ray (2 CPUs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import low_contrast

import rna_core
from pipelines import tracking
from pipelines.checkpoints import CHECKPOINT_ARTIFACT
from pipelines.evaluation.job import run_evaluation
from pipelines.evaluation.plan import plan_evaluation
from pipelines.evaluation.source import load_source
from pipelines.evaluation.store import done_units
from pipelines.evaluation.tasks import InjectedFailure, build_task_model
from rna_core.attacks import get_attack
from rna_core.builders import model_from_config as build_model
from rna_core.checkpoint import read_checkpoint, save_checkpoint
from rna_core.config import EvalConfig, TrainConfig, flatten, load_config
from rna_core.data import BatchIterator, make_synthetic, write_parquet_dataset
from rna_core.errors import CheckpointMismatchError, ConfigError
from rna_core.eval_config import DEFAULT_ATTACKS
from rna_core.evaluation import evaluate_model, read_rows_parquet, result_metric
from rna_core.optim import build_optimizer
from rna_core.speed import AutocastForward, evaluation_forward
from rna_core.training import train_epoch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FIXED_PATH = "0110"

# Small and fast: 64 test images in 2 shards of 2 batches; PGD with 3 steps; EOT over 2 draws.
SMALL = dict(
    attacks=("fgsm", "pgd20"),
    attack_settings={"pgd20": {"steps": 3}},
    protocols=("transfer", "eot"),
    trials=2,
    batch_size=16,
    shard_size=32,
    eot_iter=2,
    seed=3,
    path_analysis=0,
    progress_every=2.0,
)


def _log_training_run(client, exp_id: str, ckpt_dir: Path, name: str) -> str:
    """A training run laid out as the training job leaves it: the checkpoint folder under "checkpoint"."""
    run_id = tracking.start_run(client, exp_id, name, {"model.name": "small_cnn"}, {})
    client.log_artifacts(run_id, str(ckpt_dir), "checkpoint")
    tracking.end_run(client, run_id)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store, a checkpoint (seeded init, untrained), its Parquet test set and a training run: no Ray."""
    root = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("RNA_BASE_DIR", str(root))
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("MLFLOW_EXPERIMENT_ID", "0")  # must redirect nothing: runs go to explicit experiments

    data_dir = root / "data"
    test = low_contrast(make_synthetic(64, seed=0, split="test"))
    write_parquet_dataset(data_dir / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.norm=bn,gns:1",
            "data.dataset=cifar10",
            f"data.data_dir={data_dir}",
            "mlflow.experiment=eval-tests",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt_dir = root / "init_run" / "checkpoint_000000"
    ckpt = save_checkpoint(ckpt_dir / "checkpoint.pt", model, epoch=0, config=cfg)
    client = tracking.client_for(uri)
    exp_id = tracking.get_or_create_experiment(client, "train-exp", tracking.artifact_root_for(uri))
    run_id = _log_training_run(client, exp_id, ckpt_dir, "init")
    yield {
        "root": root,
        "uri": uri,
        "ckpt": str(ckpt),
        "run_id": run_id,
        "exp_id": exp_id,
        "client": client,
        "cfg": cfg,
        "model": model,
    }
    mp.undo()


@pytest.fixture(scope="module")
def env(store):
    """`store` plus a model trained two epochs in-process (so eps 8/255 is a real threat), its training
    run, and a local Ray (2 CPUs)."""
    import ray

    root, cfg = store["root"], store["cfg"]
    model = build_model(cfg)
    model.load_state_dict(store["model"].state_dict())
    train = low_contrast(make_synthetic(384, seed=0, split="train"))
    tcfg = TrainConfig(
        mode="natural", lr=0.1, epochs=1, weight_decay=0.0, amp_bf16="false", channels_last="false"
    )  # same model on every CPU
    opt = build_optimizer(model, tcfg)
    sampler = rna_core.PathSampler("uniform", seed=0)
    for epoch in range(2):
        train_epoch(model, BatchIterator(train, 32, shuffle=True, seed=0, epoch=epoch), opt, tcfg, sampler)
    ckpt_dir = root / "train_run" / "checkpoint_000001"
    ckpt = save_checkpoint(ckpt_dir / "checkpoint.pt", model, epoch=2, config=cfg)
    train_run = _log_training_run(store["client"], store["exp_id"], ckpt_dir, "train")

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield {**store, "ckpt": str(ckpt), "run_id": train_run}
    ray.shutdown()


def _plan(env, out: str, source: dict | None = None, fail_once_marker: str | None = None, **changes):
    source = source or {"checkpoint": env["ckpt"]}
    plan = plan_evaluation(load_source(**source), EvalConfig(**{**SMALL, **changes, "out_dir": str(env["root"] / out)}))
    plan.fail_once_marker = fail_once_marker  # the test hook goes to run_evaluation (see _run)
    return plan


def _run(plan, echo=lambda s: None):
    return run_evaluation(plan, echo=echo, fail_once_marker=getattr(plan, "fail_once_marker", None))


def _sequential(env, plan, share_attacks: bool = True) -> dict:
    """The in-process sequential evaluation (rna_core's evaluate_model) of the same model and data."""
    payload = read_checkpoint(env["ckpt"])
    model = build_model(plan.source.cfg)
    model.load_state_dict(payload["model"])
    o = plan.options
    attacks = [get_attack(a, **o.attack_settings.get(a, {})) for a in o.attacks]
    rows = evaluate_model(
        evaluation_forward(model.eval(), o.forward_precision),
        plan.dataset,
        attacks=attacks,
        protocols=o.protocols,
        trials=o.trials,
        seed=o.seed,
        batch_size=o.batch_size,
        eot_iter=o.eot_iter,
        strategy=o.strategy,
        meta={"method": plan.row_meta["method"]},  # e.g. "[bf16 forward]": the plan labels the precision
        progress=False,
        share_attacks=share_attacks,
    )
    return _by_key(rows)


def _by_key(rows) -> dict:
    return {
        (r.attack, r.protocol, r.trial): (r.n, r.correct, r.seed, r.eps, r.model, r.method, r.dataset) for r in rows
    }


# ----------------------------------------------------------------------------- no Ray, no training


def test_units_align_with_batches_and_name_their_attack_settings(store):
    plan = _plan(store, "plan-only", shard_size=20)  # rounded up to 2 batches of 16
    assert {(u.first, u.stop) for u in plan.units} == {(0, 32), (32, 64)}
    assert len(plan.units) == 3 * 2 * 2 * 2  # (natural, fgsm, pgd20) x protocols x trials x shards
    assert len({u.unit_id for u in plan.units}) == len(plan.units)
    other = _plan(store, "plan-only", attack_settings={"pgd20": {"steps": 4}})
    changed = {u.unit_id for u in plan.units} ^ {u.unit_id for u in other.units}
    assert changed and all(uid.startswith("pgd20-") for uid in changed)  # other settings, other units; the rest reused
    assert plan.fingerprint == other.fingerprint
    assert _plan(store, "plan-only", seed=4).fingerprint != plan.fingerprint
    assert len(plan.dataset) == 64 and plan.options.strategy == "uniform"
    assert not (store["root"] / "plan-only").exists()  # planning writes nothing
    assert DEFAULT_ATTACKS == (
        "natural",
        "fgsm",
        "pgd20",
        "cw_l2",
        "mifgsm",
        "deepfool",
        "autoattack",
        "eot_pgd",
        "autoattack_rand",
    )


def test_a_bf16_forward_is_its_own_evaluation_with_tagged_names(store):
    """eval.forward_precision=bf16: other folder and table row, names tagged _bf16, and the task's
    model really runs its convolutions in bf16 (logits fp32, the same paths)."""
    plan = _plan(store, "plan-fp32")
    bf16 = _plan(store, "plan-bf16", forward_precision="bf16")
    assert plan.options.forward_precision == "fp32" and EvalConfig().forward_precision == "fp32"
    assert bf16.fingerprint != plan.fingerprint
    assert bf16.row_meta["method"] == "rna(bn,gns:1) [bf16 forward]" and plan.row_meta["method"] == "rna(bn,gns:1)"
    assert result_metric(get_attack("pgd20"), "transfer") == "acc_pgd20_transfer"
    assert result_metric(get_attack("pgd20"), "transfer", precision="bf16") == "acc_pgd20_bf16_transfer"
    assert result_metric(get_attack("pgd20", steps=3), "eot", 2, "bf16") == "acc_pgd20_steps3_eot_iter2_bf16_eot"
    with pytest.raises(ConfigError, match="eval.forward_precision 'fp16' is unknown; valid: fp32, bf16"):
        _plan(store, "plan-fp16", forward_precision="fp16")

    payload = {"config": flatten(plan.source.cfg), "state": plan.source.state}
    m32, m16 = (build_task_model(payload, torch.device("cpu"), p) for p in ("fp32", "bf16"))
    assert not isinstance(m32, AutocastForward) and isinstance(m16, AutocastForward) and not m16.training
    conv_dtypes = []
    for m in m16.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, a, out: conv_dtypes.append(out.dtype))
    x = make_synthetic(16, seed=1, split="test").images.float() / 255
    rna_core.set_path(m32, rna_core.Path.parse(FIXED_PATH))
    rna_core.set_path(m16, rna_core.Path.parse(FIXED_PATH))
    with torch.no_grad():
        out32, out16 = m32(x), m16(x)
    assert out16.dtype == torch.float32 and conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    assert (out16 - out32).abs().max() < 0.1 * out32.abs().max() and not torch.equal(out16, out32)


def test_a_fixed_path_of_the_wrong_length_is_refused_before_any_data_or_cluster(store):
    with pytest.raises(ConfigError, match="has 2 choices but the model has"):
        _plan(store, "bad-fixed", strategy="fixed:01")
    assert not (store["root"] / "bad-fixed").exists()


def test_an_output_folder_of_another_evaluation_is_refused(store):
    """Unit files are named by attack, protocol, trial and shard only: reusing --out for another
    model used to report the old model's counts under the new model's name."""
    plan = _plan(store, "reuse")
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "evaluation.json").write_text(json.dumps({"fingerprint": "0123456789", "source": "run A"}))
    with pytest.raises(ConfigError, match="holds the evaluation of run A"):
        _plan(store, "reuse")
    assert sorted(p.name for p in plan.out_dir.iterdir()) == ["evaluation.json"]  # nothing written
    (plan.out_dir / "evaluation.json").write_text(json.dumps({"fingerprint": plan.fingerprint}))
    assert _plan(store, "reuse").fingerprint == plan.fingerprint  # the same evaluation resumes
    (plan.out_dir / "evaluation.json").unlink()
    (plan.out_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by jobs/evaluate.py"):
        _plan(store, "reuse")
    assert sorted(p.name for p in plan.out_dir.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="is a file, not a folder"):  # --out below a file
        _plan(store, "reuse/notes.txt/out")


def test_a_checkpoint_with_a_wrong_shaped_tensor_is_refused_on_the_driver(store, tmp_path):
    payload = read_checkpoint(store["ckpt"])
    key = next(k for k, v in payload["model"].items() if v.dim() == 4)
    payload["model"][key] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointMismatchError, match=f"{key} has shape \\[1, 1, 1, 1\\]"):
        load_source(checkpoint=str(bad))


def test_a_selected_checkpoint_is_labelled_in_its_rows(store, tmp_path):
    """A checkpoint written as the epoch selected on val (pipelines.checkpoints.write_selected) names
    itself; its rows never share a table row with the run's last epoch."""
    payload = read_checkpoint(store["ckpt"])
    model = build_model(load_source(checkpoint=store["ckpt"]).cfg)
    model.load_state_dict(payload["model"])
    path = save_checkpoint(
        tmp_path / "selected_val" / "checkpoint.pt",
        model,
        epoch=1,
        config=load_source(checkpoint=store["ckpt"]).cfg,
        extra={"selected_on": "val", "selection_metric": "val_pgd20_acc", "selection_score": 0.5},
    )
    source = load_source(checkpoint=str(path))
    assert (source.selection, source.selected_epoch, source.checkpoint_label) == ("val", 1, "selected on val")
    plan = plan_evaluation(source, EvalConfig(**{**SMALL, "out_dir": str(tmp_path / "out")}))
    assert plan.row_meta["method"] == "rna(bn,gns:1) [selected on val, epoch 1]"
    last = plan_evaluation(
        load_source(checkpoint=store["ckpt"]), EvalConfig(**{**SMALL, "out_dir": str(tmp_path / "out2")})
    )
    assert last.row_meta["method"] == "rna(bn,gns:1)"


def test_cli_flags_are_keys_of_the_eval_section_and_attack_settings_are_in_pixels():
    """Every flag of jobs/evaluate.py is an `eval.<key>` override: the section holds the defaults and
    coerces the values, and attack settings are in pixels/255 like configs (converted in one place)."""
    sys.path.insert(0, str(REPO))
    from jobs.evaluate import FLAGS, attack_set_override, eval_overrides, parse_args

    args = parse_args(
        [
            "--checkpoint",
            "x.pt",
            "--attacks",
            "fgsm,pgd20",
            "--trials",
            "3",
            "--out",
            "/tmp/o",
            "--attack-set",
            "pgd20.steps=5",
            "--attack-set",
            "fgsm.eps=4",
            "--attack-set",
            "pgd20.step_size=1",
        ]
    )
    section = load_config(None, eval_overrides(args)).eval
    assert (section.attacks, section.trials, section.out_dir) == (("fgsm", "pgd20"), 3, "/tmp/o")
    assert section.attack_settings == {"pgd20": {"steps": 5, "step_size": 1}, "fgsm": {"eps": 4}}  # as written
    pgd, fgsm = section.attack("pgd20"), section.attack("fgsm")
    assert (pgd.settings["steps"], pgd.settings["step_size"], fgsm.eps) == (5, 1 / 255, 4 / 255)
    assert {key for _, key, _ in FLAGS} <= {f.name for f in dataclasses.fields(EvalConfig)}
    untouched = parse_args(["--checkpoint", "x.pt"])
    assert (
        eval_overrides(untouched) == [] and load_config(None, eval_overrides(untouched)).eval is None
    )  # defaults: the section's
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(None, eval_overrides(parse_args(["--checkpoint", "x.pt", "--trials", "two"])))
    with pytest.raises(ConfigError, match="ATTACK.SETTING=VALUE"):
        attack_set_override("steps=5")


# ----------------------------------------------------------------------------- Ray fan-out


@pytest.mark.slow  # starts Ray (the env fixture trains a model and starts a local Ray)
@pytest.mark.parametrize("strategy", [f"fixed:{FIXED_PATH}", "uniform"], ids=["fixed path", "random paths"])
def test_fan_out_equals_the_sequential_evaluation(env, strategy):
    plan = _plan(env, f"equal-{strategy.replace(':', '-')}", strategy=strategy)
    out = _run(plan)
    assert out.units_run == out.units_total == 24 and out.units_skipped == 0
    fanned = _by_key(out.rows)
    assert fanned == _sequential(env, plan)  # every (attack, protocol, trial): same n, correct, seed
    assert _by_key(read_rows_parquet(out.results_path)) == fanned
    acc = {k: v[1] / v[0] for k, v in fanned.items()}
    assert acc[("natural", "transfer", 0)] >= 0.4, "the test model did not learn the task"
    assert acc[("fgsm", "transfer", 0)] < acc[("natural", "transfer", 0)]  # the attacks really ran
    if strategy.startswith("fixed"):  # one path: the protocols coincide, and trials differ only by attack noise
        assert all(acc[(a, "transfer", t)] == acc[(a, "eot", t)] for a in ("natural", "fgsm") for t in (0, 1))


@pytest.mark.slow  # starts Ray
def test_protocols_that_share_an_attack_run_as_one_task_per_shard_with_the_rows_of_separate_runs(env):
    """transfer, fixed-path and transfer-raw of an attack on a shard are one Ray task that attacks once;
    its rows equal the sequential evaluation's with every protocol attacking on its own."""
    plan = _plan(
        env,
        "shared",
        attacks=("fgsm", "pgd20", "cw_l2"),  # CW hands examples back clean: transfer's fill runs
        attack_settings={"pgd20": {"steps": 3}, "cw_l2": {"steps": 3}},
        protocols=("transfer", "fixed-path", "transfer-raw"),
        trials=1,
    )
    lines: list[str] = []
    out = _run(plan, echo=lines.append)
    n = len(plan.units)
    assert n == 4 * 3 * 2 and any(f"{n} unit(s) to run as {n // 3} Ray tasks" in ln for ln in lines), lines
    assert _by_key(out.rows) == _sequential(env, plan, share_attacks=False)
    acc = {k: v[1] / v[0] for k, v in _by_key(out.rows).items()}
    assert acc[("pgd20", "fixed-path", 0)] < acc[("natural", "fixed-path", 0)]  # the attack ran


@pytest.mark.slow  # starts Ray
def test_a_bf16_forward_fan_out_equals_its_sequential_evaluation(env):
    plan = _plan(env, "equal-bf16", forward_precision="bf16", trials=1, protocols=("transfer",))
    out = _run(plan)
    assert _by_key(out.rows) == _sequential(env, plan)  # the tasks ran evaluation_forward(model, "bf16")
    assert {r.method for r in out.rows} == {"rna(bn,gns:1) [bf16 forward]"}
    assert "acc_pgd20_steps3_bf16_transfer" in out.metrics and not any(
        k.startswith("acc_") and "_bf16" not in k for k in out.metrics
    )


@pytest.mark.slow  # starts Ray
def test_failed_unit_is_retried_by_ray_and_its_rows_appear_once(env):
    marker = env["root"] / "fail-once"
    plan = _plan(env, "retry", fail_once_marker=str(marker), max_retries=1, trials=1)
    out = _run(plan)
    failed = marker.read_text()  # exactly one unit raised once, and Ray ran it again
    assert failed in {u.unit_id for u in plan.units}
    assert failed in done_units(plan.out_dir) and len(done_units(plan.out_dir)) == len(plan.units)
    table = read_rows_parquet(out.results_path)
    keys = [(r.attack, r.protocol, r.trial) for r in table]
    assert len(keys) == len(set(keys)) == 3 * 2  # one row per (attack, protocol, trial), none twice
    assert _by_key(table) == _sequential(env, plan)  # the retried unit counted once


@pytest.mark.slow  # starts Ray
def test_without_retries_the_failure_stops_the_run_and_a_rerun_resumes(env):
    marker = env["root"] / "fail-hard"
    plan = _plan(env, "crash", fail_once_marker=str(marker), max_retries=0, trials=1)
    with pytest.raises(InjectedFailure):
        _run(plan)
    stored = done_units(plan.out_dir)
    assert marker.read_text() not in stored and len(stored) < len(plan.units)
    client = env["client"]
    runs = client.search_runs(
        [client.get_experiment_by_name("eval-tests").experiment_id], f"tags.`rna.eval_dir` = '{plan.out_dir}'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED"

    out = _run(plan)  # the marker exists now: nothing fails
    assert out.units_skipped == len(stored) and out.units_run == len(plan.units) - len(stored)
    assert out.mlflow.run_id == runs[0].info.run_id and client.get_run(out.mlflow.run_id).info.status == "FINISHED"
    assert _by_key(out.rows) == _sequential(env, plan)


@pytest.mark.slow  # starts Ray
def test_second_run_with_the_same_arguments_schedules_no_new_units(env):
    plan = _plan(env, "twice", attacks=("fgsm",), attack_settings={}, trials=1)
    lines: list[str] = []
    first = _run(plan, echo=lines.append)
    assert first.units_run == len(plan.units) == 2 * 2 * 2
    assert any("8 unit(s) to run as 8 Ray tasks" in ln for ln in lines)  # transfer and eot share nothing
    assert any("/8 units" in ln and "elapsed" in ln and "eta" in ln for ln in lines)  # progress was shown
    stamps = {p.name: p.stat().st_mtime_ns for p in (plan.out_dir / "units").iterdir()}

    again = _plan(env, "twice", attacks=("fgsm",), attack_settings={}, trials=1)
    second = _run(again, echo=lines.append)
    assert second.units_run == 0 and second.units_skipped == len(plan.units)
    assert {p.name: p.stat().st_mtime_ns for p in (plan.out_dir / "units").iterdir()} == stamps  # nothing recomputed
    assert _by_key(second.rows) == _by_key(first.rows)
    table = pq.read_table(second.results_path)
    assert table.num_rows == 2 * 2  # (natural, fgsm) x protocols: merged, never duplicated
    assert second.mlflow.run_id == first.mlflow.run_id  # the same evaluation run, reopened


@pytest.mark.slow  # starts Ray
def test_cli_run_id_logs_a_nested_run_with_metrics_and_artifacts(env, capsys):
    sys.path.insert(0, str(REPO))
    from jobs.evaluate import main

    code = main(
        [
            "--run-id",
            env["run_id"],
            "--attacks",
            "fgsm,pgd20",
            "--attack-set",
            "pgd20.steps=3",
            "--protocols",
            "transfer,eot",
            "--trials",
            "2",
            "--batch-size",
            "16",
            "--shard-size",
            "32",
            "--eot-iter",
            "2",
            "--path-analysis",
            "16",
            "--path-attack",
            "fgsm",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert (
        "| small_cnn | rna(bn,gns:1) |" in printed
        and "Protocol `eot`" in printed
        and "Stability over trials" in printed
    )
    assert "25/25 units" in printed and "eta" in printed  # 24 units + the path analysis

    client = env["client"]
    children = client.search_runs([env["exp_id"]], f"tags.`mlflow.parentRunId` = '{env['run_id']}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.info.experiment_id == env["exp_id"]
    assert child.info.run_id in printed and child.data.tags["rna.source"].endswith(CHECKPOINT_ARTIFACT)
    results = Path(child.data.tags["rna.eval_dir"]) / "results.parquet"
    rows = read_rows_parquet(results)
    assert {r.run_id for r in rows} == {env["run_id"]}
    m = child.data.metrics
    # Names say what ran: a 3-step PGD is not pgd20, and EOT over 2 draws is not the default 10
    # (natural perturbs nothing, so no draws to name).
    names = {
        ("natural", "transfer"): "acc_natural_transfer",
        ("natural", "eot"): "acc_natural_eot",
        ("fgsm", "transfer"): "acc_fgsm_transfer",
        ("fgsm", "eot"): "acc_fgsm_eot_iter2_eot",
        ("pgd20", "transfer"): "acc_pgd20_steps3_transfer",
        ("pgd20", "eot"): "acc_pgd20_steps3_eot_iter2_eot",
    }
    for (attack, protocol), name in names.items():
        accs = [r.accuracy for r in rows if r.attack == attack and r.protocol == protocol]
        mean = sum(accs) / 2
        assert m[name] == pytest.approx(mean)
        assert m[f"{name}_std"] == pytest.approx((sum((a - mean) ** 2 for a in accs)) ** 0.5)
    assert not {"acc_pgd20_transfer", "acc_fgsm_eot"} & set(m)
    assert m["eval_images"] == 64 and child.data.params["eval.trials"] == "2"

    def listing(path=None):
        out = set()
        for a in client.list_artifacts(child.info.run_id, path):
            out |= listing(a.path) if a.is_dir else {a.path}
        return out

    arts = listing()
    assert {
        "results.parquet",
        "results.md",
        "stability.md",
        "path_analysis/accuracy_vs_distance.png",
        "path_analysis/transfer_matrix.png",
    } <= arts
    logged = read_rows_parquet(client.download_artifacts(child.info.run_id, "results.parquet", str(env["root"] / "dl")))
    assert _by_key(logged) == _by_key(rows)
    assert (
        "Natural"
        in Path(client.download_artifacts(child.info.run_id, "results.md", str(env["root"] / "dl"))).read_text()
    )
    parent = client.get_run(env["run_id"])
    assert not any(k.startswith("acc_") for k in parent.data.metrics)  # the evaluation went into the child


# ----------------------------------------------------------------------------- bad input


@pytest.mark.slow  # eleven job processes (~50 s on 2 cores); no Ray, no training
def test_bad_inputs_exit_2_with_one_line_before_ray_starts(store, tmp_path):
    """The real process: one stderr line, exit 2, no traceback, no Ray, nothing written."""
    other = tmp_path / "store"
    other.mkdir()
    uri = f"sqlite:///{other}/mlflow.db"
    tracking.client_for(uri).search_experiments()  # an existing store without that run
    before = sorted(p.name for p in other.iterdir())
    # A checkpoint whose identity lacks norm_versions (written when `in` was an affine GroupNorm)
    # is refused by name, not loaded.
    old = read_checkpoint(store["ckpt"])
    old["config"] = {**old["config"], "model.norm": "bn,in"}
    old["identity"] = {**old["identity"], "norm": "bn,in"}
    assert "norm_versions" not in old["identity"]
    torch.save(old, tmp_path / "old_in.pt")
    cases = [
        (
            ["--checkpoint", str(tmp_path / "old_in.pt")],
            "norm_versions: checkpoint None vs config 'in=2'); it was written before",
            None,
        ),
        (["--checkpoint", store["ckpt"], "--attacks", "fgsm,nope"], "unknown attack 'nope'", None),
        (["--checkpoint", store["ckpt"], "--protocols", "transfer,whitebox"], "unknown protocol 'whitebox'", None),
        (["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt' does not exist", None),
        (["--run-id", "0123456789abcdef"], "MLflow run '0123456789abcdef' not found", uri),
        (["--run-id", "0123456789abcdef"], "no MLflow store", f"sqlite:///{tmp_path}/absent.db"),
        (["--run-id", "0123456789abcdef"], "is not reachable", "http://127.0.0.1:9/"),  # used to hang in retries
        (["--checkpoint", store["ckpt"], "--selected", "val"], "--selected picks a checkpoint of a training run", None),
        (
            ["--run-id", store["run_id"], "--selected", "val"],
            "made no selection on val (train with data.val_size > 0)",
            store["uri"],
        ),
        (
            ["--model", "no_such_pkg.nets:build", "--weights", store["ckpt"]],
            "cannot import module 'no_such_pkg.nets'",
            None,
        ),
        (  # our checkpoint's weights (under its "model" key) into AutoAttack's example ResNet-18
            ["--model", "pyautoattack.examples.resnet:ResNet18", "--weights", store["ckpt"]],
            "do not fit pyautoattack.examples.resnet:ResNet18: the file lacks conv1.weight",
            None,
        ),
    ]
    procs = []
    for i, (args, needle, store_uri) in enumerate(cases):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        run_env = {
            **os.environ,
            "RNA_BASE_DIR": str(cwd),
            "MLFLOW_TRACKING_URI": store_uri or f"sqlite:///{cwd}/mlflow.db",
        }
        run_env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(
            [PY, str(REPO / "jobs" / "evaluate.py"), *args],
            cwd=cwd,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((proc, needle, cwd))
    for proc, needle, cwd in procs:
        out, err = proc.communicate(timeout=180)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, (proc.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and needle in lines[0], err
        assert "Traceback" not in err and "Ray" not in out + err, (out, err)
        assert list(cwd.iterdir()) == []  # no eval_results, no mlflow.db
    assert sorted(p.name for p in other.iterdir()) == before
    assert not (tmp_path / "absent.db").exists()
