"""The reproduction report (experiments/reproduction/report.py) on a tiny synthetic experiment.

A base folder laid out as experiments/reproduction/run.py leaves it (state.json, one evaluation
folder per step with its results.parquet written by rna_core's own writer), with known counts:
the report must show exactly those numbers, derived ones (the gap, what EOT keeps, Table 4's
statistics) computed from them, missing steps as missing, and the in-progress state.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from rna_core.evaluation import ResultRow, write_rows_parquet

REPO = Path(__file__).resolve().parents[1]


from experiments.reproduction import report  # noqa: E402
from experiments.reproduction import run as driver  # noqa: E402


def _row(
    arm: str, attack: str, protocol: str, correct: int, n: int = 200, trial: int = 0, bf16: bool = False
) -> ResultRow:
    method = {"bn": "bn", "rna": "rna(bn,gns:1)"}[arm] + (" [bf16 forward]" if bf16 else "")
    return ResultRow.make(
        run_id=f"run-{arm}",
        model="wrn16_2",
        method=method,
        dataset="cifar10",
        attack=attack,
        protocol=protocol,
        eps=None if attack in ("natural",) else 8.0,
        trial=trial,
        seed=trial,
        n=n,
        correct=correct,
        seconds=1.5,
    )


def _experiment(base: Path, with_stability: bool = True) -> dict:
    """bn and rna trained; rna evaluated in table1, eot, early_stop (and stability); bn in table1 only."""
    steps: dict = {
        "sweep": {"command": "python jobs/sweep.py --config configs/reproduction_cpu.yaml", "rc": 0, "seconds": 600.0}
    }
    results = {
        ("bn", "table1"): [
            _row("bn", "natural", "transfer", 120),
            _row("bn", "fgsm", "transfer", 70),
            _row("bn", "pgd20", "transfer", 60),
            _row("bn", "mifgsm", "transfer", 62),
        ],
        ("rna", "table1"): [
            _row("rna", "natural", "transfer", 110),
            _row("rna", "natural", "fixed-path", 112),
            _row("rna", "pgd20", "transfer", 90),  # 45.0 %
            _row("rna", "pgd20", "fixed-path", 50),  # 25.0 %: gap 20 points
            _row("rna", "fgsm", "transfer", 95),
            _row("rna", "fgsm", "fixed-path", 80),
        ],
        ("rna", "eot"): [_row("rna", "natural", "eot", 110), _row("rna", "eot_pgd", "eot", 60)],  # 30.0 %: keeps 25 %
        # natural is in every step: the table takes the step with the most images (this one sorts first)
        ("rna", "autoattack"): [
            _row("rna", "natural", "transfer", 40, n=100, bf16=True),
            _row("rna", "autoattack", "transfer", 30, n=100, bf16=True),
        ],
        ("rna", "early_stop"): [_row("rna", "natural", "early-stop", 110), _row("rna", "pgd20", "early-stop", 70)],
        ("rna", "autoattack_rand"): [_row("rna", "autoattack_rand", "eot", 27, n=100, bf16=True)],  # 27.0 %
    }
    if with_stability:
        results[("rna", "stability")] = [
            _row("rna", "pgd20", "transfer", c, trial=t, bf16=True) for t, c in enumerate((88, 90, 92, 94))
        ] + [_row("rna", "natural", "transfer", 110, trial=t, bf16=True) for t in range(4)]
        results[("bn", "stability")] = [
            _row("bn", "pgd20", "transfer", c, trial=t, bf16=True) for t, c in enumerate((60, 61, 59))
        ] + [_row("bn", "natural", "transfer", 120, trial=t, bf16=True) for t in range(3)]
    for (arm, step), rows in results.items():
        out_dir = base / "eval_results" / "reproduction_cpu" / f"{arm}-{step}"
        out_dir.mkdir(parents=True)
        write_rows_parquet(rows, out_dir / "results.parquet")
        steps[f"eval/{arm}/{step}"] = {
            "arm": arm,
            "step": step,
            "rc": 0,
            "seconds": 120.0,
            "out_dir": str(out_dir),
            "mlflow_run_id": f"eval-{arm}-{step}",
            "command": f"python jobs/evaluate.py --run-id run-{arm} ...",
        }
    (base / "eval_results" / "reproduction_cpu" / "rna-table1" / "path_analysis").mkdir()
    png = base / "eval_results" / "reproduction_cpu" / "rna-table1" / "path_analysis" / "accuracy_vs_distance_pgd20.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    state = {
        "started": "2026-12-02T02:20:00Z",
        "steps": steps,
        "trials": {
            "bn": {"run_id": "run-bn", "status": "FINISHED", "seconds": 1800.0, "parent_run_id": "parent-1"},
            "rna": {"run_id": "run-rna", "status": "FINISHED", "seconds": 2400.0, "parent_run_id": "parent-1"},
            "rpt": {"run_id": "run-rpt", "status": "RUNNING", "seconds": None, "parent_run_id": "parent-1"},
        },
    }
    (base / "reproduction").mkdir(parents=True)
    (base / "reproduction" / "state.json").write_text(json.dumps(state))
    return state


def _table_row(text: str, first: str, second: str | None = None) -> list[str]:
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols and cols[0] == first and (second is None or cols[1] == second):
            return cols
    raise AssertionError(f"no row {first!r} {second!r}")


def test_report_shows_the_tables_numbers_and_the_in_progress_state(tmp_path):
    base, out = tmp_path / "base", tmp_path / "docs"
    _experiment(base)
    sizing = {"choice": "Chose wrn16_2 because of the measurements.", "results": [], "command": "size.py"}
    stopped = report.render(base, out, sizing)  # no live driver recorded in <base>/pids
    assert "**Experiment stopped before the end**" in stopped and "in progress" not in stopped
    (base / "pids").write_text(f"{os.getpgrp()}\n")  # a live process group: this test's own
    text = report.render(base, out, sizing)

    assert "**Experiment in progress**" in text and "**Finished.**" not in text
    done = sum(1 for line in text.splitlines() if line.startswith("| ") and "| done |" in line)
    assert f"the sweep (four trainings) 10 min, the {done} finished evaluation steps {2 * done} min" in text
    assert "beside the training" not in text  # no step has a finish time: nothing ran side by side
    bn_label, rna_label = dict(report.ARMS)["bn"], dict(report.ARMS)["rna"]
    header = [c.strip() for c in text.split("## Table 1")[1].splitlines()[2].strip("|").split("|")]
    row = dict(zip(header, _table_row(text, rna_label, "transfer")))
    assert (row["Natural"], row["FGSM"], row["PGD-20"], row["EOT-PGD (eot)"]) == ("55.0", "47.5", "45.0", "30.0")
    # from its 100-image step, marked: it ran the forward in bf16; Natural (55.0, fp32) from table1's 200
    assert row["AutoAttack"] == "30.0" + report.BF16_MARK
    assert row["CW"] == "-"  # not run yet
    assert row["AutoAttack-rand (eot)"] == "27.0" + report.BF16_MARK
    fixed = dict(zip(header, _table_row(text, rna_label, "fixed-path")))
    assert (fixed["PGD-20"], fixed["FGSM"], fixed["EOT-PGD (eot)"]) == ("25.0", "40.0", "")
    # BN: deterministic, so its fixed-path and eot cells are its transfer numbers
    bn = dict(zip(header, _table_row(text, bn_label, "transfer")))
    assert (bn["PGD-20"], bn["EOT-PGD (eot)"], bn["AutoAttack-rand (eot)"]) == ("30.0", "30.0", "-")
    # the published row carries the quoted numbers and leaves the rest empty
    pub = dict(zip(header, _table_row(text, f"published: {report.PUBLISHED['rna']['label']}")))
    assert (pub["Natural"], pub["PGD-20"], pub["CW"]) == ("84.3", "60.9", "-")

    t3 = dict(
        zip(
            ["arm", "es", "t", "f", "e", "aar"],
            _table_row(text.split("## Table 3")[1], rna_label),
        )
    )
    assert (t3["es"], t3["t"], t3["f"], t3["e"]) == ("35.0", "45.0", "25.0", "30.0")
    assert t3["aar"] == "27.0" + report.BF16_MARK  # Table 1's cell, beside early-stop

    t4 = _table_row(text.split("## Table 4")[1], rna_label, "pgd20 / transfer")
    accs = [100 * c / 200 for c in (88, 90, 92, 94)]
    assert t4[2:] == [
        "4",
        "bf16",
        f"{statistics.fmean(accs):.2f}",
        f"{statistics.pstdev(accs):.2f}",
        f"{min(accs):.2f}",
        f"{max(accs):.2f}",
    ]
    assert _table_row(text.split("## Table 4")[1], rna_label, "eot_pgd / eot")[2:] == ["-"] * 6
    # BN: no random layer, so its fixed-path and EOT-PGD trials are its transfer trials
    bn_t4 = _table_row(text.split("## Table 4")[1], bn_label, "pgd20 / transfer")
    assert bn_t4[2:4] == ["3", "bf16"] and bn_t4[4] == f"{statistics.fmean([30.0, 30.5, 29.5]):.2f}"
    for attack_protocol in ("pgd20 / fixed-path", "eot_pgd / eot"):
        assert _table_row(text.split("## Table 4")[1], bn_label, attack_protocol)[2:] == bn_t4[2:]
    # bf16 against fp32: Table 4's trial 0 (bf16) beside the fp32 single-trial step with the same seeds
    check = text.split("## bf16 against fp32")[1].split("## ")[0]
    assert _table_row(check, rna_label, "pgd20 / transfer")[2:] == ["200", "45.0", "44.0", "-1.0"]
    assert _table_row(check, rna_label, "natural / transfer")[2:] == ["200", "55.0", "55.0", "+0.0"]
    assert "Largest difference: 1.0 points" in check and "autoattack" not in check

    # findings: the gap (20 points) and what EOT keeps of it (25 %), from the numbers above
    f = text.split("## Findings")[1]
    assert "gap 20.0 points" in f and "30.0%" in f and "keeping 25% of the gap" in f
    assert f"{rna_label} 35.0% against 45.0% (-10.0 points)" in f  # Table 3 against Table 1
    # plots and path analysis copied beside the report; runs with their MLflow ids and wall times
    for png in ("reproduction_transfer_gap.png", "reproduction_eot_keeps.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert (out / "reproduction_rna_accuracy_vs_distance_pgd20.png").is_file()
    assert _table_row(text, "train rna")[1:] == ["FINISHED", "run-rna", "40.0"]
    assert _table_row(text, "rna/eot")[1:] == ["done", "eval-rna-eot", "2.0"]
    assert "parent-1" in text and "Chose wrn16_2" in text and report.PAPER_SCALE in text
    assert (out / "reproduction.md").read_text() == text


def test_report_of_an_all_fp32_run_claims_no_bf16_cells(tmp_path):
    """A driver that ran every step fp32 (no bf16 fast path) gets a caption and a precision section
    that say so, not the plan's bf16 steps."""
    base, out = tmp_path / "base", tmp_path / "docs"
    state = _experiment(base, with_stability=False)
    reason = "auto: no bf16 fast path on this machine (every step fp32)"
    state["bf16_steps"] = {"choice": "auto", "bf16": False, "reason": reason}
    (base / "reproduction" / "state.json").write_text(json.dumps(state))
    for folder in (base / "eval_results" / "reproduction_cpu").iterdir():  # rewrite the bf16 rows as fp32
        if folder.name == "rna-autoattack":
            rows = [_row("rna", "natural", "transfer", 40, n=100), _row("rna", "autoattack", "transfer", 30, n=100)]
            write_rows_parquet(rows, folder / "results.parquet")
        if folder.name == "rna-autoattack_rand":
            write_rows_parquet([_row("rna", "autoattack_rand", "eot", 27, n=100)], folder / "results.parquet")
    text = report.render(base, out, None)
    assert f"Every cell is fp32 ({reason})." in text and report.BF16_MARK not in text
    check = text.split("## bf16 against fp32")[1].split("## ")[0]
    assert "Every step of this run ran the model's forward in fp32" in check and reason in check


