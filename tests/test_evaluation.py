"""Evaluation protocols, result rows, Parquet, paper tables, stability and path analysis."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import low_contrast, train_small_cnn

import rna_core
import rna_core.paths as paths_module
from rna_core.attacks import get_attack
from rna_core.data import BatchIterator, make_synthetic
from rna_core.errors import ConfigError, DatasetNotFoundError
from rna_core.evaluation import (
    PAPER_COLUMNS,
    Counts,
    ResultRow,
    accuracy_vs_distance,
    batch_seed,
    evaluate_batch,
    evaluate_model,
    method_label,
    paper_table,
    path_at_distance,
    read_rows_parquet,
    render_markdown,
    run_protocol,
    save_distance_analysis,
    save_transfer_matrix,
    stability,
    stability_table,
    transfer_matrix,
    trial_seed,
    unit_seed,
    write_rows_parquet,
)
from rna_core.speed import evaluation_forward


@pytest.fixture(scope="module")
def random_model() -> torch.nn.Module:
    """small_cnn over the paper's space bn,gns:1: 4 random layers, 16 paths, trained a little."""
    return train_small_cnn("bn,gns:1")


@pytest.fixture(scope="module")
def test_data():
    return low_contrast(make_synthetic(64, seed=0, split="test"))


def xy(data, n: int):
    return data.images[:n].float() / 255, data.labels[:n]


