"""The training job: DDP with random paths, Ray Train runs, MLflow tracking, resume, CLI errors.

Three layers, cheapest first: pure helpers; a real 2-process gloo DDP group (no Ray) that checks
the gradient averaging claim of `rna_core.distributed` step by step; and 2-worker Ray Train runs
on synthetic data against a real SQLite MLflow store (one local Ray for the whole module).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipelines import tracking
from pipelines.model_card import render_model_card
from rna_core.builders import model_from_config as build_model
from rna_core.checkpoint import read_checkpoint
from rna_core.config import AttackConfig, TrainConfig, load_config
from rna_core.data import fixed_subset
from rna_core.distributed import average_buffers, epoch_shard_indices, mix_seed, seeded_steps, state_digest, wrap_ddp
from rna_core.paths import Path as RnaPath
from rna_core.paths import PathSampler, random_layers, set_path
from rna_core.speed import resolve_speed

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------- helpers


def test_epoch_shards_partition_and_reshuffle():
    n, world = 103, 4
    shards = [epoch_shard_indices(n, r, world, seed=7, epoch=0) for r in range(world)]
    rows = torch.cat(shards)
    assert all(len(s) == n // world for s in shards)  # equal steps on every rank
    assert len(set(rows.tolist())) == len(rows)  # disjoint
    again = [epoch_shard_indices(n, r, world, seed=7, epoch=0) for r in range(world)]
    assert all(torch.equal(a, b) for a, b in zip(shards, again))  # reproducible
    nxt = epoch_shard_indices(n, 0, world, seed=7, epoch=1)
    assert not torch.equal(nxt, shards[0])  # reshuffled across ranks every epoch
    assert set(nxt.tolist()) != set(shards[0].tolist())


def test_seeded_steps_depend_only_on_seed_rank_step():
    gen = torch.Generator()
    draws = [torch.rand(3, generator=gen) for _ in seeded_steps(range(4), gen, 1, 0, first_step=10)]
    gen2 = torch.Generator().manual_seed(999)  # whatever state the generator had before
    later = [torch.rand(3, generator=gen2) for _ in seeded_steps(range(2), gen2, 1, 0, first_step=12)]
    assert torch.equal(draws[2], later[0]) and torch.equal(draws[3], later[1])
    other_rank = [torch.rand(3, generator=gen) for _ in seeded_steps(range(1), gen, 1, 1, first_step=10)]
    assert not torch.equal(other_rank[0], draws[0])
    assert mix_seed(1, 2, 3) != mix_seed(1, 3, 2) and mix_seed(1, 2, 3) == mix_seed(1, 2, 3)


def test_state_digest_is_bit_exact():
    cfg = load_config(None, ["model.name=small_cnn", "data.dataset=synthetic"])
    torch.manual_seed(0)
    a = build_model(cfg)
    b = copy.deepcopy(a)
    assert state_digest(a) == state_digest(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-7
    assert state_digest(a) != state_digest(b)
    b = copy.deepcopy(a)
    b.norms[0].candidates[0].num_batches_tracked += 1  # buffers count too
    assert state_digest(a) != state_digest(b)


def test_fixed_subset_is_stable_and_spans_classes_of_a_sorted_file():
    from rna_core.data import ImageTensorDataset

    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, like the offline Parquet copies
    ds = ImageTensorDataset(
        torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), labels, [str(i) for i in range(10)], "sorted"
    )
    a, b = fixed_subset(ds, 100), fixed_subset(ds, 100)
    assert len(a) == 100 and torch.equal(a.labels, b.labels)
    assert len(set(a.labels.tolist())) == 10  # not the first 100 rows (one class)
    assert fixed_subset(ds, 0) is ds and fixed_subset(ds, 5000) is ds


def _row_digests(ds) -> list[str]:
    import hashlib

    return [
        hashlib.sha256(ds.images[i].numpy().tobytes() + bytes([int(ds.labels[i])])).hexdigest() for i in range(len(ds))
    ]


def test_validation_split_never_overlaps_the_training_rows():
    from rna_core.data import load_split, training_splits, validation_rows

    base = ["model.name=small_cnn", "data.dataset=synthetic", "data.synthetic_size=300"]
    full, none = training_splits(load_config(None, base))
    assert none is None and len(full) == 300  # val_size 0: the training rows of earlier versions
    full_rows = _row_digests(full)
    assert len(set(full_rows)) == 300  # every synthetic example is distinct, so contents identify rows
    for extra in ([], ["data.train_limit=100"]):
        cfg = load_config(None, [*base, "data.val_size=60", *extra])
        train, val = training_splits(cfg)
        assert len(val) == 60 and len(train) == (100 if extra else 240)
        train_rows, val_rows = set(_row_digests(train)), set(_row_digests(val))
        assert not train_rows & val_rows  # never trained on a validation row
        assert train_rows | val_rows <= set(full_rows)
        assert len(set(val.labels.tolist())) == 10  # spread over the classes
        again_train, again_val = training_splits(cfg)  # the same rows in every run and job
        assert torch.equal(again_val.images, val.images) and torch.equal(again_train.images, train.images)
        assert torch.equal(load_split(cfg, "train").images, train.images)
    val_idx, train_idx = validation_rows(50, 7)
    assert len(val_idx) == 7 and sorted(val_idx.tolist() + train_idx.tolist()) == list(range(50))


def test_val_size_is_validated_on_the_driver():
    from rna_core.errors import ConfigError

    with pytest.raises(ConfigError, match="data.val_size must be >= 0"):
        load_config(None, ["data.val_size=-1"])
    with pytest.raises(ConfigError, match=r"data.val_size \(512\) must be smaller than the training set"):
        load_config(None, ["data.dataset=synthetic", "data.val_size=512"])
    with pytest.raises(ConfigError, match="train.select_on_test"):
        load_config(None, ["train.select_on_test=maybe"])


def test_best_epoch_keeps_the_first_strictly_better_epoch_as_the_official_loops():
    """RNA and Double-Win Quant keep an epoch when `pgd_acc > best_pgd_acc`: ties keep the earlier one."""
    from rna_core.selection import BestEpoch

    best = BestEpoch("val", "val_pgd20_acc")
    kept = [best.offer(e, s) for e, s in enumerate([0.2, 0.3, 0.3, float("nan"), 0.25, 0.31], start=1)]
    assert kept == [True, True, False, False, False, True] and (best.epoch, best.score) == (6, 0.31)
    assert BestEpoch.from_dict(best.to_dict()) == best


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_root_for(uri) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/x.db")  # relative: made absolute for workers
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert tracking.artifact_root_for("http://127.0.0.1:5000") is None


def test_model_card_names_method_space_recipe_and_results():
    cfg = load_config(str(REPO / "configs" / "paper_resnet18_cifar10.yaml"))
    card = render_model_card(
        cfg,
        {"acc_natural_transfer": 0.81, "acc_pgd20_transfer": 0.52, "acc_eot_pgd_eot": 0.31, "eval_images": 1000},
        run_name="r",
        run_id="abc",
        checkpoint="/x/checkpoint.pt",
        num_paths=2**20,
    )
    for text in (
        "RNA",
        "`bn,gns:1`",
        "1,048,576 paths",
        "PGD-10",
        "eps 8/255",
        "SGD lr 0.1, momentum 0.9, weight decay 0.0005",
        "Epochs 200",
        "| PGD-20 | transfer",
        "0.5200",
        "| EOT-PGD-20 | eot",
        "0.3100",
        "1000 test images",
        "`abc`",
        "`acc_pgd20_transfer`",
    ):
        assert text in card, text


def test_selection_measures_are_the_official_ones_per_method():
    """RNA's train.py selects on PGD with random norms for attack and inference (transfer);
    Double-Win Quant's on PGD at its lowest precision, attacked and scored at that precision. Both
    are named by the PGD steps that ran and computed by the evaluation job's own protocol code."""
    from pipelines.train_worker import HeldOut, selection_scores
    from rna_core.attacks import get_attack
    from rna_core.data import BatchIterator, make_synthetic
    from rna_core.evaluation import evaluate_attack
    from rna_core.rpt import precision_of
    from rna_core.selection import BestEpoch, selection_criterion

    rna_cfg = load_config(None, ["model.name=small_cnn", "data.dataset=synthetic"])
    rna = selection_criterion(rna_cfg, build_model(rna_cfg))
    assert (rna.metric, rna.protocol, rna.strategy) == ("pgd20_acc", "transfer", None)  # the per-epoch pgd20_acc itself
    short = load_config(None, ["model.name=small_cnn", "data.dataset=synthetic", "train.eval_pgd_steps=3"])
    assert selection_criterion(short, build_model(short)).metric == "pgd3_acc"  # named by the steps that ran

    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.method=rpt",
            "model.norm=bn",
            "model.precisions=4-6",
            "data.dataset=synthetic",
            "train.eval_pgd_steps=2",
            "data.eval_batch_size=16",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    crit = selection_criterion(cfg, model)
    assert crit.metric == "pgd2_4bit_acc" and crit.protocol == "fixed-path"
    assert precision_of(model, RnaPath.parse(crit.strategy.split(":", 1)[1])) == 4
    data = make_synthetic(32, seed=0, split="test")
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(precision_of(m)))
    held = HeldOut(cfg, 0, 1, torch.device("cpu"), data, None)
    scores = selection_scores(model, crit, {"test": BestEpoch("test", crit.metric)}, held, 7)
    hook.remove()
    assert set(seen) == {4}  # every attack forward and the scoring forward at 4 bits
    attack = get_attack("pgd20", steps=2)  # the training threat model: eps 8/255, step 2/255
    correct, n = evaluate_attack(
        model,
        BatchIterator(data, 16, shuffle=False, seed=0),
        attack,
        "fixed-path",
        seed=mix_seed(7, 1),
        strategy=crit.strategy,
    )
    assert n == 32 and scores == {"pgd2_4bit_acc": correct / n}