def test_report_before_anything_ran_says_so(tmp_path):
    text = report.render(tmp_path / "empty", tmp_path / "out", None)
    assert "**Not started**" in text and "No finished evaluation" in text
    assert "45.0" not in text and _table_row(text, dict(report.ARMS)["rna"], "transfer")[2:9] == ["-"] * 7


@pytest.mark.parametrize("arm, expect", [("bn", "transfer"), ("rna", "transfer,fixed-path")])
def test_driver_runs_every_protocol_on_random_models_and_transfer_on_bn(arm, expect, tmp_path):
    step = next(s for s in driver.PLAN if s.name == "table1")
    cmd = driver.evaluate_command(step, arm, "RUN", "/data", tmp_path / "x")
    assert cmd[cmd.index("--protocols") + 1] == expect
    assert cmd[cmd.index("--limit") + 1] == "1000" and cmd[cmd.index("--run-id") + 1] == "RUN"
    assert cmd[cmd.index("--path-analysis") + 1] == ("0" if arm == "bn" else "256")
    plan = {s.name: s for s in driver.PLAN}
    assert plan["autoattack"].limit >= 500 and plan["autoattack_rand"].limit >= 500
    assert all(s.limit >= 1000 for s in driver.PLAN if "autoattack" not in s.attacks)
    assert plan["stability"].trials == 10 and plan["stability_eot"].trials == 10
    assert int(plan["eot"].extra[plan["eot"].extra.index("--eot-iter") + 1]) >= 10
    # the repeated, costly steps run the forward in bf16; Table 1's and Table 3's own steps stay fp32
    precision = {
        s.name: (c[c.index("--forward-precision") + 1] if "--forward-precision" in c else "fp32")
        for s in driver.PLAN
        for c in [driver.evaluate_command(s, "rna", "RUN", "/data", tmp_path / s.name)]
    }
    assert {k for k, v in precision.items() if v == "bf16"} == {
        "autoattack",
        "autoattack_rand",
        "stability",
        "stability_eot",
    }
    assert set(precision.values()) == {"fp32", "bf16"}