class ForwardSpy:
    """Records, for every forward of a model, the path it ran, its input and its predictions."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.paths, self.inputs, self.preds = [], [], []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.paths.append(rna_core.get_path(module))
        self.inputs.append(args[0].detach().clone())
        self.preds.append(output.detach().argmax(1))

    def close(self):
        self.handle.remove()


@pytest.fixture
def count_draws(monkeypatch):
    """Counts every path drawn anywhere (PathSampler.sample goes through paths.sample_path)."""
    calls = []
    real = paths_module.sample_path

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(paths_module, "sample_path", counting)
    return calls


# ------------------------------------------------------------------------------------ protocols


@pytest.mark.parametrize("name", ["pgd20", "cw_inf", "mifgsm"])
def test_transfer_holds_one_path_for_the_whole_attack(random_model, test_data, count_draws, name):
    x, y = xy(test_data, 16)
    spy = ForwardSpy(random_model)
    out = run_protocol(random_model, x, y, get_attack(name, steps=5), "transfer", seed=7)
    spy.close()
    assert len(count_draws) == 2 and out.path_draws == 2  # one attack path, one scoring path
    attack_forwards, scoring = spy.paths[:-1], spy.paths[-1]
    assert len(attack_forwards) == 5  # one forward per step, all on the attack path
    assert set(attack_forwards) == {out.attack_path}
    assert scoring == out.score_path and rna_core.get_path(random_model) == out.score_path


def test_the_scoring_path_never_depends_on_the_attack_path_even_under_far(random_model, test_data):
    """The defender does not know the attacked path: `far:1.0` (the complement of a given path)
    must score like `uniform`, or a model trained with `far` would be scored on a path steered
    away from the attacked one and its `transfer` accuracy would be inflated."""
    x, y = xy(test_data, 8)
    overlaps = []
    for seed in range(6):
        far = run_protocol(random_model, x, y, get_attack("pgd20", steps=2), "transfer", seed=seed, strategy="far:1.0")
        uniform = run_protocol(
            random_model, x, y, get_attack("pgd20", steps=2), "transfer", seed=seed, strategy="uniform"
        )
        assert (far.attack_path, far.score_path, far.correct) == (
            uniform.attack_path,
            uniform.score_path,
            uniform.correct,
        )
        overlaps.append(len(far.score_path) - far.attack_path.differences(far.score_path))
    assert max(overlaps) > 0  # some scoring path shares a layer with its attack path: no complement
    # rna_core.training.evaluate_pgd (the in-process PGD evaluation of the training module) follows the same rule.
    batches = [xy(test_data, 8)]
    assert rna_core.training.evaluate_pgd(
        random_model, batches, rna_core.PathSampler("far:1.0", seed=3), steps=2
    ) == rna_core.training.evaluate_pgd(random_model, batches, rna_core.PathSampler("uniform", seed=3), steps=2)


def test_fixed_path_scores_on_the_attacked_path(random_model, test_data, count_draws):
    x, y = xy(test_data, 16)
    spy = ForwardSpy(random_model)
    out = run_protocol(random_model, x, y, get_attack("pgd20", steps=3), "fixed-path", seed=7)
    spy.close()
    assert len(count_draws) == 1 and set(spy.paths) == {out.attack_path} and out.score_path == out.attack_path


def test_eot_draws_a_fresh_path_on_every_forward(random_model, test_data, count_draws):
    x, y = xy(test_data, 16)
    state = {k: v.clone() for k, v in random_model.state_dict().items()}
    spy = ForwardSpy(random_model)
    out = run_protocol(random_model, x, y, get_attack("pgd20", steps=3), "eot", seed=7, eot_iter=4)
    spy.close()
    assert not random_model.training and all(torch.equal(v, state[k]) for k, v in random_model.state_dict().items())
    attack_forwards = len(spy.paths) - 1
    assert attack_forwards == 3 * 4  # each step averages eot_iter forwards
    assert out.path_draws == 1 + attack_forwards + 1  # every forward drew
    # LogitAverage's backward replays each draw once from its saved generator state (bounded memory, issue 18)
    assert len(count_draws) == out.path_draws + attack_forwards
    assert len(set(spy.paths[:-1])) >= 4  # and the draws really vary (16 paths)
    # an attack that repeats forwards itself (eot_pgd) is not wrapped again: steps x its own eot_iter
    count_draws.clear()
    spy = ForwardSpy(random_model)
    run_protocol(random_model, x, y, get_attack("eot_pgd", steps=2, eot_iter=3), "eot", seed=7, eot_iter=4)
    spy.close()
    assert len(spy.paths) - 1 == 2 * 3 and len(count_draws) == 2 * 3 + 2


def first_fooled_points(spy: ForwardSpy, x: torch.Tensor, y: torch.Tensor, eps: float):
    """Per example, the first queried input within eps of it that was misclassified (None if none)."""
    found = [None] * len(x)
    for inp, pred in zip(spy.inputs, spy.preds):
        for row in range(len(inp)):
            near = ((x - inp[row]).flatten(1).abs().amax(1) <= eps + 1e-6).nonzero().flatten().tolist()
            if len(near) != 1:
                continue
            i = near[0]
            if found[i] is None and pred[row] != y[i]:
                found[i] = inp[row]
    return found


def test_early_stop_never_perturbs_an_example_after_it_is_misclassified(random_model, test_data):
    x, y = xy(test_data, 32)
    pgd = get_attack("pgd20", steps=10)
    spy = ForwardSpy(random_model)
    stopped = run_protocol(random_model, x, y, pgd, "early-stop", seed=3)
    spy.close()
    # every forward but the scoring one ran on the attack path: clean check, then the iterates
    assert set(spy.paths[:-1]) == {stopped.attack_path}
    spy.inputs, spy.preds = spy.inputs[:-1], spy.preds[:-1]
    first = first_fooled_points(spy, x, y, pgd.eps)
    full = run_protocol(random_model, x, y, pgd, "transfer", seed=3)  # same path, same trajectory, no stopping
    assert full.attack_path == stopped.attack_path
    continued = 0
    for i in range(len(x)):
        if first[i] is None:
            assert torch.equal(stopped.x_adv[i], full.x_adv[i])
        else:
            assert torch.equal(stopped.x_adv[i], first[i]), f"example {i} was perturbed after it was misclassified"
            continued += int(not torch.equal(full.x_adv[i], first[i]))
    clean_wrong = spy.preds[0] != y
    assert all(torch.equal(stopped.x_adv[i], x[i]) for i in clean_wrong.nonzero().flatten().tolist())
    assert continued >= 3, "the test needs examples that plain PGD kept perturbing after they were fooled"


def test_autoattack_leaves_no_example_unperturbed_when_another_path_scores():
    """AutoAttack skips examples its own forward already misclassifies and returns the clean input
    for them; scored on a fresh path those were often right again (18/128 correct under AutoAttack
    against 0/128 under PGD-20 before the fix). Under transfer and eot every example must now be
    attacked; fixed-path keeps AutoAttack's own output, clean inputs included."""
    torch.manual_seed(0)
    model = rna_core.create_model("small_cnn", norm="bn,gns:1").eval()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rna_core.set_path(model, "0000")
    with torch.no_grad():
        y = model(x).argmax(1)  # labels from one path: other paths misclassify many examples
    eps = 8 / 255
    cases = [("autoattack", "transfer"), ("autoattack_rand", "eot"), ("autoattack", "fixed-path")]
    unperturbed = {}
    for name, protocol in cases:
        attack = get_attack(name, eot_iter=2) if name == "autoattack_rand" else get_attack(name)
        out = run_protocol(model, x, y, attack, protocol, seed=2, eot_iter=2)
        distance = (out.x_adv - x).flatten(1).abs().amax(1)
        assert distance.max().item() <= eps + 1e-6 and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
        unperturbed[protocol] = int((distance == 0).sum())
        pgd = run_protocol(model, x, y, get_attack("pgd20"), protocol, seed=2, eot_iter=2)
        if protocol != "fixed-path":
            assert out.correct <= pgd.correct + 2, (
                f"{name} under {protocol}: {out.correct} correct vs PGD-20's {pgd.correct}"
            )
    assert unperturbed["transfer"] == 0 and unperturbed["eot"] == 0
    assert unperturbed["fixed-path"] > 0  # AutoAttack's own rule: clean-misclassified examples stay clean


