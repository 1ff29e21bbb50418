"""The summary a finished sweep logs on its parent run: a trials table, a leaderboard, three plots.

`summary/trials.parquet` (one row per trial: swept values, seed, random-space size, status,
metrics), `summary/leaderboard.md` (ranked by `sweep.metric`) and three plots: the metric against
the random-space size (one series per sampling strategy), per sampling strategy, and every
accuracy per trial. The accuracies are the ones MLflow's compare view shows for the child runs,
under the same names: the held-out slice's last `clean_acc` and `pgd<k>_acc` and the final
`acc_*`.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from rna_core.builders import model_structure  # noqa: E402
from rna_core.config import Config  # noqa: E402
from rna_core.evaluation import epoch_measures, final_metric_names  # noqa: E402
from rna_core.norms import parse_space  # noqa: E402
from rna_core.paths import count_paths  # noqa: E402
from rna_core.sweep_config import SweepConfig  # noqa: E402

from .. import mlflow_ui, tracking  # noqa: E402
from ..run_folder import is_uri, join  # noqa: E402
from .spec import arm_params, plain, trial_config  # noqa: E402

SUMMARY_DIR = "summary"
HELD_OUT_RE = re.compile(r"clean_acc|pgd\d+_acc")  # rna_core.evaluation.epoch_measures' names
STATUSES = ("completed", "early_stopped", "error", "incomplete")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def accuracy_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every accuracy the trial rows hold, named as the runs log them: the held-out slice's
    `clean_acc` and `pgd<k>_acc` (last epoch), then the final `acc_*`."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    held_out = sorted((k for k in keys if HELD_OUT_RE.fullmatch(k)), key=lambda k: k != "clean_acc")
    return [*held_out, *final_columns(rows)]


def final_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The final-metric columns (`acc_*`, named by each trial's settings), in first-seen order."""
    seen: list[str] = []
    for r in rows:
        seen += [k for k in r if k.startswith("acc_") and k not in seen]
    return seen