def test_bf16_steps_follow_the_machine_unless_told(tmp_path, monkeypatch):
    import rna_core.speed

    step = next(s for s in driver.PLAN if s.precision == driver.BF16)
    fp32_cmd = driver.evaluate_command(step, "rna", "RUN", "/data", tmp_path, bf16=False)
    assert "--forward-precision" not in fp32_cmd
    bf16_cmd = driver.evaluate_command(step, "rna", "RUN", "/data", tmp_path)
    assert bf16_cmd[bf16_cmd.index("--forward-precision") + 1] == "bf16"
    assert driver.resolve_bf16_steps("on")[0] is True and driver.resolve_bf16_steps("off")[0] is False
    monkeypatch.setattr(rna_core.speed, "bf16_fast_path", lambda device: None)  # e.g. an AMD EPYC, no GPU
    bf16, why = driver.resolve_bf16_steps("auto")
    assert bf16 is False and "fp32" in why
    monkeypatch.setattr(rna_core.speed, "bf16_fast_path", lambda d: "cpu: amx_bf16" if d == "cpu" else None)
    assert driver.resolve_bf16_steps("auto") == (True, "auto: cpu: amx_bf16")


def test_driver_refuses_a_base_folder_inside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RNA_BASE_DIR", str(REPO / "tmp_base"))
    assert driver.main(["--data-dir", str(tmp_path)]) == 2
    assert "inside the checkout" in capsys.readouterr().err and not (REPO / "tmp_base").exists()
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path / "base"))
    assert driver.main(["--data-dir", str(tmp_path)]) == 2  # no Parquet files there
    assert "train.parquet" in capsys.readouterr().err and not (tmp_path / "base").exists()