def test_early_stop_also_holds_for_autoattack_subsets(random_model, test_data):
    x, y = xy(test_data, 8)
    # a small eps, so that the first APGD run leaves some examples standing and later attacks
    # query subsets of the batch
    aa = get_attack("autoattack", eps=3 / 255)
    spy = ForwardSpy(random_model)
    out = run_protocol(random_model, x, y, aa, "early-stop", seed=4)
    spy.close()
    spy.inputs, spy.preds = spy.inputs[:-1], spy.preds[:-1]
    assert any(len(inp) < len(x) for inp in spy.inputs), "AutoAttack should query subsets of the batch"
    first = first_fooled_points(spy, x, y, aa.eps)
    assert sum(f is not None for f in first) >= 4
    for i in range(len(x)):
        expected = x[i] if first[i] is None else first[i]
        assert torch.equal(out.x_adv[i], expected)


def test_protocols_coincide_for_a_model_without_random_layers(test_data):
    plain = train_small_cnn("bn", epochs=1, n=128)
    assert rna_core.count_paths(plain) == 1
    x, y = xy(test_data, 32)
    for name in ("fgsm", "pgd20"):
        attack = get_attack(name, steps=5) if name == "pgd20" else get_attack(name)
        outs = {
            p: run_protocol(plain, x, y, attack, p, seed=2, eot_iter=3)
            for p in ("transfer", "fixed-path", "eot", "early-stop")
        }
        for p in ("fixed-path", "eot"):
            assert torch.equal(outs[p].x_adv, outs["transfer"].x_adv) and outs[p].correct == outs["transfer"].correct
        assert outs["early-stop"].correct == outs["transfer"].correct


def test_robust_accuracy_under_pgd20_is_below_clean_accuracy(test_data):
    model = train_small_cnn("bn", epochs=2, n=512)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rows = evaluate_model(model, test_data, attacks=["pgd20"], protocols=["transfer"], batch_size=32, progress=False)
    acc = {r.attack: r.accuracy for r in rows}
    assert acc["natural"] >= 0.9, f"the test model did not learn the task (clean accuracy {acc['natural']:.2f})"
    assert acc["pgd20"] <= acc["natural"] - 0.5
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items()), "evaluation moved BN statistics"


def test_batch_seeds_make_a_sharded_run_equal_to_a_sequential_one(random_model, test_data):
    rows = evaluate_model(
        random_model,
        test_data,
        attacks=["fgsm"],
        protocols=["transfer", "eot"],
        trials=2,
        seed=5,
        batch_size=16,
        eot_iter=2,
        progress=False,
    )
    batches = list(BatchIterator(test_data, 16, shuffle=False, seed=0))
    units = [(t, b, p) for t in range(2) for b in range(len(batches)) for p in ("transfer", "eot")]
    random.Random(0).shuffle(units)  # any worker, any order
    fgsm = get_attack("fgsm")
    counts: dict[tuple[int, str], Counts] = {}
    for t, b, p in units:
        x, y = batches[b]
        c = evaluate_batch(random_model, x, y, fgsm, p, batch_seed(trial_seed(5, t), b), eot_iter=2, inference_draws=10)
        counts[(t, p)] = counts.get((t, p), Counts()) + c
    got = {
        (r.trial, r.protocol): Counts(r.n, r.correct, r.correct_worst, r.correct_vote)
        for r in rows
        if r.attack == "fgsm"
    }
    assert got == counts and all(r.draws == 10 for r in rows)  # one draw, worst-of-10 and vote-of-10 alike
    # the batch seed pairs the paths across protocols: natural accuracy is scored on the same paths
    natural = {(r.trial, r.protocol): r.correct for r in rows if r.attack == "natural"}
    assert natural[(0, "transfer")] == natural[(0, "eot")] and natural[(1, "transfer")] == natural[(1, "eot")]
    assert unit_seed(5, "a", 1) == unit_seed(5, "a", 1) != unit_seed(5, "a", 2)