def trial_rows(
    grid: Any, spec: SweepConfig, base: Config, statuses: Mapping[str, str], run_ids: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One row per trial: its swept values, seed, random-space size, status and metrics, ranked."""
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = str(m.get("trial_id") or Path(str(result.path)).name)
        params = {k: plain(v) for k, v in ((result.config or {}).get("params") or {}).items()}
        arm = (result.config or {}).get("arm")
        cfg = trial_config(base, arm_params(spec, arm, params))
        row: dict[str, Any] = {"trial_id": trial_id, "mlflow_run_id": run_ids.get(trial_id, "")}
        if spec.arms:
            row["arm"] = arm
        row.update({d.key: params.get(d.key) for d in spec.space})
        best = None
        df = result.metrics_dataframe
        if df is not None and spec.metric in getattr(df, "columns", []):
            series = df[spec.metric].dropna()
            if len(series):
                best = float(series.max() if spec.mode == "max" else series.min())
        finals = list(final_metric_names(cfg.train).values())
        held_out = [mm.name for mm in epoch_measures(cfg.train)]  # clean_acc, pgd<k>_acc: the last epoch's
        row.update(
            {
                "status": statuses.get(trial_id, "error" if result.error else "incomplete"),
                "norm": cfg.model.norm,
                "space_size": len(parse_space(cfg.model.norm)),
                "num_paths": float(count_paths(model_structure(cfg))),
                "sampling": cfg.train.sampling,
                "train_mode": cfg.train.mode,
                "seed": cfg.train.seed,
                "epochs_done": int(m.get("epochs_done", m.get("epoch", 0)) or 0),
                spec.metric: _num(m.get(spec.metric)),
                f"best_{spec.metric}": best,
                **{n: _num(m.get(n)) for n in held_out if n != spec.metric},
                **{c: _num(m.get(c)) for c in finals},
                "seconds": _num(m.get("time_total_s")),
            }
        )
        rows.append(row)
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0), r["trial_id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _column(values: list[Any]) -> list[Any]:
    """Parquet wants one type per column: numbers stay numbers, anything mixed becomes text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return values
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return [None if v is None else float(v) for v in values]
    if present and all(isinstance(v, bool) for v in present):
        return values
    return [None if v is None else str(v) for v in values]


def write_trials_table(rows: list[dict[str, Any]], path: str) -> None:
    keys = list(rows[0]) if rows else ["trial_id"]
    keys += [k for k in final_columns(rows) if k not in keys]
    table = pa.table({k: _column([r.get(k) for r in rows]) for k in keys})
    pq.write_table(table, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def render_leaderboard(
    rows: list[dict[str, Any]],
    spec: SweepConfig,
    name: str,
    parent_run_id: str,
    base: Config | None = None,
    compare: str | None = None,
) -> str:
    """The Markdown leaderboard logged on the parent run (`compare`: the trials in MLflow's compare view)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    accuracies = [c for c in accuracy_columns(rows) if c != spec.metric]
    cols = [
        "rank",
        "trial_id",
        *(["arm"] if spec.arms else []),
        *(d.key for d in spec.space),
        "seed",
        "space_size",
        spec.metric,
        f"best_{spec.metric}",
        *accuracies,
        "epochs_done",
        "status",
        "mlflow_run_id",
    ]
    held_out = base is not None and spec.metric in {m.name for m in epoch_measures(base.train)}
    lines = [
        f"# Sweep `{name}`: leaderboard",
        "",
        f"Ranked by `{spec.metric}` ({spec.mode}; its last reported "
        f"epoch{', on the held-out slice' if held_out else ''}). "
        f"{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early by ASHA, "
        f"{counts['error']} failed, {counts['incomplete']} incomplete. Search: {spec.search}, "
        f"scheduler: {spec.scheduler}, MLflow parent run `{parent_run_id}`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += [
        "",
        "`clean_acc`, `pgd<k>_acc`: the held-out slice at the last epoch; `acc_*`: the held-out slice after the "
        "last epoch, named and computed as `jobs/evaluate.py` does (natural and PGD under transfer; EOT-PGD "
        "under eot). The child runs log them under the same names. `space_size`: candidate normalizations per "
        "layer.",
    ]
    if compare:
        lines += ["", f"Side by side in the MLflow UI (`mlflow ui` running): {compare}"]
    return "\n".join(lines) + "\n"


def plot_accuracies(rows: list[dict[str, Any]], out_path: str) -> str:
    """Every accuracy of every trial (accuracy_columns), grouped per trial: the compare view's numbers."""
    cols = accuracy_columns(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4))
    width = 0.8 / max(1, len(cols))
    for j, c in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r.get(c) or 0.0 for r in rows], width, label=c)
    labels = [
        " ".join(str(r.get(k)) for k in r if k.startswith(("model.", "train.", "data."))) or r["trial_id"] for r in rows
    ]
    ax.set_xticks(range(len(rows)), labels, rotation=15)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("accuracies per trial (held-out slice)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_summary(rows: list[dict[str, Any]], metric: str, out_dir: str) -> list[str]:
    """Three PNGs: the metric against the random-space size (one series per strategy), per strategy,
    and every accuracy per trial."""
    scored = [r for r in rows if r.get(metric) is not None]
    strategies = sorted({r["sampling"] for r in scored}) or ["-"]
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(strategies):
        pts = [r for r in scored if r["sampling"] == s]
        xs = [r["space_size"] + (i - (len(strategies) - 1) / 2) * 0.06 for r in pts]
        dots = ax.scatter(xs, [r[metric] for r in pts], label=s, alpha=0.8)
        sizes = sorted({r["space_size"] for r in pts})
        means = [
            sum(r[metric] for r in pts if r["space_size"] == k) / sum(r["space_size"] == k for r in pts) for k in sizes
        ]
        ax.plot(sizes, means, alpha=0.6, color=dots.get_facecolor()[0])  # the strategy's mean per size
    ax.set_xlabel("random-space size (candidate norms per layer)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs random-space size")
    ax.set_xticks(sorted({r["space_size"] for r in scored}) or [1])
    ax.legend(title="sampling")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(Path(out_dir) / "robust_acc_vs_space_size.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(strategies):
        vals = [r[metric] for r in scored if r["sampling"] == s]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5 if vals else 0.0
        ax.bar(i, mean, yerr=std, alpha=0.5, capsize=4)
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_xlabel("sampling strategy")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per sampling strategy (mean, std, trials)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    files.append(str(Path(out_dir) / "robust_acc_by_strategy.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    files.append(plot_accuracies(rows, str(Path(out_dir) / "accuracies_by_trial.png")))
    return files


def write_summary(
    client: Any,
    sweep_dir: str,
    name: str,
    spec: SweepConfig,
    base: Config,
    parent: tracking.RunRef,
    rows: list[dict[str, Any]],
) -> tuple[str, str]:
    """Write the summary into `<sweep dir>/summary` (local folders) and log it on the parent run."""
    runs = [r["mlflow_run_id"] for r in rows if r.get("mlflow_run_id")]
    compare = mlflow_ui.compare_url(parent.tracking_uri, parent.experiment_id, runs) if runs else None
    board = render_leaderboard(rows, spec, name, parent.run_id, base, compare)
    summary_dir = join(sweep_dir, SUMMARY_DIR)
    with tempfile.TemporaryDirectory(prefix="rna-sweep-summary-") as tmp:
        write_trials_table(rows, str(Path(tmp) / "trials.parquet"))
        (Path(tmp) / "leaderboard.md").write_text(board)
        plot_summary(rows, spec.metric, tmp)
        client.log_artifacts(parent.run_id, tmp, SUMMARY_DIR)
        if not is_uri(summary_dir):
            Path(summary_dir).mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                Path(summary_dir, f.name).write_bytes(f.read_bytes())
    scored = [r for r in rows if r.get(spec.metric) is not None]
    metrics = {
        "num_trials": len(rows),
        "num_completed": sum(r["status"] == "completed" for r in rows),
        "num_early_stopped": sum(r["status"] == "early_stopped" for r in rows),
        "num_errors": sum(r["status"] == "error" for r in rows),
    }
    if scored:
        metrics[f"best_{spec.metric}"] = scored[0][spec.metric]
        best = scored[0]
        tracking.set_tags(
            client, parent.run_id, {"rna.best_trial": best["trial_id"], "rna.best_run_id": best["mlflow_run_id"]}
        )
    tracking.log_metrics(client, parent.run_id, metrics, step=0)
    return summary_dir, board


__all__ = [
    "SUMMARY_DIR",
    "accuracy_columns",
    "plot_accuracies",
    "final_columns",
    "plot_summary",
    "render_leaderboard",
    "trial_rows",
    "write_summary",
    "write_trials_table",
]
