"""docs/reproduction.md from the experiment's result tables: nothing in it is typed by hand.

    python experiments/reproduction/report.py --base $RNA_BASE_DIR --out docs
        [--sizing experiments/reproduction/sizing.json]

Reads what experiments/reproduction/run.py left under the base folder: `reproduction/state.json`
(the steps, their commands, wall times and MLflow run ids, the sweep's trial runs) and every
evaluation's `results.parquet` and `path_analysis/`, and writes `reproduction.md` with its PNG
plots into `--out`. Whatever is missing (an arm still training, a step not yet run) is shown as
missing, with the experiment's state; it is never filled in.

The seed's published numbers beside ours are quoted from their sources in PUBLISHED.
"""

from __future__ import annotations

import argparse
import calendar
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.reproduction.run import CW_STEPS, EOT_ITER, PLAN  # noqa: E402
from pipelines.evaluation.plan import precision_tag  # noqa: E402

ARMS: tuple[tuple[str, str], ...] = (
    ("bn", "BN, PGD-AT"),
    ("rna", "RNA `bn,gns:1`, black-box AT"),
    ("rpt", "RPI+RPT, 4-16 bits"),
    ("rna_eot", "RNA `bn,gns:1`, EOT AT (new)"),
)
DETERMINISTIC = ("bn",)
TABLE1 = (
    ("Natural", "natural"),
    ("FGSM", "fgsm"),
    ("PGD-20", "pgd20"),
    ("CW", "cw_l2"),
    ("MI-FGSM", "mifgsm"),
    ("DeepFool", "deepfool"),
    ("AutoAttack", "autoattack"),
)
ADAPTIVE = (("EOT-PGD (eot)", "eot_pgd", "eot"), ("AutoAttack-rand (eot)", "autoattack_rand", "eot"))

# Published numbers of the seed (accuracy in %), with where they were read. Only what a source we
# could read states; a column no source gives stays empty.
PUBLISHED: dict[str, dict[str, Any]] = {
    "rna": {
        "label": "RNA, ResNet-18, CIFAR-10, 200 epochs (authors' release)",
        "values": {"natural": 84.32, "fgsm": 63.47, "pgd20": 60.94, "mifgsm": 61.49},
        "source": "the authors' MindSpore release of RNA, `mindspore-ai/models` `research/cv/RNA/README.md` "
        "(commit 1a392c0), table 'Result', CIFAR10 ResNet-18 (PyTorch code: UniSerj/Random-Norm-Aggregation, "
        "whose README gives no numbers)",
    },
}
RELATED = (
    "A sister method by the same author evaluated with the same protocol lost 18 points under EOT: "
    "60% PGD-20 against 42% EOT-PGD-20 (UniSerj/Random-Projection-Filters, issue #1)."
)
PAPER_SCALE = (
    "RNA_BASE_DIR=<shared folder> python experiments/reproduction/run.py --data-dir <CIFAR-10 Parquet folder> "
    "--ray-address '' --cw-steps 1000 --sweep-name reproduction_resnet18_paper "
    "--set sweep.name=reproduction_resnet18_paper --set model.name=resnet18 --set train.epochs=200 "
    "--set train.attack.steps=10 --set train.eot_iter=4 --set data.eval_limit=1000 --set ray.use_gpu=true "
    "--set ray.cpus_per_worker=4 --set ray.gpus_per_worker=1 --set sweep.max_concurrent_trials=4 "
    "--set sweep.trial_cpus=0.1"
)


@dataclass(frozen=True)
class Cell:
    """One (arm, attack, protocol): mean accuracy over trials (in %), and its trials."""

    mean: float
    trials: tuple[float, ...]
    n: int
    seconds: float
    precision: str = "fp32"  # the model's forward in the evaluation the cell comes from


BF16_TAG = precision_tag("bf16")  # what the evaluation job adds to a result row's method
BF16_MARK = "\u1d47"  # a superscript b after a number: its evaluation ran the model's forward in bf16


def row_precision(row: Mapping[str, Any]) -> str:
    return "bf16" if BF16_TAG in str(row.get("method", "")) else "fp32"


def read_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in paths:
        if p.is_file():
            rows += pq.read_table(p).to_pylist()
    return rows


def cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """(attack, protocol) -> Cell for one arm; a repeated evaluation keeps the one with more trials."""
    groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    sources: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        sources[(r["attack"], r["protocol"])][r.get("_step", "")][int(r["trial"])] = r
    for key, by_step in sources.items():
        # the step with the most trials (the stability step), then the most images (natural is in every step)
        groups[key] = max(by_step.values(), key=lambda t: (len(t), max(r["n"] for r in t.values())))
    out = {}
    for key, trials in groups.items():
        acc = tuple(100.0 * t["correct"] / t["n"] for _, t in sorted(trials.items()) if t["n"])  # trial order
        if acc:
            out[key] = Cell(
                statistics.fmean(acc),
                acc,
                int(max(t["n"] for t in trials.values())),
                sum(t["seconds"] for t in trials.values()),
                "bf16" if any(row_precision(t) == "bf16" for t in trials.values()) else "fp32",
            )
    return out


def first_trial_cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """(attack, protocol) -> the single-trial evaluation (Table 1 and 3), preferring non-stability steps."""
    plain = [r for r in rows if r.get("_trials", 1) == 1]
    return cells(plain or rows)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def lookup_cell(c: Mapping[tuple[str, str], Cell], arm: str, attack: str, protocol: str) -> Cell | None:
    """A cell; a deterministic model's fixed-path and eot are its transfer cells (same computation)."""
    if (attack, protocol) in c:
        return c[(attack, protocol)]
    if arm in DETERMINISTIC and protocol in ("fixed-path", "eot"):
        if protocol == "eot" and attack == "eot_pgd":
            return c.get(("pgd20", "transfer"))  # EOT over identical forwards is PGD-20
        if protocol == "eot" and attack == "autoattack_rand":
            return None  # not the same algorithm: left empty
        return c.get((attack, "transfer"))
    return None


def lookup(c: Mapping[tuple[str, str], Cell], arm: str, attack: str, protocol: str) -> float | None:
    """A cell's mean (see lookup_cell)."""
    cell = lookup_cell(c, arm, attack, protocol)
    return None if cell is None else cell.mean


def fmt_cell(c: Mapping[tuple[str, str], Cell], arm: str, attack: str, protocol: str) -> str:
    """A table cell: the mean, marked when its evaluation ran the forward in bf16."""
    cell = lookup_cell(c, arm, attack, protocol)
    return fmt(None if cell is None else cell.mean) + (BF16_MARK if cell and cell.precision == "bf16" else "")


def first_trial_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(attack, protocol) -> (correct, n) of trial 0 of the multi-trial (stability) steps."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for r in rows:
        if r.get("_trials", 1) > 1 and int(r["trial"]) == 0:
            c, n = out.get((r["attack"], r["protocol"]), (0, 0))
            out[(r["attack"], r["protocol"])] = (c + int(r["correct"]), n + int(r["n"]))
    return out


def precision_check(
    c1: Mapping[str, Mapping[tuple[str, str], Cell]], per_arm: Mapping[str, list[dict[str, Any]]]
) -> list[list[str]]:
    """Rows of fp32 (single-trial step) against bf16 (Table 4's trial 0, the same seeds: same images,
    paths and random starts) for every (arm, attack, protocol) both have."""
    rows = []
    for arm, label in ARMS:
        trial0 = first_trial_rows(per_arm.get(arm, []))
        stab_bf16 = {row_precision(r) for r in per_arm.get(arm, []) if r.get("_trials", 1) > 1} == {"bf16"}
        for (attack, protocol), (correct, n) in sorted(trial0.items()):
            cell = c1.get(arm, {}).get((attack, protocol))
            if not stab_bf16 or cell is None or cell.precision != "fp32" or cell.n != n or not n:
                continue
            b = 100.0 * correct / n
            rows.append([label, f"{attack} / {protocol}", str(n), fmt(cell.mean), fmt(b), f"{b - cell.mean:+.1f}"])
    return rows


def bf16_planned(state: Mapping[str, Any]) -> bool:
    """Whether the driver ran the plan's bf16 steps in bf16 (run.py `--bf16-steps`; older states: yes)."""
    return bool(state.get("bf16_steps", {}).get("bf16", True))


def bf16_reason(state: Mapping[str, Any]) -> str:
    return str(state.get("bf16_steps", {}).get("reason", "run.py --bf16-steps"))