def test_bad_evaluation_input_is_a_config_error(random_model, test_data):
    x, y = xy(test_data, 4)
    with pytest.raises(ConfigError, match="valid protocols: transfer, transfer-raw, early-stop, fixed-path, eot"):
        run_protocol(random_model, x, y, "fgsm", "whitebox", seed=0)
    with pytest.raises(ConfigError, match="unknown meta field"):
        evaluate_model(random_model, test_data, attacks=["fgsm"], meta={"runid": "x"}, progress=False)
    with pytest.raises(ConfigError, match="trials"):
        evaluate_model(random_model, test_data, trials=0, progress=False)


# -------------------------------------------------------------------------------------- results


def make_rows() -> list[ResultRow]:
    rows = []
    for method, base in (("rna", 0.8), ("natural", 0.9)):
        for attack, eps, drop in (
            ("natural", 0.0, 0.0),
            ("fgsm", 8.0, 0.3),
            ("pgd20", 8.0, 0.4),
            ("deepfool", None, 0.5),
            ("eot_pgd", 8.0, 0.6),
        ):
            for protocol in ("transfer", "eot"):
                for trial in range(3):
                    correct = int(round(1000 * (base - drop))) - 7 * trial
                    rows.append(
                        ResultRow.make(
                            run_id="r1",
                            model="resnet18",
                            method=method,
                            dataset="cifar10",
                            attack=attack,
                            protocol=protocol,
                            eps=eps,
                            trial=trial,
                            seed=10 + trial,
                            n=1000,
                            correct=correct,
                            seconds=1.5,
                            **(
                                dict(draws=10, correct_worst=correct - 50, correct_vote=correct + 5)
                                if method == "rna"
                                else {}
                            ),
                        )
                    )
    return rows


def test_parquet_round_trip_and_merge_without_duplicates(tmp_path):
    rows = make_rows()
    path = tmp_path / "out" / "results.parquet"
    write_rows_parquet(rows, path)
    back = read_rows_parquet(path)
    assert back == rows
    table = pq.read_table(path)
    assert table.column_names == [
        "run_id",
        "model",
        "method",
        "dataset",
        "attack",
        "protocol",
        "eps",
        "trial",
        "seed",
        "n",
        "correct",
        "accuracy",
        "seconds",
        "draws",  # added for randomized models: R, and worst-of-R and vote-of-R
        "correct_worst",
        "accuracy_worst",
        "correct_vote",
        "accuracy_vote",
    ]
    assert table.column("eps").null_count == 12  # deepfool: unbounded
    # a file of the first format (DESIGN.md's 13 columns) still reads, its R columns null
    old = tmp_path / "v1.parquet"
    pq.write_table(table.select(table.column_names[:13]), old)
    v1 = read_rows_parquet(old)
    assert [r.correct for r in v1] == [r.correct for r in rows] and all(r.draws is None for r in v1)
    assert back[0].accuracy_worst == (back[0].correct - 50) / 1000 and back[0].draws == 10
    # merging: a re-run replaces rows with the same key, new rows are added
    changed = dataclasses.replace(rows[0], correct=1, accuracy=0.001)
    extra = dataclasses.replace(rows[0], trial=9, n=10, correct=5, accuracy=0.5)
    write_rows_parquet([changed, extra], path)
    merged = read_rows_parquet(path)
    assert len(merged) == len(rows) + 1
    assert [r for r in merged if r.key() == rows[0].key()] == [changed]
    write_rows_parquet([extra], path, merge=False)
    assert read_rows_parquet(path) == [extra]
    assert not [p for p in path.parent.iterdir() if p.name != "results.parquet"], "temporary files left behind"
    with pytest.raises(DatasetNotFoundError):
        read_rows_parquet(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="not an evaluation results table"):
        read_rows_parquet(tmp_path / "other.parquet")