def test_model_card_says_which_checkpoint_each_number_comes_from():
    cfg = load_config(
        str(REPO / "configs" / "paper_resnet18_cifar10.yaml"), ["data.val_size=5000", "train.select_on_test=true"]
    )
    results = {
        "acc_natural_transfer": 0.81,
        "acc_pgd20_transfer": 0.42,
        "acc_eot_pgd_eot": 0.31,
        "val_selected_acc_natural_transfer": 0.79,
        "val_selected_acc_pgd20_transfer": 0.47,
        "val_selected_acc_eot_pgd_eot": 0.33,
        "test_selected_acc_natural_transfer": 0.78,
        "test_selected_acc_pgd20_transfer": 0.49,
        "test_selected_acc_eot_pgd_eot": 0.34,
    }
    selected = {
        "val": {"epoch": 101, "metric": "val_pgd20_acc", "score": 0.5, "checkpoint": "/r/selected_val/checkpoint.pt"},
        "test": {"epoch": 103, "metric": "pgd20_acc", "score": 0.51, "checkpoint": "/r/selected_test/checkpoint.pt"},
    }
    card = render_model_card(
        cfg, results, run_name="r", checkpoint="/r/epoch_0200/checkpoint.pt", epochs_done=200, selected=selected
    )
    assert (
        "| Attack | Protocol | Last epoch (the result) | Selected on val (epoch 101) | Selected on test "
        "(epoch 103): biased |" in card
    )
    assert (
        "| PGD-20 | transfer: attack one path, score a fresh one (the paper's setting) | 0.4200 | 0.4700 | 0.4900 |"
        in card
    )
    assert (
        "5000 training images held out" in card
        and "**biased upward**" in card
        and "`/r/selected_val/checkpoint.pt`" in card
    )


@pytest.mark.parametrize(
    "preset",
    ["smoke", "paper_resnet18_cifar10", "paper_wrn34_10_cifar10", "paper_resnet18_cifar100", "paper_wrn34_10_cifar100"],
)
def test_presets_load(preset):
    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"))
    if preset.startswith("paper"):
        t = cfg.train
        assert (t.epochs, t.mode, t.lr, t.momentum, t.weight_decay, t.schedule) == (
            200,
            "blackbox",
            0.1,
            0.9,
            5e-4,
            "multistep",
        )
        assert (t.attack.eps, t.attack.step_size, t.attack.steps, cfg.data.batch_size) == (8, 2, 10, 128)
        assert tuple(t.milestones) == (0.5, 0.75) and cfg.model.norm == "bn,gns:1"
        assert cfg.num_classes() == (100 if "cifar100" in preset else 10)