def precision_caption(state: Mapping[str, Any]) -> str:
    """Which cells ran the forward in bf16: the plan's costly steps where the driver turned them on."""
    if not bf16_planned(state):
        return f"Every cell is fp32 ({bf16_reason(state)})."
    return (
        f"{BF16_MARK}: that evaluation ran the model's forward in bf16 (`--forward-precision bf16`: the repeated, "
        "costly steps, "
        + ", ".join(s.name for s in PLAN if s.precision != "fp32")
        + "; see 'bf16 against fp32' below); every other cell is fp32."
    )


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def load_experiment(base: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The driver's state and, per arm, its result rows (each tagged with its step and trial count)."""
    state_file = base / "reproduction" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"steps": {}}
    per_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, step in sorted(state.get("steps", {}).items()):
        if not key.startswith("eval/") or not step.get("out_dir"):
            continue
        rows = read_rows([Path(step["out_dir"]) / "results.parquet"])
        trials = max((int(r["trial"]) for r in rows), default=0) + 1
        for r in rows:
            r["_step"], r["_trials"] = step["step"], trials
        per_arm[step["arm"]] += rows
    return state, per_arm


def live_trials(base: Path, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sweep's trial runs as MLflow has them now (while the sweep runs, state.json has none yet)."""
    if not (base / "ray_results").is_dir():
        return {}
    from experiments.reproduction.run import trial_runs

    try:
        return trial_runs(base, state.get("sweep_name", "reproduction_cpu"))
    except Exception:  # noqa: BLE001 - the store is being written: show no trials rather than fail
        return {}


def plot_gap(per_arm_cells: Mapping[str, Mapping[tuple[str, str], Cell]], out: Path) -> list[str]:
    """Two PNGs: the transfer gap per attack, and PGD-20 under transfer / eot / fixed-path per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    arms = [a for a, _ in ARMS if a not in DETERMINISTIC and a in per_arm_cells]
    attacks = [(label, a) for label, a in TABLE1 if a != "natural"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        c = per_arm_cells[arm]
        gaps = [
            (c[(a, "transfer")].mean - c[(a, "fixed-path")].mean)
            if (a, "transfer") in c and (a, "fixed-path") in c
            else float("nan")
            for _, a in attacks
        ]
        ax.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(attacks))], gaps, width, label=arm)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(attacks)), [label for label, _ in attacks])
    ax.set_ylabel("transfer - fixed-path (points)")
    ax.set_title("Transfer gap: what attacking another path than the scored one buys")
    files.append(_finish(fig, ax, out / "reproduction_transfer_gap.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4))
    series = (
        ("transfer (PGD-20)", "pgd20", "transfer"),
        ("eot (EOT-PGD)", "eot_pgd", "eot"),
        ("fixed-path (PGD-20)", "pgd20", "fixed-path"),
    )
    all_arms = [a for a, _ in ARMS if a in per_arm_cells]
    width = 0.8 / len(series)
    for i, (label, attack, protocol) in enumerate(series):
        vals = [lookup(per_arm_cells[a], a, attack, protocol) for a in all_arms]
        ax.bar(
            [j + (i - 1) * width for j in range(len(all_arms))],
            [float("nan") if v is None else v for v in vals],
            width,
            label=label,
        )
    ax.set_xticks(range(len(all_arms)), all_arms)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("What EOT keeps of the transfer gap (PGD-20, eps 8/255)")
    files.append(_finish(fig, ax, out / "reproduction_eot_keeps.png"))
    return files


def _finish(fig: Any, ax: Any, path: Path) -> str:
    """Legend, grid, layout; write the PNG and close the figure; the file's name."""
    import matplotlib.pyplot as plt

    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)  # below: never over a bar
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


MEANINGFUL_GAP = 2.0  # points: ~1.3 binomial standard errors at 1,000 images and 30-50% accuracy (1.4-1.6 points)


def eot_keeps(c: Mapping[tuple[str, str], Cell]) -> float | None:
    """The share of the PGD-20 transfer gap that is left under EOT-PGD: (eot - fixed) / (transfer - fixed)."""
    try:
        t, f, e = c[("pgd20", "transfer")].mean, c[("pgd20", "fixed-path")].mean, c[("eot_pgd", "eot")].mean
    except KeyError:
        return None
    return None if abs(t - f) < 1e-9 else 100.0 * (e - f) / (t - f)


def kept_share(c: Mapping[tuple[str, str], Cell]) -> float | None:
    """What EOT keeps of the gap (eot_keeps), or None where the gap is within the noise of one evaluation."""
    keeps = eot_keeps(c)
    t, f = c[("pgd20", "transfer")].mean, c[("pgd20", "fixed-path")].mean
    return None if keeps is None or abs(t - f) < MEANINGFUL_GAP else keeps