def test_method_label_tells_plain_norms_spaces_and_precision_sets_apart():
    assert method_label(rna_core.create_model("small_cnn", norm="bn").rna_spec) == "bn"
    assert method_label(rna_core.create_model("small_cnn", norm="gn:2").rna_spec) == "gn:2"
    assert method_label(rna_core.create_model("small_cnn", norm="bn,gns:1").rna_spec) == "rna(bn,gns:1)"
    assert (
        method_label(rna_core.create_model("small_cnn", method="rpt", norm="bn", precisions="4-8").rna_spec)
        == "rpt(4-8)"
    )
    assert method_label({}) == "none"


def test_a_bn_baseline_and_an_rna_model_get_their_own_table_rows(random_model, test_data):
    """Before, both were `small_cnn | rna` and the table averaged two different models into one row."""
    torch.manual_seed(0)
    bn_model = rna_core.create_model("small_cnn", norm="bn").eval()
    rows = []
    for model in (random_model, bn_model):
        rows += evaluate_model(
            model, test_data, attacks=["fgsm"], protocols=["transfer"], batch_size=32, progress=False
        )
    assert {r.method for r in rows} == {"rna(bn,gns:1)", "bn"}
    body = paper_table(rows, "transfer").splitlines()[2:]
    assert sorted(line.split("|")[2].strip() for line in body) == ["bn", "rna(bn,gns:1)"]
    for line in body:  # each row shows its own model's clean accuracy, not a blend of both
        method = line.split("|")[2].strip()
        natural = next(r for r in rows if r.method == method and r.attack == "natural")
        assert line.split("|")[3].strip() == f"{100 * natural.accuracy:.2f}"


def test_two_runs_with_the_same_label_are_not_averaged_into_one_row():
    rows = [r for r in make_rows() if r.method == "rna"]
    other = [
        dataclasses.replace(r, run_id="run-two-abcdef", correct=r.correct // 2, accuracy=r.accuracy / 2) for r in rows
    ]
    body = paper_table(rows + other, "transfer").splitlines()[2:]
    assert sorted(line.split("|")[2].strip() for line in body) == ["rna [r1]", "rna [run-two-]"]
    clean = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in body}
    assert clean == {"rna [r1]": "79.30", "rna [run-two-]": "39.65"}  # mean over 3 trials; not a blended 59.48
    assert paper_table(rows, "transfer").splitlines()[2].split("|")[2].strip() == "rna"  # one run: plain label


def test_markdown_table_has_the_papers_columns_one_table_per_protocol():
    rows = make_rows()
    table = paper_table(rows, "transfer")
    lines = table.splitlines()
    assert lines[0] == "| Model | Method | Natural | FGSM | PGD20 | CW | MIFGSM | DeepFool | AutoAttack | EOT-PGD |"
    assert [label for label, _ in PAPER_COLUMNS] == [
        "Natural",
        "FGSM",
        "PGD20",
        "CW",
        "MIFGSM",
        "DeepFool",
        "AutoAttack",
    ]
    by_method = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in lines[2:]}
    # rna: natural 800, 793, 786 of 1000 over three trials -> mean 79.30 %; CW, MIFGSM, AutoAttack not run
    assert by_method["rna"] == ["79.30", "49.30", "39.30", "-", "-", "29.30", "-", "19.30"]
    assert by_method["natural"][0] == "89.30"
    # an attack run at a non-default eps gets its own column beside the paper's
    pgd = next(r for r in rows if r.attack == "pgd20" and r.protocol == "transfer")
    weaker = dataclasses.replace(pgd, eps=4.0, correct=900, accuracy=0.9)
    header = paper_table(rows + [weaker], "transfer").splitlines()[0]
    assert "| PGD20 | PGD20 (eps 4) | CW |" in header
    doc = render_markdown(rows, title="Evaluation")
    assert doc.count("| Model | Method | Natural |") == 2 * 3  # per protocol: one draw, worst-of-10, vote-of-10
    assert "## Protocol `transfer`" in doc and "## Protocol `eot`" in doc
    assert doc.index("`transfer`") < doc.index("`eot`")
    worst = paper_table(rows, "transfer", score="worst").splitlines()
    rna_worst = next(line for line in worst if "| rna |" in line)
    assert rna_worst.split("|")[3].strip() == "74.30"  # 50 fewer of 1000 than the one-draw 79.30
    assert next(line for line in worst if "| natural |" in line).split("|")[3].strip() == "-"  # rows without R
    assert doc.index("one inference draw") < doc.index("worst-of-10") < doc.index("vote-of-10")
    old_rows = [r for r in rows if r.draws is None]  # rows without R get only the one-draw table
    assert render_markdown(old_rows).count("| Model | Method | Natural |") == 2