def test_resume_plan_reads_the_run_folder_and_refuses_another_model(tmp_path, monkeypatch):
    from pipelines.run_folder import resolve_paths, write_job_file
    from pipelines.train import load_resume_config, plan_run
    from rna_core.config import flatten
    from rna_core.errors import ConfigError

    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    stored = resolve_paths(load_config(None, ["model.name=small_cnn", "data.dataset=synthetic", "train.epochs=2"]))
    run_dir = tmp_path / "runs" / "r1"
    write_job_file(
        str(run_dir),
        {"config": flatten(stored), "mlflow": {"tracking_uri": "x", "experiment_id": "1", "run_id": "abc"}},
    )
    cfg = load_resume_config(str(run_dir), ["train.epochs=5"])  # the stored config, overridden
    assert cfg.model.name == "small_cnn" and cfg.train.epochs == 5
    plan = plan_run(cfg, resume="runs/r1")  # relative to RNA_BASE_DIR
    assert (
        plan.run_name == "r1"
        and plan.cfg.ray.storage_path == str(tmp_path / "runs")
        and plan.job["mlflow"]["run_id"] == "abc"
    )
    other = load_config(None, ["model.name=small_cnn", "data.dataset=synthetic", "model.norm=bn"])
    with pytest.raises(ConfigError, match="model.norm"):
        plan_run(other, resume=str(run_dir))
    # the same run name in the config resumes too (no --resume needed)
    named = load_config(
        None,
        ["model.name=small_cnn", "data.dataset=synthetic", f"ray.storage_path={tmp_path}/runs", "mlflow.run_name=r1"],
    )
    assert plan_run(named).job is not None
    (tmp_path / "runs" / "foreign").mkdir()
    with pytest.raises(ConfigError, match="not written by jobs/train.py"):
        plan_run(replace(named, mlflow=replace(named.mlflow, run_name="foreign")))
    (run_dir / "rna_job.json").write_text('{"config": ')  # truncated: one line, not a JSONDecodeError
    with pytest.raises(ConfigError, match="is not valid JSON"):
        plan_run(cfg, resume="runs/r1")


def test_a_sweep_trial_stopped_before_its_job_file_reuses_its_child_run(tmp_path, monkeypatch):
    """The trial's child run is adopted by the same parent's next attempt, never by another sweep's."""
    from pipelines.train import JOB_FILE_TAG, plan_run
    from pipelines.train import open_training_run as _open_mlflow_run

    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    exp = tracking.get_or_create_experiment(client, "sweeps", tracking.artifact_root_for(uri))
    parents = [tracking.RunRef(uri, exp, tracking.start_run(client, exp, f"sweep-{i}", {}, {})) for i in range(2)]
    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "data.dataset=synthetic",
            f"ray.storage_path={tmp_path}/trials",
            "mlflow.run_name=trial_0",
        ],
    )
    _, first = _open_mlflow_run(plan_run(cfg), lambda s: None, parents[0])
    tracking.end_run(client, first.run_id, "KILLED")  # stopped before rna_job.json was written
    lines: list[str] = []
    _, again = _open_mlflow_run(plan_run(cfg), lines.append, parents[0])
    assert again.run_id == first.run_id and client.get_run(again.run_id).info.status == "RUNNING"
    assert lines and lines[0].startswith(f"reusing MLflow run {first.run_id}")
    _, other = _open_mlflow_run(plan_run(cfg), lambda s: None, parents[1])  # another sweep: its own child
    assert other.run_id != first.run_id
    assert client.get_run(other.run_id).data.tags["mlflow.parentRunId"] == parents[1].run_id
    tracking.set_tags(client, first.run_id, {JOB_FILE_TAG: "written"})  # a run its job file names is never adopted
    _, third = _open_mlflow_run(plan_run(cfg), lambda s: None, parents[0])
    assert third.run_id not in (first.run_id, other.run_id)