def versus(ours: float, baseline: float) -> str:
    """Where a number stands against a baseline, saying 'level with' inside the noise of one evaluation."""
    d = ours - baseline
    if abs(d) < MEANINGFUL_GAP:
        return f"level with it ({d:+.1f} points)"
    return f"{fmt(abs(d))} points {'above' if d > 0 else 'below'} it"


def findings(per_arm_cells: Mapping[str, Mapping[tuple[str, str], Cell]]) -> list[str]:
    """Sentences that state what the numbers show (each number comes from the tables above)."""
    out = []
    bn = per_arm_cells.get("bn", {})
    for arm, label in ARMS:
        c = per_arm_cells.get(arm)
        if not c or arm in DETERMINISTIC:
            continue
        t = c.get(("pgd20", "transfer"))
        f = c.get(("pgd20", "fixed-path"))
        e = c.get(("eot_pgd", "eot"))
        if t and f:
            s = (
                f"{label}: PGD-20 {fmt(t.mean)}% under `transfer` against {fmt(f.mean)}% on the attacked path "
                f"(gap {fmt(t.mean - f.mean)} points)"
            )
            if e:
                keeps = kept_share(c)
                s += f"; EOT-PGD brings it to {fmt(e.mean)}%" + (
                    " (a gap within the noise of one evaluation: nothing for EOT to keep)"
                    if keeps is None
                    else ", below the attacked path itself: averaging the gradient over path draws is a stronger "
                    "attack than the gradient of the scoring path alone, and none of the gap is left"
                    if keeps < 0
                    else f", keeping {fmt(keeps, 0)}% of the gap"
                )
            if ("pgd20", "transfer") in bn:
                b = bn[("pgd20", "transfer")].mean
                s += f". Plain BN PGD-AT: {fmt(b)}% (this arm is {versus(t.mean, b)} under `transfer`"
                if e:
                    s += f", {versus(e.mean, b)} under EOT"
                s += ")"
            out.append(s + ".")
    return out


def early_stop_findings(c1: Mapping[str, Mapping[tuple[str, str], Cell]]) -> list[str]:
    """Table 3 against Table 1: how much Double-Win Quant's early-stop PGD-20 gives above `transfer`."""
    pairs = []
    for arm, label in ARMS:
        c = c1.get(arm, {})
        es, t = c.get(("pgd20", "early-stop")), c.get(("pgd20", "transfer"))
        if es and t:
            pairs.append(f"{label} {fmt(es.mean)}% against {fmt(t.mean)}% ({es.mean - t.mean:+.1f} points)")
    if not pairs:
        return []
    return [
        "Early-stop PGD-20 (Table 3: an example is no longer perturbed once the attacked path misclassifies "
        f"it; a fresh path scores) against PGD-20 `transfer`: {'; '.join(pairs)}."
    ]


def trial_findings(
    stab: Mapping[str, Mapping[tuple[str, str], Cell]], c1: Mapping[str, Mapping[tuple[str, str], Cell]]
) -> list[str]:
    """What Table 4's trials say about the gap: its means, the per-trial (paired) drop under EOT-PGD, and
    how far one evaluation's numbers move with the scoring path draws."""
    out = []
    bn = stab.get("bn", {}).get(("pgd20", "transfer"))
    for arm, label in ARMS:
        c = stab.get(arm, {})
        t, f, e = c.get(("pgd20", "transfer")), c.get(("pgd20", "fixed-path")), c.get(("eot_pgd", "eot"))
        if arm in DETERMINISTIC or not (t and f and e) or not len(t.trials) == len(e.trials) > 1:
            continue
        n = len(t.trials)
        drops = [a - b for a, b in zip(t.trials, e.trials)]  # the same trial: same images, same seed
        s = (
            f"Over Table 4's {n} trials, {label}: PGD-20 {fmt(t.mean)}% under `transfer`, {fmt(f.mean)}% on the "
            f"attacked path (gap {fmt(t.mean - f.mean)} points), EOT-PGD {fmt(e.mean)}%"
        )
        keeps = kept_share(c)
        if keeps is not None:
            s += " (below the attacked path itself)" if keeps < 0 else f" (it keeps {fmt(keeps, 0)}% of the gap)"
        s += (
            f"; EOT-PGD is below PGD-20 `transfer` in {sum(d > 0 for d in drops)} of {n} trials, by "
            f"{fmt(statistics.fmean(drops))} points on average ({fmt(min(drops))} to {fmt(max(drops))})"
        )
        if bn:
            s += f", and below BN's PGD-20 ({fmt(bn.mean)}%) in {sum(x < bn.mean for x in e.trials)} of {n}"
        nat = c.get(("natural", "transfer"))
        if nat and len(nat.trials) == n:
            s += (
                f". Natural accuracy moves from {fmt(min(nat.trials))} to {fmt(max(nat.trials))}% between trials "
                "(the scoring path draws alone, one per batch)"
            )
            if statistics.pstdev(nat.trials) > 0 and statistics.pstdev(e.trials) > 0:
                s += f" and EOT-PGD moves with it (correlation {statistics.correlation(nat.trials, e.trials):.2f})"
        one = c1.get(arm, {}).get(("eot_pgd", "eot"))
        if one:
            s += f"; Table 1's single evaluation ({fmt(one.mean)}%) is one such draw"
        out.append(s + ".")
    return out