def test_stability_statistics_are_computed_over_the_trials_rows(random_model, test_data):
    rows = evaluate_model(
        random_model,
        test_data,
        attacks=["fgsm"],
        protocols=["transfer"],
        trials=3,
        seed=1,
        batch_size=32,
        progress=False,
    )
    assert sorted({r.seed for r in rows}) == [1, 2, 3]  # distinct seeds per trial
    stats = {s.attack: s for s in stability(rows)}
    for attack, s in stats.items():
        accs = [r.accuracy for r in rows if r.attack == attack]
        assert s.trials == 3 and s.seeds == (1, 2, 3)
        assert math.isclose(s.mean, statistics.mean(accs)) and math.isclose(s.std, statistics.stdev(accs))
        assert (s.min, s.max) == (min(accs), max(accs))
    assert any(s.std > 0 for s in stats.values()), "trials with different seeds should differ on a random model"
    text = stability_table(rows)
    assert text.splitlines()[0] == "| Model | Method | Attack | Protocol | Trials | Mean | Std | Min | Max |"
    assert f"{100 * stats['fgsm'].mean:.2f}" in text


def test_progress_bar_only_on_a_terminal(random_model, test_data, capfd):
    evaluate_model(random_model, test_data, attacks=["fgsm"], batch_size=32, limit=32)
    assert capfd.readouterr().err == ""  # pytest's stderr is not a terminal: quiet
    evaluate_model(random_model, test_data, attacks=["fgsm"], batch_size=32, limit=32, progress=True)
    assert "evaluate small_cnn" in capfd.readouterr().err


# -------------------------------------------------------------------------------- path analysis


def test_paths_at_distance_differ_in_exactly_d_layers(random_model):
    gen = torch.Generator().manual_seed(0)
    base = rna_core.sample_path(random_model, "uniform", gen)
    for d in range(5):
        for _ in range(10):
            assert base.differences(path_at_distance(random_model, base, d, gen)) == d
    with pytest.raises(ConfigError):
        path_at_distance(random_model, base, 5, gen)