# ----------------------------------------------------------------------------- DDP (2 gloo processes)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Checks, per step, that DDP's gradient is the all-rank average when ranks run different paths."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = load_config(None, ["model.name=small_cnn", "model.norm=bn,gns:1", "data.dataset=synthetic"])
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
        model = build_model(cfg)
        ddp = wrap_ddp(model, torch.device("cpu"))
        tcfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, attack=AttackConfig(steps=2))
        from rna_core.optim import build_optimizer
        from rna_core.training import craft_adversarial, train_step

        opt = build_optimizer(model, tcfg)
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(100 + rank)
        n_layers = len(random_layers(model))
        # step 0: rank 0 all-bn, rank 1 all-gns (every candidate used on exactly one rank);
        # step 1: both all-bn (the gns candidates are unused everywhere); step 2: per-rank uniform.
        plans = [[RnaPath((0,) * n_layers), RnaPath((1,) * n_layers)], [RnaPath((0,) * n_layers)] * 2, None]
        report = {"max_err": 0.0, "checked": 0, "none_where_unused": True, "zero_share": 0}
        sampler = PathSampler("uniform", seed=mix_seed(3, rank))
        for step, plan in enumerate(plans):
            x = torch.rand(8, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            sampler.apply(model)  # attack path, on the bare module (no DDP hooks)
            x_adv = craft_adversarial(model, x, y, tcfg.attack, gen)
            path = plan[rank] if plan else sampler.sample(model)
            set_path(model, path)
            ref = copy.deepcopy(model)  # local gradient, computed outside DDP entirely
            local = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), list(ref.parameters()), allow_unused=True)
            used = torch.tensor([g is not None for g in local], dtype=torch.float64)
            local = [torch.zeros_like(p) if g is None else g for g, p in zip(local, params)]
            dist.all_reduce(used)
            for g in local:
                dist.all_reduce(g)
                g.div_(world)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x_adv), y).backward()
            for name, p, expect, u in zip(names, params, local, used.tolist()):
                if u == 0:
                    report["none_where_unused"] &= p.grad is None
                    continue
                assert p.grad is not None, f"step {step}: {name} used on some rank but has no gradient"
                report["max_err"] = max(report["max_err"], float((p.grad - expect).abs().max()))
                report["checked"] += 1
                report["zero_share"] += int(u < world)  # used on some ranks only
            opt.step()
        # The production step: attack on ddp.module between DDP forwards (input-only autograd.grad).
        for _ in range(3):
            x = torch.rand(8, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            train_step(ddp, x, y, opt, tcfg, sampler, attack_model=model)
        before = state_digest({k: v for k, v in model.state_dict().items() if "running" in k})
        average_buffers(model)
        report["buffers_changed_by_average"] = before != state_digest(
            {k: v for k, v in model.state_dict().items() if "running" in k}
        )
        params_only = {n: p for n, p in model.named_parameters()}
        report["param_digest"] = state_digest(params_only)
        report["state_digest"] = state_digest(model)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()  # both ranks done before either tears gloo down (a one-sided teardown can abort the peer)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # trains (2 gloo processes)
def test_ddp_gradient_is_all_rank_average_with_random_paths(tmp_path):
    world = 2
    mp.start_processes(
        _ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rep in reports:
        assert rep["checked"] > 0 and rep["max_err"] < 1e-5, rep
        assert rep["zero_share"] > 0  # some parameters were used on one rank only, and still averaged
        assert rep["none_where_unused"]  # globally unused candidates keep grad None (SGD skips them)
        assert rep["buffers_changed_by_average"]  # ranks had different BN statistics before averaging
    assert reports[0]["param_digest"] == reports[1]["param_digest"]
    assert reports[0]["state_digest"] == reports[1]["state_digest"]  # parameters and buffers


def _record_steps(rank: int, world: int, rank_paths: str, ddp: bool, *extra: str) -> dict:
    """Three blackbox steps of the production epoch loop on identical data on every rank: the path
    and a digest of the input of every forward (attack iterates, then the update), and the weights."""
    from rna_core.builders import effective_train_config
    from rna_core.distributed import step_streams
    from rna_core.optim import build_optimizer
    from rna_core.paths import get_path
    from rna_core.training import train_epoch

    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.norm=bn,gns:1",
            "data.dataset=synthetic",
            "train.attack.steps=2",
            f"train.rank_paths={rank_paths}",
            "train.seed=5",
            *extra,
        ],
    )
    tcfg = effective_train_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    net = wrap_ddp(model, torch.device("cpu")) if ddp else model
    opt = build_optimizer(model, tcfg)
    forwards: list[tuple[str, str]] = []
    model.register_forward_pre_hook(lambda m, args: forwards.append((str(get_path(m)), state_digest({"x": args[0]}))))
    gen = torch.Generator().manual_seed(42)  # the same images on every rank: only the noise may differ
    batches = [(torch.rand(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(3)]
    sampler, noise = step_streams(tcfg, cfg.train.seed, rank)
    train_epoch(
        net,
        seeded_steps(batches, sampler.generator, cfg.train.seed, rank, 0, noise),
        opt,
        tcfg,
        sampler,
        attack_model=model,
        noise_generator=noise,
    )
    torch.manual_seed(0)  # the initial weights again (rank 0's, which DDP broadcast)
    init = dict(build_model(cfg).named_parameters())
    unused = {n: p for n, p in model.named_parameters() if ".candidates.1." in n}  # gns: off every path with fixed:0000
    return {
        "paths": [p for p, _ in forwards],
        "inputs": [d for _, d in forwards],
        "params": state_digest(dict(model.named_parameters())),
        "gns_moved": [
            not torch.equal(p.detach(), init[n].detach()) for n, p in unused.items() if n.endswith("weight")
        ],  # biases start at 0
        "gns_momentum": [("momentum_buffer" in opt.state.get(p, {})) for p in unused.values()],
    }


def _rank_paths_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = {mode: _record_steps(rank, world, mode, ddp=True) for mode in ("shared", "per_rank")}
        for policy in (
            "decay",
            "skip",
        ):  # candidates no rank uses (fixed all-bn path): decayed on every rank, or skipped
            report[policy] = _record_steps(
                rank, world, "shared", True, "train.sampling=fixed:0000", f"train.inactive_candidates={policy}"
            )
        (Path(out_dir) / f"paths{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # trains (3 steps in 2 processes, ~20 s)
def test_ddp_ranks_share_one_attack_path_and_one_update_path_per_step(tmp_path):
    """The official code runs DataParallel: one path per step for the whole global batch. Default
    (`train.rank_paths: shared`): every rank runs the paths that one process with the same seed
    draws, step by step; only the random start noise differs (each rank has its own images).
    `per_rank` is the alternative: each rank draws its own paths."""
    world = 2
    mp.start_processes(
        _rank_paths_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"paths{r}.json").read_text()) for r in range(world)]
    single = _record_steps(0, 1, "shared", ddp=False)  # one process, as DataParallel would run it
    forwards_per_step = 2 + 1  # two PGD iterates, then the update
    shared = [r["shared"] for r in ranks]
    assert len(single["paths"]) == 3 * forwards_per_step
    assert shared[0]["paths"] == shared[1]["paths"] == single["paths"]
    attack_paths = single["paths"][0::forwards_per_step]
    update_paths = single["paths"][2::forwards_per_step]
    assert len(set(attack_paths + update_paths)) > 1 and attack_paths != update_paths  # blackbox: drawn anew
    first_iterates = [r["inputs"][0::forwards_per_step] for r in shared]
    assert all(a != b for a, b in zip(*first_iterates))  # random start noise: per rank
    assert shared[0]["params"] == shared[1]["params"]
    per_rank = [r["per_rank"] for r in ranks]
    assert per_rank[0]["paths"] != per_rank[1]["paths"]  # the option: each rank its own paths
    assert per_rank[0]["params"] == per_rank[1]["params"]
    # DDP leaves grad None on parameters no rank used; the step then gives them a zero gradient
    # (inactive_candidates: decay, the official loops), the same on every rank.
    for r in ranks:
        assert (
            len(r["decay"]["gns_moved"]) == 4 and all(r["decay"]["gns_moved"]) and len(r["decay"]["gns_momentum"]) == 8
        )
        assert all(r["decay"]["gns_momentum"])
        assert not any(r["skip"]["gns_moved"]) and not any(r["skip"]["gns_momentum"])
    assert (
        ranks[0]["decay"]["params"] == ranks[1]["decay"]["params"]
        and ranks[0]["skip"]["params"] == ranks[1]["skip"]["params"]
    )


# ----------------------------------------------------------------------------- CLI: bad input


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "RNA_BASE_DIR": str(cwd), "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [PY, str(REPO / "jobs" / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # runs the job as a process (twice); the in-process checks below stay fast
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The real process: exit status, one stderr line, no traceback, nothing started or written."""
    smoke = str(REPO / "configs/smoke.yaml")
    procs = [
        (_run_cli(["--config", "configs/nope.yaml"], tmp_path), "configs/nope.yaml"),
        (_run_cli(["--config", smoke, "--set", f"data.data_dir={tmp_path}/nodata"], tmp_path), "nodata"),
    ]
    for proc, needle in procs:
        out, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, (proc.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("train.py: error:") and needle in lines[0], err
        assert "Traceback" not in err and "Ray" not in out + err, (out, err)
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, mlruns or ray_results left behind


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "train.nope=1"], "train.nope"),
        (["--set", "model.norm=bn,zz"], "zz"),
        (["--set", "model.norm=bn,,in"], "norm space 'bn,,in' has an empty spec between commas"),
        ("not a config file", "config file '/etc/passwd' does not hold a config"),
        (["--set", "train.compile=true"], "unknown config key 'train.compile'"),
        (["--set", "model.norm=gn:3"], "3 groups do not divide"),  # small_cnn has 16 channels
        (["--set", "model.norm=bn,ln,gn:1"], "'ln' and 'gn:1' are both GroupNorm with 1 group"),
        (["--set", "data.dataset=synthetic", "--set", "data.batch_size=1"], "batch_size"),
        (["--set", "train.mode=fast"], "train.mode"),
        (["--set", "train.sampling=fixed:01-1"], "cannot read path '01-1'"),
        (["--set", "model.norm=bn,gns:1", "--set", "train.sampling=fixed:01"], "has 2 choices but the model has 4"),
        (None, "--config"),
        ("resume", "not_a_run"),
        ("corrupt data", "is not a readable Parquet file"),
        ("storage under a file", "ray.storage_path"),
        ("mlflow store under a file", "the MLflow store's folder"),
        ("mlflow server down", "is not reachable"),  # used to hang in MLflow's retries
        (
            ["--set", "train.inactive_candidates=freeze"],
            "train.inactive_candidates 'freeze' is unknown; valid: decay, skip",
        ),
        (["--set", "train.rank_paths=each"], "train.rank_paths 'each' is unknown; valid: shared, per_rank"),
        (["--set", "data.val_size=-5"], "data.val_size must be >= 0"),
        (["--set", "train.select_on_test=perhaps"], "train.select_on_test' expects true or false"),
        ("val_size above the training rows", "data.val_size (8) leaves 0 of the 8 training images"),
    ],
    ids=[
        "bad key",
        "unknown norm",
        "empty spec",
        "not a mapping",
        "no compile flag",
        "groups do not divide",
        "identical candidates",
        "batch below workers",
        "bad mode",
        "unreadable fixed path",
        "fixed path of the wrong length",
        "no config",
        "not a run",
        "corrupt parquet",
        "storage under a file",
        "mlflow store under a file",
        "mlflow server down",
        "inactive candidates",
        "rank paths",
        "negative val_size",
        "select_on_test not a bool",
        "val_size above the training rows",
    ],
)
def test_bad_inputs_fail_before_anything_starts(args, needle, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    from jobs.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    if args == "not a config file":
        argv = ["--config", "/etc/passwd"]  # YAML reads it as one string, not a mapping of sections
    elif args == "resume":
        (tmp_path / "not_a_run").mkdir()
        argv = ["--resume", str(tmp_path / "not_a_run")]
    elif args == "mlflow server down":
        argv = ["--config", str(REPO / "configs/smoke.yaml"), "--set", "data.dataset=synthetic"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")  # discard port: nothing listens
    elif args in ("storage under a file", "mlflow store under a file"):
        (tmp_path / "not_a_run").write_text("a file, not a folder")
        argv = ["--config", str(REPO / "configs/smoke.yaml"), "--set", "data.dataset=synthetic"]
        if args == "storage under a file":
            argv += ["--set", f"ray.storage_path={tmp_path}/not_a_run/results"]
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/not_a_run/mlflow.db")
    elif args == "val_size above the training rows":
        from rna_core.data import make_synthetic, write_parquet_dataset

        data = tmp_path / "not_a_run"
        for split in ("train", "test"):
            ds = make_synthetic(8, seed=0, split=split)
            write_parquet_dataset(data / f"{split}.parquet", ds.images, ds.labels, ds.classes, "cifar10")
        argv = [
            "--config",
            str(REPO / "configs/smoke.yaml"),
            "--set",
            f"data.data_dir={data}",
            "--set",
            "data.dataset=cifar10",
            "--set",
            "data.val_size=8",
        ]
    elif args == "corrupt data":
        data = tmp_path / "not_a_run"  # the one folder the final check allows
        data.mkdir()
        for split in ("train", "test"):
            (data / f"{split}.parquet").write_bytes(b"not parquet at all")
        argv = [
            "--config",
            str(REPO / "configs/smoke.yaml"),
            "--set",
            f"data.data_dir={data}",
            "--set",
            "data.dataset=cifar10",
        ]
    else:
        argv = [] if args is None else ["--config", str(REPO / "configs/smoke.yaml"), *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["not_a_run"])


def test_a_user_error_raised_inside_ray_still_gives_one_line_and_exit_2(capsys):
    """Ray wraps a task's exception (with the remote traceback in its text) and Ray Train collects
    workers' exceptions in WorkerGroupError; the CLI digs the ConfigError out of either."""
    import ray.exceptions
    from ray.train import WorkerGroupError

    sys.path.insert(0, str(REPO))
    from jobs.cli import find_user_error, run_main
    from rna_core.errors import ConfigError

    original = ConfigError("train.sampling 'fixed:01' does not fit")
    remote = ray.exceptions.RayTaskError(
        "train_fn", "Traceback (most recent call last):\n  ...", original
    ).as_instanceof_cause()
    workers = WorkerGroupError("rank 0 failed", {0: remote})
    assert find_user_error(remote) is original and find_user_error(workers) is original
    assert find_user_error(RuntimeError("a bug")) is None

    def job(argv):
        raise workers

    assert run_main("train.py", job, []) == 2
    err = capsys.readouterr().err
    assert err.strip() == "train.py: error: train.sampling 'fixed:01' does not fit"

    def buggy(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_main("train.py", buggy, [])


# ----------------------------------------------------------------------------- Ray Train runs

TINY = [
    "model.name=small_cnn",
    "model.norm=bn,gns:1",
    "data.dataset=synthetic",
    "data.synthetic_size=256",
    "data.batch_size=64",
    "data.eval_batch_size=64",
    "data.eval_limit=48",
    "train.epochs=2",
    "train.schedule=constant",
    "train.attack.steps=1",
    "train.eval_pgd_steps=2",
    "train.eot_iter=2",
    "train.lr=0.05",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
    "ray.use_gpu=false",
    "ray.address=local",
    "mlflow.system_metrics_interval=1",  # a sample a second: these runs last seconds
]


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """One local Ray and one SQLite MLflow store for all runs of this module."""
    from pipelines.cluster import ensure_ray

    root = tmp_path_factory.mktemp("pipeline")
    mp_ = pytest.MonkeyPatch()
    mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp_.setenv("RNA_BASE_DIR", str(root))
    mp_.delenv("RAY_ADDRESS", raising=False)
    # A driver that ran mlflow.set_experiment exports this; workers must log to the job's run anyway.
    mp_.setenv("MLFLOW_EXPERIMENT_ID", "0")
    import ray

    ensure_ray(load_config(None, TINY))
    yield root
    ray.shutdown()
    mp_.undo()


def _cfg(root: Path, *extra: str):
    return load_config(None, [*TINY, f"ray.storage_path={root}/ray_results", *extra])


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(client, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.mark.slow  # starts Ray Train and trains
def test_train_then_resume_into_same_run(ray_env, monkeypatch):
    import pipelines.train as trainer
    from pipelines.run_folder import read_job_file
    from pipelines.train import JOB_FILE_TAG, run_training

    root = ray_env
    lines: list[str] = []
    cfg = _cfg(root, "mlflow.experiment=exp-a", "mlflow.run_name=a")

    # A first attempt stopped by Ctrl+C after its MLflow run exists but before rna_job.json names it.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer, "write_job_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, echo=lines.append)
    client = tracking.client_for(f"sqlite:///{root}/mlflow.db")
    (orphan,) = _runs(client, "exp-a")
    assert orphan.info.status == "KILLED" and orphan.data.tags[JOB_FILE_TAG] == "pending"
    assert read_job_file(str(root / "ray_results" / "a")) is None

    # The next attempt adopts that run instead of leaving it beside a second one.
    out = run_training(cfg, echo=lines.append)
    assert out.mlflow.run_id == orphan.info.run_id
    assert any(line.startswith(f"reusing MLflow run {orphan.info.run_id}") for line in lines)
    assert client.get_run(out.mlflow.run_id).data.tags[JOB_FILE_TAG] == "written"

    # replicas identical after training (parameters and BN buffers, bit for bit)
    assert len(out.state_digests) == 2 and len(set(out.state_digests)) == 1
    client = tracking.client_for(out.mlflow.tracking_uri)
    runs = _runs(client, "exp-a")
    assert len(runs) == 1 and runs[0].info.run_id == out.mlflow.run_id and runs[0].info.status == "FINISHED"
    assert client.search_runs(["0"]) == []  # MLFLOW_EXPERIMENT_ID=0 in the environment redirected nothing
    params = runs[0].data.params
    assert params["train.lr"] == "0.05" and params["model.norm"] == "bn,gns:1" and params["ray.num_workers"] == "2"
    assert len(params["git_commit"]) in (7, 40) or params["git_commit"] == "unknown"
    # the speed flags as configured (auto) and as the worker's device decided them
    decided = resolve_speed(cfg.train, "cpu")
    assert (params["train.amp_bf16"], params["train.channels_last"]) == ("auto", "auto")
    assert params["resolved.train.amp_bf16"] == str(decided.amp_bf16).lower()
    assert params["resolved.train.channels_last"] == str(decided.channels_last).lower()
    assert params["resolved.bf16_fast_path"] == decided.reason
    # The device and backend the launcher chose, and what the worker ran on (no GPU here: gloo on CPU).
    assert (params["resolved.ray.use_gpu"], params["resolved.ray.backend"], params["resolved.device"]) == (
        "false",
        "gloo",
        "cpu",
    )
    assert params["resolved.ray.device_reason"] == "set explicitly"  # TINY sets ray.use_gpu=false
    # per epoch: the PGD accuracy is named by the steps it ran (train.eval_pgd_steps=2)
    for metric in ("train_loss", "train_acc", "clean_acc", "pgd2_acc", "lr", "epoch_seconds", "images_per_second"):
        assert _steps(client, out.mlflow.run_id, metric) == [1, 2], metric
    m = runs[0].data.metrics
    assert not any(k.startswith(("pgd20", "final_")) for k in m), sorted(m)  # no name says what did not run
    finals = (
        "acc_natural_transfer",
        "acc_pgd20_steps2_transfer",
        "acc_eot_pgd_steps2_eot",
    )  # the evaluation job's names
    for metric in finals:
        assert 0.0 <= m[metric] <= 1.0, metric
    assert m["eval_images"] == 48 and m["replicas_in_sync"] == 1.0 and m["images_per_second"] > 0
    assert _steps(client, out.mlflow.run_id, "epoch_eval_seconds") == [1, 2]  # per epoch; eval_seconds: the final one
    assert _steps(client, out.mlflow.run_id, "eval_seconds") == [2]
    assert {"config.yaml", "model_card.md", "checkpoint/checkpoint.pt", "checkpoint/meta.json"} <= _artifacts(
        client, out.mlflow.run_id
    )
    card = Path(client.download_artifacts(out.mlflow.run_id, "model_card.md")).read_text()
    assert "small_cnn" in card and "16 paths" in card and f"{m['acc_eot_pgd_steps2_eot']:.4f}" in card

    # One evaluator: the final metrics are what rna_core.evaluation (the evaluation job's code)
    # computes for the saved weights, on the same 48 held-out rows with the same seed and batches.
    from rna_core.attacks import get_attack
    from rna_core.data import load_split
    from rna_core.evaluation import evaluate_model

    scored = build_model(cfg)
    scored.load_state_dict(read_checkpoint(out.checkpoint)["model"])
    held_out = load_split(cfg, "test")
    common = dict(trials=1, seed=0, batch_size=64, strategy="uniform", include_natural=False, progress=False)
    rows = evaluate_model(
        scored, held_out, attacks=["natural", get_attack("pgd20", steps=2)], protocols=["transfer"], **common
    )
    rows += evaluate_model(scored, held_out, attacks=[get_attack("eot_pgd", steps=2)], protocols=["eot"], **common)
    assert [r.accuracy for r in rows] == [m[name] for name in finals] and {r.n for r in rows} == {48}

    # the final checkpoint is the trained model (same digest as the replicas) and names the MLflow run
    payload = read_checkpoint(out.checkpoint)
    assert payload["epoch"] == 2 and payload["extra"]["mlflow_run_id"] == out.mlflow.run_id
    model = build_model(cfg)
    model.load_state_dict(payload["model"])
    assert state_digest(model) == out.state_digests[0]
    assert read_job_file(out.run_dir)["mlflow"]["run_id"] == out.mlflow.run_id
    epoch2_optimizer = state_digest(payload["optimizer"])

    # MLflow as users meet it: a model-training experiment, the data, the system, a loadable model.
    import mlflow.pytorch

    assert client.get_experiment(out.mlflow.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {d.dataset.name: d for d in client.get_run(out.mlflow.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-test"}
    assert json.loads(inputs["synthetic-test"].dataset.profile)["rows"] == 48
    assert json.loads(inputs["synthetic-train"].dataset.profile)["rows"] == 256
    assert {t.key: t.value for t in inputs["synthetic-train"].tags}["mlflow.data.context"] == "training"
    assert m["system/system_memory_usage_megabytes"] > 0 and "system/cpu_utilization_percentage" in m
    assert set(out.models) == {"last"} and out.models["last"]["registered"] is None  # not registered unless asked
    loaded = mlflow.pytorch.load_model(out.models["last"]["run_uri"])
    assert state_digest(loaded.model.state_dict()) == out.state_digests[0] and loaded.num_paths == 16
    assert f"--model-uri {out.models['last']['run_uri']}" in card

    # the same run name again, with one more epoch: resumes after epoch 2 into the same MLflow run
    out2 = run_training(replace(cfg, train=replace(cfg.train, epochs=3)), echo=lines.append)
    assert out2.mlflow.run_id == out.mlflow.run_id and out2.run_dir == out.run_dir
    assert out2.start_epoch == 2 and out2.resumed["epoch"] == 2
    assert out2.resumed["optimizer_digest"] == epoch2_optimizer  # momentum buffers restored exactly
    assert out2.resumed["scheduler_last_epoch"] == 2
    runs = _runs(client, "exp-a")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(client, out.mlflow.run_id, "train_loss") == [1, 2, 3]  # epoch 3 trained once, 1-2 not again
    assert runs[0].data.tags["resume.changed.train.epochs"] == "2 -> 3"
    assert read_checkpoint(out2.checkpoint)["epoch"] == 3
    assert len(set(out2.state_digests)) == 1
    assert any(line.startswith("resuming") for line in lines)
    # runs:/<id>/model is the newest model the run logged: epoch 3's weights after the resume
    assert (
        state_digest(mlflow.pytorch.load_model(out2.models["last"]["run_uri"]).model.state_dict())
        == (out2.state_digests[0])
    )
    test_train_then_resume_into_same_run.final_digest = out2.state_digests[0]  # for the next test

    # the same command once more: the run is done, so nothing starts and MLflow is untouched
    lines.clear()
    before = client.get_run(out.mlflow.run_id)
    history = len(client.get_metric_history(out.mlflow.run_id, "acc_natural_transfer"))
    out3 = run_training(replace(cfg, train=replace(cfg.train, epochs=3)), echo=lines.append)
    assert (out3.epochs_done, out3.checkpoint, out3.mlflow.run_id) == (3, out2.checkpoint, out.mlflow.run_id)
    assert out3.final_metrics == out2.final_metrics and out3.resumed is None
    assert len(lines) == 1 and "already trained 3" in lines[0]
    after = client.get_run(out.mlflow.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert len(client.get_metric_history(out.mlflow.run_id, "acc_natural_transfer")) == history  # not logged again


@pytest.mark.slow  # starts Ray Train and trains
def test_worker_failure_is_retried_from_checkpoint(ray_env):
    """3 epochs with a worker crash after epoch 2 (max_failures=1) end bit-identical to 2 + resumed 1."""
    from pipelines.train import run_training

    expected = getattr(test_train_then_resume_into_same_run, "final_digest", None)
    cfg = _cfg(ray_env, "mlflow.experiment=exp-b", "mlflow.run_name=b", "train.epochs=3", "ray.max_failures=1")
    out = run_training(cfg, echo=lambda s: None, fail_after_epoch=2)
    assert out.start_epoch == 2 and out.resumed["epoch"] == 2  # the retry started from the epoch-2 checkpoint
    client = tracking.client_for(out.mlflow.tracking_uri)
    runs = _runs(client, "exp-b")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(client, out.mlflow.run_id, "train_loss") == [1, 2, 3]
    assert len(set(out.state_digests)) == 1
    if expected is not None:  # reproducible from (seed, rank, step): same weights either way
        assert out.state_digests[0] == expected


@pytest.mark.slow  # starts Ray Train and trains
def test_failed_run_is_marked_failed(ray_env, tmp_path):
    """A failure inside the workers (no retries left) ends the MLflow run as FAILED. (A corrupt
    dataset file no longer gets that far: the driver reads its schema before Ray starts.)"""
    from pipelines.train import run_training

    cfg = _cfg(ray_env, "mlflow.experiment=exp-c", "ray.max_failures=0")
    with pytest.raises(Exception) as info:
        run_training(cfg, echo=lambda s: None, fail_after_epoch=1)
    assert "injected failure after epoch 1" in str(info.value)
    client = tracking.client_for(f"sqlite:///{ray_env}/mlflow.db")
    runs = _runs(client, "exp-c")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.slow  # starts Ray Train and trains 3 epochs
def test_model_selection_on_a_validation_split_and_on_request_on_the_test_set(ray_env):
    """The result stays the last epoch; the epochs with the best val / test robust accuracy are kept
    too (strictly better, as the official loops), also across a worker failure and resume, logged and
    labelled, and the evaluation job can take the selected checkpoint with its rows labelled."""
    from pipelines.evaluation.plan import plan_evaluation
    from pipelines.evaluation.source import load_source
    from pipelines.train import run_training
    from rna_core.config import EvalConfig as EvalOptions
    from rna_core.errors import ConfigError

    cfg = _cfg(
        ray_env,
        "mlflow.experiment=exp-sel",
        "mlflow.run_name=sel",
        "train.epochs=3",
        "ray.max_failures=1",
        "data.val_size=64",
        "train.select_on_test=true",
        "mlflow.registered_model=sel-model",
        "mlflow.system_metrics=false",
    )
    out = run_training(cfg, echo=lambda s: None, fail_after_epoch=2)
    assert out.start_epoch == 2  # the retry resumed after epoch 2 with the selection state of its checkpoint
    client = tracking.client_for(out.mlflow.tracking_uri)
    run = client.get_run(out.mlflow.run_id)
    m = run.data.metrics
    for which, metric in (("val", "val_pgd2_acc"), ("test", "pgd2_acc")):
        history = sorted(client.get_metric_history(out.mlflow.run_id, metric), key=lambda h: h.step)
        assert [h.step for h in history] == [1, 2, 3], metric
        best = max(range(3), key=lambda i: (history[i].value, -i))  # the first epoch with the highest score
        assert out.selected[which]["epoch"] == best + 1 == m[f"{which}_selected_epoch"], (
            which,
            [h.value for h in history],
        )
        assert m[f"{which}_selected_score"] == history[best].value
        payload = read_checkpoint(Path(out.selected[which]["checkpoint"]))
        assert (
            payload["epoch"] == best + 1 and payload["extra"]["selected_on"] == which and payload["optimizer"] is None
        )
        assert {f"selected_{which}/checkpoint.pt", f"selected_{which}/meta.json"} <= _artifacts(
            client, out.mlflow.run_id
        )
        for key in ("acc_natural_transfer", "acc_pgd20_steps2_transfer", "acc_eot_pgd_steps2_eot"):
            assert 0.0 <= m[f"{which}_selected_{key}"] <= 1.0
            if best + 1 == 3:  # the last epoch's weights, evaluated with the same seeds: the same numbers
                assert m[f"{which}_selected_{key}"] == m[key]
    assert _steps(client, out.mlflow.run_id, "val_clean_acc") == [1, 2, 3]
    assert run.data.tags["rna.selection_on_test_set"] == "true" and "biased" in run.data.tags["rna.selected_on_test"]
    card = Path(client.download_artifacts(out.mlflow.run_id, "model_card.md")).read_text()
    assert f"Selected on val (epoch {out.selected['val']['epoch']})" in card and "Last epoch (the result)" in card

    assert not any(k.startswith("system/") for k in m)  # mlflow.system_metrics=false
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"synthetic-train", "synthetic-val", "synthetic-test"}
    # Both checkpoints are MLflow models: the last epoch registered (alias `newest`), the val-selected one beside it.
    assert out.models["last"]["alias_uri"] == "models:/sel-model@newest"
    assert out.models["val"]["run_uri"] == f"runs:/{out.mlflow.run_id}/model_selected_val"
    import mlflow.pytorch

    val_net = mlflow.pytorch.load_model(out.models["val"]["run_uri"])
    selected_payload = read_checkpoint(Path(out.selected["val"]["checkpoint"]))
    assert state_digest(val_net.model.state_dict()) == state_digest(selected_payload["model"])
    from pipelines.model_uri import load_uri_source

    by_uri = load_uri_source(out.models["val"]["run_uri"])
    assert by_uri.selection == "val" and by_uri.parent_run_id == out.mlflow.run_id

    # the evaluation job: --selected val takes selected_val/ and labels its rows; the last epoch stays unlabelled
    opts = EvalOptions(attacks=("fgsm",), protocols=("transfer",), path_analysis=0, out_dir=str(ray_env / "eval-sel"))
    plan = plan_evaluation(load_source(run_id=out.mlflow.run_id, selected="val"), opts)
    assert plan.row_meta["method"] == f"rna(bn,gns:1) [selected on val, epoch {out.selected['val']['epoch']}]"
    from pipelines.evaluation.job import run_evaluation
    from rna_core.evaluation import read_rows_parquet

    done = run_evaluation(plan, echo=lambda s: None)
    assert {r.method for r in read_rows_parquet(done.results_path)} == {plan.row_meta["method"]}
    eval_run = client.get_run(done.mlflow.run_id)
    assert eval_run.data.tags["rna.checkpoint"] == f"selected on val (epoch {out.selected['val']['epoch']})"
    assert (
        eval_run.info.run_name.endswith("-selected-on-val")
        and eval_run.data.params["eval.checkpoint"] == "selected on val"
    )
    plan_test = plan_evaluation(
        load_source(run_id=out.mlflow.run_id, selected="test"), replace(opts, out_dir=str(ray_env / "eval-t"))
    )
    assert "[selected on test" in plan_test.row_meta["method"]
    last = plan_evaluation(load_source(run_id=out.mlflow.run_id), replace(opts, out_dir=str(ray_env / "eval-last")))
    assert last.row_meta["method"] == "rna(bn,gns:1)"
    with pytest.raises(ConfigError, match="--selected picks a checkpoint of a training run"):
        load_source(checkpoint=out.checkpoint, selected="val")

    # jobs/evaluate.py --model-uri models:/<name>@<alias>: the registered last epoch, evaluated like
    # --run-id (nested under its training run), its test rows logged as the evaluation's dataset input
    sys.path.insert(0, str(REPO))
    from jobs.evaluate import main as evaluate_main

    argv = ["--model-uri", "models:/sel-model@newest", "--attacks", "fgsm", "--protocols", "transfer"]
    assert evaluate_main([*argv, "--path-analysis", "0", "--limit", "16", "--out", str(ray_env / "eval-uri")]) == 0
    (child,) = client.search_runs(
        [out.mlflow.experiment_id],
        f"tags.`mlflow.parentRunId` = '{out.mlflow.run_id}' and tags.`rna.source` = 'models:/sel-model@newest'",
    )
    assert 0.0 <= child.data.metrics["acc_fgsm_transfer"] <= 1.0 and child.data.params["eval.images"] == "16"
    assert child.data.params["eval.weights_digest"] == state_digest(read_checkpoint(out.checkpoint)["model"])
    (data,) = child.inputs.dataset_inputs
    assert data.dataset.name == "synthetic-test" and json.loads(data.dataset.profile)["rows"] == 16