def published_findings(c1: Mapping[str, Mapping[tuple[str, str], Cell]]) -> list[str]:
    """Our numbers beside the published ones, column by column."""
    out = []
    for arm, pub in PUBLISHED.items():
        c = c1.get(arm, {})
        pairs = [
            f"{name} {fmt(c[(k, 'transfer')].mean)} against {fmt(pub['values'][k])}"
            for name, k in (("natural", "natural"), ("FGSM", "fgsm"), ("PGD-20", "pgd20"), ("MI-FGSM", "mifgsm"))
            if k in pub["values"] and (k, "transfer") in c
        ]
        if pairs:
            out.append(
                f"Against the published {pub['label']} under the same `transfer` protocol, ours: "
                + ", ".join(pairs)
                + " (%)."
            )
    return out


def driver_alive(base: Path) -> bool:
    """Whether the process group `launch.sh` recorded last in `<base>/pids` is still running."""
    try:
        pgid = int((base / "pids").read_text().split()[-1])
        os.killpg(pgid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def measured_compute(state: Mapping[str, Any]) -> str:
    """What the run itself took (wall time recorded by the driver), to set beside the estimate: the
    estimate was made on a loaded machine, so the measured time says how much larger a rerun can be."""
    steps = state.get("steps", {})
    train = float(steps.get("sweep", {}).get("seconds") or 0.0) / 60
    evals = [s for k, s in steps.items() if k.startswith("eval/") and s.get("rc") == 0]
    evaluated = sum(float(s.get("seconds") or 0.0) for s in evals) / 60
    text = (
        f"Measured on this machine (wall time, other work beside it at times): the sweep (four trainings) "
        f"{fmt(train, 0)} min, the {len(evals)} finished evaluation steps {fmt(evaluated, 0)} min, "
        f"{fmt(train + evaluated, 0)} min in all, against the 150-minute budget."
    )
    elapsed = elapsed_minutes(state)
    if elapsed is not None and elapsed < train + evaluated - 1:  # drivers ran side by side
        text += (
            f" Evaluations of finished arms ran beside the training and beside each other, sharing the two "
            f"cores, so the sum exceeds the elapsed time: {fmt(elapsed, 0)} min from the start to the last "
            "finished step."
        )
    return text


def elapsed_minutes(state: Mapping[str, Any]) -> float | None:
    """Minutes from the experiment's start to its last finished step (None before any step finished)."""

    def parse(stamp: str) -> float:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))

    ends = [s["finished"] for s in state.get("steps", {}).values() if s.get("finished")]
    if not ends or not state.get("started"):
        return None
    return (max(parse(e) for e in ends) - parse(state["started"])) / 60