def test_path_analysis_saves_data_and_plots(random_model, test_data, tmp_path):
    batches = list(BatchIterator(test_data, 32, shuffle=False, seed=0))[:1]
    fgsm = get_attack("fgsm")
    records = accuracy_vs_distance(random_model, batches, fgsm, seed=0, paths_per_distance=2)
    assert [r.distance for r in records] == [0, 1, 2, 3, 4] and [r.layers_differ for r in records] == [0, 1, 2, 3, 4]
    assert all(r.n == 64 for r in records)
    files = save_distance_analysis(records, tmp_path / "dist", attack="fgsm")
    back = pq.read_table(files["parquet"]).to_pylist()
    assert [r["accuracy"] for r in back] == [r.accuracy for r in records]
    assert (tmp_path / "dist" / "accuracy_vs_distance.csv").read_text().startswith('"distance"')

    matrix = transfer_matrix(random_model, batches, fgsm, num_paths=3, seed=0)
    assert len(set(matrix.paths)) == 3 and matrix.n == 32
    for i, path in enumerate(matrix.paths):  # the diagonal is the white-box (fixed-path) accuracy
        x, y = batches[0]
        white = run_protocol(
            random_model, x, y, fgsm, "fixed-path", seed=unit_seed(0, "matrix", 0, i), strategy=f"fixed:{path}"
        )
        assert matrix.correct[i][i] == white.correct
    files = save_transfer_matrix(matrix, tmp_path / "matrix", attack="fgsm")
    assert len(pq.read_table(files["parquet"])) == 9
    for png in (tmp_path / "dist" / "accuracy_vs_distance.png", tmp_path / "matrix" / "transfer_matrix.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _one_path_labels(n: int = 12):
    """An untrained RNA model and labels taken from one of its paths: other paths misclassify many
    examples, so attacks that judge on the attack path hand some back unperturbed."""
    torch.manual_seed(0)
    model = rna_core.create_model("small_cnn", norm="bn,gns:1").eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rna_core.set_path(model, "0000")
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_one_unperturbed_rule_for_every_attack_under_transfer_and_eot():
    """torchattacks' CW returns the clean input for every example it never misclassified and DeepFool
    for every example misclassified from the start (RNA's evaluate.py scores those outputs on a fresh
    path). Under transfer and eot no example may be scored unperturbed, for any attack: each gets
    APGD-CE's highest-loss point inside the attack's threat model (L2 radius fill_eps for unbounded
    L2 attacks), and the examples the attack did perturb keep the attack's own point."""
    model, x, y = _one_path_labels()
    cases = [("cw_l2", dict(steps=5)), ("deepfool", dict(steps=3)), ("autoattack", {}), ("fgsm", {})]
    for name, settings in cases:
        attack = get_attack(name, **settings)
        raw = run_protocol(model, x, y, attack, "transfer-raw", seed=2, eot_iter=2)
        for protocol in ("transfer", "eot"):
            out = run_protocol(model, x, y, attack, protocol, seed=2, eot_iter=2)
            dist = attack.threat.distance(out.x_adv, x)
            assert int((dist <= 1e-5).sum()) == 0, f"{name} under {protocol}: {int((dist <= 1e-5).sum())} unperturbed"
            assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
            bound = attack.eps if attack.eps is not None else attack.settings["fill_eps"]
            left = attack.threat.distance(raw.x_adv, x) <= 1e-5
            if bool(left.any()):
                assert float(dist[left].max()) <= bound + 1e-5, name  # fills stay in the budget
            if protocol == "transfer":  # same seeds: only the unperturbed examples changed
                assert torch.equal(out.x_adv[~left], raw.x_adv[~left]), name
                assert out.attack_path == raw.attack_path and out.score_path == raw.score_path
        if name in ("cw_l2", "deepfool"):
            assert int(left.sum()) > 0, f"the test needs {name} to hand back clean inputs under transfer-raw"


def test_transfer_raw_is_transfer_for_attacks_that_perturb_every_example(random_model, test_data):
    x, y = xy(test_data, 16)
    pgd = get_attack("pgd20", steps=3)
    a = run_protocol(random_model, x, y, pgd, "transfer", seed=5)
    b = run_protocol(random_model, x, y, pgd, "transfer-raw", seed=5)
    assert torch.equal(a.x_adv, b.x_adv) and a.correct == b.correct and a.score_path == b.score_path
    natural = get_attack("natural")
    assert torch.equal(run_protocol(random_model, x, y, natural, "transfer", seed=5).x_adv, x)  # natural stays clean


def test_early_stop_is_attributed_to_double_win_quant_not_to_the_rna_code():
    """Double-Win Quant's CIFAR/utils.py attack_pgd stops attacking an example once it is
    misclassified; RNA's utils.py attack_pgd attacks every example every step. The docs must say so."""
    from pathlib import Path

    import rna_core.evaluation.protocols as protocols

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for text in (protocols.__doc__, readme):
        line = next(line for line in text.splitlines() if "early-stop" in line and "(" in line)
        assert "the paper's adaptive setting" not in text and "(its adaptive setting)" not in text
        assert "Double-Win Quant" in text[text.index(line) : text.index(line) + 400], line


# ------------------------------------------------------------------------------ shared attacks


class ForwardCount:
    """Forwards of a model with gradients on (attack steps; scoring forwards run without)."""

    def __init__(self, model: torch.nn.Module):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.n += int(torch.is_grad_enabled())

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("name, settings", [("cw_l2", dict(steps=5)), ("deepfool", dict(steps=3)), ("pgd20", {})])
def test_protocols_that_share_an_attack_run_it_once_with_every_outcome_as_if_run_alone(name, settings):
    """fixed-path, transfer-raw and transfer attack the same path with the same generator, so one
    attack run serves all three: each outcome (its adversarial batch, counts, paths) equals
    run_protocol's exactly, also where the unperturbed rule fills examples under transfer (CW and
    DeepFool hand some back clean here), and early-stop still runs on its own."""
    model, x, y = _one_path_labels()
    attack = get_attack(name, **settings)
    protocols = ["transfer", "early-stop", "fixed-path", "transfer-raw"]
    spy = ForwardCount(model)
    alone, forwards = {}, {}
    for p in protocols:
        spy.n = 0
        alone[p] = run_protocol(model, x, y, attack, p, seed=3, inference_draws=3)
        forwards[p] = spy.n
    spy.n = 0
    shared = rna_core.evaluation.run_protocols(model, x, y, attack, protocols, seed=3, inference_draws=3)
    forwards_shared = spy.n
    spy.close()
    assert list(shared) == protocols
    for p in protocols:
        a, b = alone[p], shared[p]
        assert torch.equal(a.x_adv, b.x_adv), f"{name} under {p}"
        facts = lambda o: (o.counts, o.attack_path, o.score_path, o.path_draws)  # noqa: E731
        assert facts(a) == facts(b), f"{name} under {p}"
    left = attack.threat.distance(alone["fixed-path"].x_adv, x) <= 1e-5
    if name != "pgd20":
        assert int(left.sum()) > 0 and not torch.equal(shared["transfer"].x_adv, shared["transfer-raw"].x_adv)
    assert shared["fixed-path"].score_path == shared["fixed-path"].attack_path != shared["transfer"].score_path
    # the attack ran once for the three: what the shared call saved is exactly the two runs of
    # fixed-path and transfer-raw alone (transfer alone is the attack plus its fill)
    assert forwards["fixed-path"] == forwards["transfer-raw"] > 0
    assert sum(forwards.values()) - forwards_shared == 2 * forwards["fixed-path"]


@pytest.mark.parametrize("case", ["rna on a fixed path", "plain bn", "rna under a bf16 forward"])
def test_shared_attacks_on_deterministic_models_and_under_a_bf16_forward_are_as_if_run_alone(case):
    """A deterministic model gets no fill under transfer (the protocols coincide), and the bf16
    forward wrapper draws its paths through the model it wraps: both as run_protocol runs them."""
    model, x, y = _one_path_labels()
    strategy = "uniform"
    if case == "rna on a fixed path":
        strategy = "fixed:0000"
    elif case == "plain bn":
        torch.manual_seed(0)
        model = rna_core.create_model("small_cnn", norm="bn").eval()
    else:
        model = evaluation_forward(model, "bf16")
    attack = get_attack("cw_l2", steps=3)
    protocols = ["transfer", "fixed-path", "transfer-raw"]
    shared = rna_core.evaluation.run_protocols(model, x, y, attack, protocols, seed=6, strategy=strategy)
    for p in protocols:
        alone = run_protocol(model, x, y, attack, p, seed=6, strategy=strategy)
        assert torch.equal(alone.x_adv, shared[p].x_adv) and alone.counts == shared[p].counts, (case, p)
        assert (alone.attack_path, alone.score_path) == (shared[p].attack_path, shared[p].score_path), (case, p)
    randomized = case == "rna under a bf16 forward"
    assert shared["transfer"].randomized is randomized
    assert torch.equal(shared["transfer"].x_adv, shared["fixed-path"].x_adv) is not randomized
    with pytest.raises(ConfigError, match="unique"):
        rna_core.evaluation.run_protocols(model, x, y, attack, ["transfer", "transfer"], seed=6)


def test_a_shared_attack_runs_once_for_three_protocols(random_model, test_data):
    """PGD-20 under fixed-path, transfer-raw and transfer: 20 gradient forwards per batch shared, 60 alone."""
    x, y = xy(test_data, 16)
    pgd = get_attack("pgd20")
    protocols = ["fixed-path", "transfer-raw", "transfer"]
    spy = ForwardCount(random_model)
    shared = rna_core.evaluation.run_protocols(random_model, x, y, pgd, protocols, seed=4)
    assert spy.n == 20
    spy.n = 0
    alone = rna_core.evaluation.run_protocols(random_model, x, y, pgd, protocols, seed=4, share_attacks=False)
    assert spy.n == 60
    spy.close()
    assert all(shared[p].counts == alone[p].counts for p in protocols)


def test_the_runner_gives_the_same_rows_with_and_without_shared_attacks(random_model, test_data):
    attacks = ["natural", "fgsm", get_attack("pgd20", steps=5)]
    kwargs = dict(attacks=attacks, protocols=["transfer", "fixed-path", "early-stop"], limit=32,
                  batch_size=16, trials=2, seed=1, inference_draws=2)  # fmt: skip
    key = lambda r: (r.attack, r.protocol, r.trial, r.n, r.correct, r.correct_worst, r.correct_vote)  # noqa: E731
    shared = evaluate_model(random_model, test_data, **kwargs)
    alone = evaluate_model(random_model, test_data, share_attacks=False, **kwargs)
    assert [key(r) for r in shared] == [key(r) for r in alone]
    assert len(shared) == 3 * 3 * 2