def test_two_drivers_never_erase_each_others_steps(tmp_path):
    """`--evaluate-only` beside a running sweep: each driver's save keeps the other's records."""
    path = tmp_path / "state.json"
    a = {"steps": {}, "started": "a"}
    b = driver.load_state(path)
    a["steps"]["eval/bn/table1"] = {"rc": 0}
    driver.save_state(path, a, {"eval/bn/table1"})
    b["steps"]["sweep"] = {"rc": 0}
    driver.save_state(path, b, {"sweep"})  # b loaded before a wrote: a's step must survive
    a["steps"]["eval/bn/early_stop"] = {"rc": 1}
    driver.save_state(path, a, {"eval/bn/table1", "eval/bn/early_stop"})
    steps = driver.load_state(path)["steps"]
    assert steps == {"eval/bn/table1": {"rc": 0}, "sweep": {"rc": 0}, "eval/bn/early_stop": {"rc": 1}}
    assert not list(tmp_path.glob("*.tmp"))


def test_findings_do_not_read_a_share_into_a_gap_within_the_noise():
    def cell(mean: float) -> report.Cell:
        return report.Cell(mean=mean, trials=(mean,), n=1000, seconds=1.0)

    tiny = {("pgd20", "transfer"): cell(25.4), ("pgd20", "fixed-path"): cell(25.1), ("eot_pgd", "eot"): cell(25.4)}
    wide = {("pgd20", "transfer"): cell(25.7), ("pgd20", "fixed-path"): cell(15.2), ("eot_pgd", "eot"): cell(19.9)}
    text = " ".join(report.findings({"rpt": tiny, "rna": wide}))
    rpt_part, rna_part = text.split(dict(report.ARMS)["rpt"])[1], text.split(dict(report.ARMS)["rpt"])[0]
    assert "gap 0.3 points" in rpt_part and "nothing for EOT to keep" in rpt_part and "keeping" not in rpt_part
    assert "gap 10.5 points" in rna_part and "keeping 45% of the gap" in rna_part