def render(base: Path, out: Path, sizing: dict[str, Any] | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    state, per_arm = load_experiment(base)
    trials = state.get("trials") or live_trials(base, state)
    c1 = {arm: first_trial_cells(rows) for arm, rows in per_arm.items()}
    stab = {arm: cells([r for r in rows if r["_trials"] > 1]) for arm, rows in per_arm.items()}
    finished_arms = [a for a, _ in ARMS if trials.get(a, {}).get("status") == "FINISHED"]
    evaluated = {
        k.split("/")[1] for k, s in state.get("steps", {}).items() if k.startswith("eval/") and s.get("rc") == 0
    }
    done = bool(state.get("finished"))

    L = ["# Reproduction: the seed's tables at CPU scale, with the adaptive columns", ""]
    L += [
        "Generated by `experiments/reproduction/report.py` from the experiment's result tables "
        f"(base folder `{base}`); no number below is typed by hand. Accuracies in % on the held-out "
        "CIFAR-10 test rows (the offline JPEG copy: comparisons are within this project).",
        "",
        "## State of the experiment",
        "",
    ]
    caps = state.get("caps") or {}
    if caps.get("limit") or caps.get("trials"):
        L += [f"**Dry run**: evaluation sizes capped ({caps}); these numbers are not the experiment's.", ""]
    if not state.get("steps"):
        L += ["**Not started**: no `reproduction/state.json` under the base folder yet.", ""]
    else:
        L += [
            (
                "**Finished.**"
                if done
                else "**Experiment in progress**: the tables hold what has finished; missing cells are `-`."
                if driver_alive(base)
                else "**Experiment stopped before the end** (its driver is not running): the tables hold what "
                "had finished; missing cells are `-`; `launch.sh` resumes it."
            )
            + f" Started {state.get('started', '-')}"
            + (f", finished {state['finished']}." if done else "."),
            "",
        ]
        rows = []
        for arm, label in ARMS:
            t = trials.get(arm, {})
            steps = [s for k, s in state["steps"].items() if k.startswith(f"eval/{arm}/")]
            ok = [s["step"] for s in steps if s.get("rc") == 0]
            rows.append(
                [
                    label,
                    t.get("status", "not started"),
                    fmt(t.get("epochs_done"), 0),
                    ", ".join(ok) or "-",
                    fmt((t.get("seconds") or 0) / 60 if t.get("seconds") else None),
                ]
            )
        sweep_step = state["steps"].get("sweep", {})
        if sweep_step and sweep_step.get("rc") is None:
            L += [
                "The sweep (the four trainings, one after another) is running since "
                f"{sweep_step.get('running_since')}.",
                "",
            ]
        elif sweep_step.get("rc"):
            L += [f"The sweep's last attempt exited {sweep_step['rc']}; running the driver again resumes it.", ""]
        L += md_table(["arm", "training run", "epochs done", "evaluations finished", "training wall time (min)"], rows)
        L += [
            "",
            f"Arms with a finished training: {', '.join(finished_arms) or 'none'}; "
            f"evaluated: {', '.join(sorted(evaluated)) or 'none'}.",
            "",
        ]

    L += ["## Table 1: the paper's attacks under `transfer`, the white-box bound and the adaptive columns", ""]
    header = ["arm", "protocol"] + [label for label, _ in TABLE1] + [label for label, _, _ in ADAPTIVE]
    rows = []
    for arm, label in ARMS:
        c = c1.get(arm, {})
        for protocol in ("transfer", "fixed-path"):
            cells_ = [fmt_cell(c, arm, a, protocol) for _, a in TABLE1]
            adaptive = [fmt_cell(c, arm, a, p) for _, a, p in ADAPTIVE] if protocol == "transfer" else ["", ""]
            rows.append([label, protocol, *cells_, *adaptive])
    for pub in PUBLISHED.values():
        rows.append([f"published: {pub['label']}", "transfer", *[fmt(pub["values"].get(a)) for _, a in TABLE1], "", ""])
    L += md_table(header, rows)
    L += [
        "",
        "`transfer`: one path per batch fixed for the whole attack, a fresh path scores (the paper's protocol). "
        "`fixed-path`: the attacked path scores (white-box bound). EOT-PGD: PGD-20 whose every gradient averages "
        f"{EOT_ITER} fresh path draws; AutoAttack-rand: APGD-CE and APGD-DLR with EOT over 20 draws, under `eot`. "
        f"CW is CW-L2 with the paper's c=1e-4 and {CW_STEPS} Adam steps (the paper: 1,000; "
        f"`acc_cw_l2_steps{CW_STEPS}_*`). Test images per step: "
        + ", ".join(f"{s.name} {s.limit}" for s in PLAN)
        + ". "
        "BN has no random layer: its fixed-path and eot cells are its transfer numbers (the same computation; "
        "EOT over identical forwards is PGD-20), and AutoAttack-rand is not run on it. " + precision_caption(state),
        "",
        f"Published: {'; '.join(p['source'] for p in PUBLISHED.values())}. {RELATED}",
        "",
    ]

    L += ["## Table 3: early-stop PGD-20 (Double-Win Quant's evaluation) beside the other protocols", ""]
    rows = []
    for arm, label in ARMS:
        c = c1.get(arm, {})
        rows.append(
            [label]
            + [
                fmt_cell(c, arm, a, p)
                for a, p in (
                    ("pgd20", "early-stop"),
                    ("pgd20", "transfer"),
                    ("pgd20", "fixed-path"),
                    ("eot_pgd", "eot"),
                    ("autoattack_rand", "eot"),
                )
            ]
        )
    header = ["arm", "PGD-20 early-stop", "PGD-20 transfer", "PGD-20 fixed-path", "EOT-PGD eot", "AutoAttack-rand eot"]
    L += md_table(header, rows)
    L += ["", "The last four columns are Table 1's cells (the same evaluations), here beside early-stop.", ""]

    L += ["## Table 4: stability over 10 trials (mean, std, min, max)", ""]
    rows = []
    for arm, label in ARMS:
        c = stab.get(arm, {})
        for attack, protocol in (
            ("natural", "transfer"),
            ("pgd20", "transfer"),
            ("pgd20", "fixed-path"),
            ("eot_pgd", "eot"),
        ):
            cell = lookup_cell(c, arm, attack, protocol)  # BN: its transfer trials (the same computation)
            if cell is None:
                rows.append([label, f"{attack} / {protocol}", "-", "-", "-", "-", "-", "-"])
                continue
            sd = statistics.pstdev(cell.trials) if len(cell.trials) > 1 else 0.0
            rows.append(
                [
                    label,
                    f"{attack} / {protocol}",
                    str(len(cell.trials)),
                    cell.precision,
                    fmt(cell.mean, 2),
                    fmt(sd, 2),
                    fmt(min(cell.trials), 2),
                    fmt(max(cell.trials), 2),
                ]
            )
    L += md_table(["arm", "attack / protocol", "trials", "forward", "mean", "std", "min", "max"], rows)
    L += [
        "",
        "Each trial draws new paths (one per batch) and new random starts. BN has no random layer: its "
        "fixed-path and eot rows are its transfer trials (the same computation), as in Table 1.",
        "",
    ]

    L += ["## bf16 against fp32 on these checkpoints", ""]
    check = precision_check(c1, per_arm)
    if check:
        worst = max(abs(float(r[-1])) for r in check)
        L += [
            "Table 4's first trial (forward in bf16) has the seeds of the single-trial fp32 steps: the same test "
            "images, the same paths and the same random starts, so each row below is one computation in two "
            f"precisions. Largest difference: {worst:.1f} points.",
            "",
        ]
        L += md_table(["arm", "attack / protocol", "images", "fp32", "bf16 (trial 0)", "bf16 - fp32"], check)
    elif not bf16_planned(state):
        L += [
            f"Every step of this run ran the model's forward in fp32 ({bf16_reason(state)}), so there is no pair "
            "to compare; docs/benchmarks.md section 7 compares the two precisions on a CPU with a bf16 fast path."
        ]
    else:
        L += ["(no pair of an fp32 step and a bf16 Table 4 trial yet)"]
    L += [""]

    L += ["## Plots", ""]
    if any(("pgd20", "fixed-path") in c for c in c1.values()):
        for f in plot_gap(c1, out):
            L += [f"![{f}]({f})", ""]
    else:
        L += ["(no fixed-path results yet: the transfer-gap plots appear when they exist)", ""]
    for arm, _ in ARMS:
        step = state.get("steps", {}).get(f"eval/{arm}/table1", {})
        pa_dir = Path(step.get("out_dir", "/nonexistent")) / "path_analysis"
        for png in sorted(pa_dir.glob("*.png")) if pa_dir.is_dir() else []:
            name = f"reproduction_{arm}_{png.name}"
            shutil.copyfile(png, out / name)
            L += [f"Path analysis, {arm}: `{png.stem}`", "", f"![{name}]({name})", ""]

    L += ["## Findings", ""]
    found = findings(c1)
    L += [" ".join(found) if found else "No finished evaluation of a random arm yet.", ""]
    found = early_stop_findings(c1) + trial_findings(stab, c1)
    if found:
        L += [" ".join(found), ""]
    L += [
        " ".join(published_findings(c1))
        + " Where our numbers and the seed's differ, the checked differences are the scale (the model, the "
        "training images, PGD steps and epochs below, against ResNet-18 / 200 epochs / PGD-10), the data "
        "(CIFAR-10 re-encoded as JPEG), and the evaluation slice; the protocols follow the official code "
        "(README, 'Where we still differ').",
        "",
    ]

    L += ["## How it was sized and run", ""]
    if sizing:
        L += [sizing.get("choice", ""), ""]
        rows = [
            [
                r["case"],
                fmt(r["measured_s"], 2),
                fmt(r["reference_s"], 2),
                fmt(r["idle_estimate_s"], 2),
                fmt(r["idle_ms_per_image"], 3),
            ]
            for r in sizing.get("results", [])
        ]
        if rows:
            L += md_table(["case", "measured (s)", "reference (s)", "idle estimate (s)", "idle ms / image"], rows)
            L += [
                "",
                f"Command: `{sizing.get('command', '')}`; load average {sizing.get('load_before')} before, "
                f"{sizing.get('load_after')} after.",
                "",
            ]
        est = sizing.get("estimates", [])
        if est:
            L += [
                "Estimated compute on the idle machine for the whole experiment (the four trainings at the measured "
                "step costs, full training set; the evaluation plan of `experiments/reproduction/run.py` per model, "
                "from the measured PGD-20 cost per image and the pass counts below):",
                "",
            ]
            L += md_table(
                ["architecture", "training images", "epochs", "trainings (min)", "evaluations (min)", "total (min)"],
                [
                    [e["arch"], str(e["train_images"]), str(e["epochs"])]
                    + [fmt(e[k], 0) for k in ("train_min", "eval_min", "total_min")]
                    for e in est
                ],
            )
            a = sizing.get("assumptions", {})
            if a:
                L += [
                    "",
                    "Pass counts per attacked image (forward-backward passes, PGD step = 1), assumed where not timed: "
                    + ", ".join(f"{k} {v:g}" for k, v in a.get("passes", {}).items())
                    + f"; AutoAttack's later sub-attacks on the {a.get('robust')} of images still robust, "
                    f"{a.get('clean')} correctly classified.",
                    "",
                ]
    sweep = state.get("steps", {}).get("sweep", {})
    L += [measured_compute(state), ""]
    L += ["Commands (with `RNA_BASE_DIR` set to the base folder):", "", "```bash"]
    L += [state.get("driver_command", "python experiments/reproduction/run.py --data-dir <CIFAR-10 Parquet folder>")]
    if sweep:
        L += [sweep["command"]]
    L += [
        "```",
        "",
        "At paper scale on a GPU cluster (ResNet-18, the full training set, 200 epochs, PGD-10, EOT training over "
        "4 draws, CW-L2 with the paper's 1,000 steps; four trials side by side, one GPU each; the same evaluation "
        "plan):",
        "",
        "```bash",
        PAPER_SCALE,
        "```",
        "",
    ]

    L += ["## Runs", ""]
    rows = []
    parent = next((t.get("parent_run_id") for t in trials.values() if t.get("parent_run_id")), None)
    if parent:
        rows.append(
            ["sweep (parent)", "-", parent, fmt(sweep.get("seconds", 0) / 60 if sweep.get("seconds") else None)]
        )
    for arm, _ in ARMS:
        t = trials.get(arm)
        if t:
            rows.append(
                [
                    f"train {arm}",
                    t.get("status", "-"),
                    t["run_id"],
                    fmt(t["seconds"] / 60 if t.get("seconds") else None),
                ]
            )
    for key, s in sorted(state.get("steps", {}).items()):
        if key.startswith("eval/"):
            rows.append(
                [
                    key[5:],
                    "done" if s.get("rc") == 0 else f"exit {s.get('rc')}",
                    s.get("mlflow_run_id") or "-",
                    fmt(s.get("seconds", 0) / 60),
                ]
            )
    L += md_table(["run", "status", "MLflow run id", "wall time (min)"], rows) if rows else ["(no runs yet)"]
    L += [""]
    text = "\n".join(L) + "\n"
    (out / "reproduction.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the experiment's RNA_BASE_DIR")
    p.add_argument("--out", required=True, help="folder for reproduction.md and its PNGs (e.g. docs)")
    p.add_argument("--sizing", default=str(Path(__file__).with_name("sizing.json")))
    args = p.parse_args(argv)
    sizing = json.loads(Path(args.sizing).read_text()) if Path(args.sizing).is_file() else None
    render(Path(args.base), Path(args.out), sizing)
    print(f"wrote {Path(args.out) / 'reproduction.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