def test_findings_call_a_difference_from_bn_inside_the_noise_level():
    bn = {("pgd20", "transfer"): _cell((25.4,))}
    rna = {
        ("pgd20", "transfer"): _cell((25.5,)),
        ("pgd20", "fixed-path"): _cell((15.6,)),
        ("eot_pgd", "eot"): _cell((19.3,)),
    }
    rpt = {
        ("pgd20", "transfer"): _cell((28.4,)),
        ("pgd20", "fixed-path"): _cell((25.1,)),
        ("eot_pgd", "eot"): _cell((25.4,)),
    }
    text = " ".join(report.findings({"bn": bn, "rna": rna, "rpt": rpt}))
    rna_part, rpt_part = text.split(dict(report.ARMS)["rpt"])
    assert "is level with it (+0.1 points) under `transfer`, 6.1 points below it under EOT" in rna_part
    assert "is 3.0 points above it under `transfer`, level with it (+0.0 points) under EOT" in rpt_part


def test_measured_compute_states_the_elapsed_time_when_drivers_overlapped():
    steps = {
        "sweep": {"seconds": 3600.0, "finished": "2026-12-02T11:00:00Z"},
        "eval/bn/table1": {"rc": 0, "seconds": 1200.0, "finished": "2026-12-02T10:50:00Z"},  # beside the sweep
    }
    text = report.measured_compute({"started": "2026-12-02T10:00:00Z", "steps": steps})
    assert "the sweep (four trainings) 60 min, the 1 finished evaluation steps 20 min, 80 min in all" in text
    assert "60 min from the start to the last finished step" in text
    steps["eval/bn/table1"]["finished"] = "2026-12-02T11:20:00Z"  # one after the other: no note
    assert "beside the training" not in report.measured_compute({"started": "2026-12-02T10:00:00Z", "steps": steps})


def _cell(trials: tuple[float, ...]) -> report.Cell:
    return report.Cell(mean=statistics.fmean(trials), trials=trials, n=1000, seconds=1.0)


def test_findings_name_an_eot_attack_stronger_than_the_attacked_path_instead_of_a_negative_share():
    below = {
        ("pgd20", "transfer"): _cell((22.5,)),
        ("pgd20", "fixed-path"): _cell((19.4,)),
        ("eot_pgd", "eot"): _cell((17.0,)),
    }
    text = " ".join(report.findings({"rna_eot": below}))
    assert "gap 3.1 points" in text and "below the attacked path itself" in text and "keeping" not in text


def test_trial_findings_pair_the_trials_and_state_the_spread_of_the_scoring_draws():
    rna = {
        ("pgd20", "transfer"): _cell((24.0, 26.0, 22.0)),
        ("pgd20", "fixed-path"): _cell((17.0, 18.0, 16.0)),
        ("eot_pgd", "eot"): _cell((20.0, 23.0, 22.5)),  # drops 4.0, 3.0, -0.5 (paired by trial)
        ("natural", "transfer"): _cell((32.0, 36.0, 34.0)),
    }
    bn = {("pgd20", "transfer"): _cell((22.6, 22.6, 22.6))}
    one = {"rna": {("eot_pgd", "eot"): _cell((19.5,))}}
    text = " ".join(report.trial_findings({"bn": bn, "rna": rna}, one))
    assert "Over Table 4's 3 trials" in text and "gap 7.0 points" in text and "EOT-PGD 21.8%" in text
    assert "it keeps 69% of the gap" in text  # (21.83 - 17) / (24 - 17)
    assert "below PGD-20 `transfer` in 2 of 3 trials, by 2.2 points on average (-0.5 to 4.0)" in text
    assert "below BN's PGD-20 (22.6%) in 2 of 3" in text
    assert (
        "from 32.0 to 36.0%" in text
        and f"correlation {statistics.correlation((32.0, 36.0, 34.0), (20.0, 23.0, 22.5)):.2f}" in text
    )
    assert "single evaluation (19.5%)" in text
    assert report.trial_findings({"bn": bn}, one) == []  # a deterministic arm alone: nothing to pair
    # published numbers beside ours, column by column
    pub = " ".join(report.published_findings({"rna": {("natural", "transfer"): _cell((32.0,))}}))
    assert "natural 32.0 against 84.3" in pub and "PGD-20" not in pub


def test_trials_of_a_cell_are_in_trial_order_whatever_the_row_order():
    rows = [
        {**_row("rna", "pgd20", "transfer", c, trial=t).__dict__, "_step": "stability"}
        for t, c in ((2, 30), (0, 10), (1, 20))
    ]
    assert report.cells(rows)[("pgd20", "transfer")].trials == (5.0, 10.0, 15.0)
