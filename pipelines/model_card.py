"""A short Markdown model card logged with every trained model.

Why: an MLflow run holds a checkpoint and dozens of params; the card says in one screen what the
model is (method, random space, number of paths), how it was trained (the recipe) and how robust
it came out, with the protocol of every number, so a result is never quoted without its protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rna_core.config import Config
from rna_core.evaluation import final_metric_names
from rna_core.methods import get_method

RESULT_ROWS = (  # (role in final_metric_names, row name, protocol in words)
    ("natural", "Natural (clean)", "a fresh random path per batch"),
    ("pgd", "PGD-{steps}", "transfer: attack one path, score a fresh one (the paper's setting)"),
    ("eot", "EOT-PGD-{steps}", "eot: every attack forward draws a fresh path (adaptive attack)"),
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_model_card(
    cfg: Config,
    results: Mapping[str, Any],
    *,
    run_name: str,
    run_id: str | None = None,
    checkpoint: str | None = None,
    num_paths: int | None = None,
    epochs_done: int | None = None,
    git_commit: str | None = None,
    selected: Mapping[str, Mapping[str, Any]] | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Markdown for the trained model `cfg` with its final `results` (metric name -> value).

    `selected` ({"val" | "test": {epoch, metric, score, checkpoint, criterion}}, rna_core.selection)
    adds a column per selected checkpoint; every column says which checkpoint its numbers come from.
    `models` ({"last" | "val": {uri, run_uri, registered, alias_uri}}, pipelines.logged_model) says
    how to load each logged MLflow model.
    """
    m, d, t = cfg.model, cfg.data, cfg.train
    a = t.attack
    method = get_method(m.method)
    names = final_metric_names(t)
    n_eval = results.get("eval_images")
    lines = [
        f"# Model card: {run_name}",
        "",
        f"- **Model**: `{m.name}` for `{d.dataset}` ({cfg.num_classes()} classes)",
        f"- **Method**: {method.title}",
        f"- **Random space**: {method.random_space(m)}" + (f", {num_paths:,} paths" if num_paths is not None else ""),
        f"- **Path sampling**: `{t.sampling}`, training mode `{t.mode}`"
        + (f" (EOT over {t.eot_iter} paths)" if t.mode == "eot" else ""),
        "",
        "## Training recipe",
        "",
        f"- Adversarial training: PGD-{a.steps}, L-inf eps {a.eps:g}/255, step {a.step_size:g}/255, "
        f"{'random' if a.random_start else 'no random'} start"
        + (" (no attack: natural training)" if t.mode == "natural" else ""),
        f"- SGD lr {t.lr:g}, momentum {t.momentum:g}, weight decay {t.weight_decay:g}"
        + (", Nesterov" if t.nesterov else ""),
        f"- Schedule `{t.schedule}`"
        + (
            f" (x{t.gamma:g} at {', '.join(f'{x:g}' for x in t.milestones)} of the run)"
            if t.schedule == "multistep"
            else ""
        ),
        f"- Epochs {t.epochs}"
        + (f" ({epochs_done} completed)" if epochs_done is not None else "")
        + f", global batch {d.batch_size}, augmentation {'on' if d.augment else 'off'}"
        + (f", a fixed subset of {d.train_limit} training images" if d.train_limit else "")
        + (f", {d.val_size} training images held out for model selection" if d.val_size else ""),
        f"- Workers {cfg.ray.num_workers} (DDP), seed {t.seed}",
        "",
        "## Results",
        "",
        f"Held-out slice: {int(n_eval) if n_eval is not None else d.eval_limit} test images (a fixed subset, "
        "the same for every run); "
        f"attacks L-inf eps {a.eps:g}/255, step {a.step_size:g}/255, {t.eval_pgd_steps} steps.",
        "",
    ]
    selected = dict(selected or {})
    columns = [("Last epoch (the result)", "")] + [
        (f"Selected on {w} (epoch {info['epoch']})" + (": biased" if w == "test" else ""), f"{w}_selected_")
        for w, info in selected.items()
    ]
    lines += [
        "| Attack | Protocol | " + " | ".join(c for c, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for role, name, protocol in RESULT_ROWS:
        key = names[role]
        if key in results:
            cells = [_fmt(results.get(prefix + key, "-")) for _, prefix in columns]
            lines.append(f"| {name.format(steps=t.eval_pgd_steps)} | {protocol} | " + " | ".join(cells) + " |")
    metric_list = ", ".join(f"`{n}`" for n in names.values())
    lines += [
        "",
        f"- **Last epoch (the result)**: the weights after epoch {epochs_done if epochs_done is not None else t.epochs}"
        + (f", `{checkpoint}`" if checkpoint else "")
        + f"; metrics {metric_list}, as `jobs/evaluate.py` names them.",
    ]
    for w, info in selected.items():
        where = (
            f"{d.val_size} training images held out (`data.val_size`), never trained on"
            if w == "val"
            else "the held-out test slice that the table reports on (`train.select_on_test`, the papers' way): "
            "**biased upward**, not comparable with the last epoch"
        )
        lines.append(
            f"- **Selected on {w}**: epoch {info['epoch']}, the best {info['metric']} ({_fmt(float(info['score']))}) "
            f"on {where}; measure: {info.get('criterion', info['metric'])}; `{info['checkpoint']}` "
            f"(MLflow artifact `selected_{w}/`); metrics `{w}_selected_acc_*`."
        )
    if models:
        lines += ["", "## Load it", ""]
        for which, m in models.items():
            what = "the last epoch" if which == "last" else f"the epoch selected on {which}"
            names = [f"`{u}`" for u in (m.get("alias_uri"), m.get("registered"), m.get("run_uri"), m.get("uri")) if u]
            lines.append(f"- {what}: " + ", ".join(names))
        first = models.get("last") or next(iter(models.values()))
        lines += [
            "",
            f'`mlflow.pytorch.load_model("{first.get("alias_uri") or first.get("run_uri")}")` gives a network '
            "that draws a fresh path every forward (as RNA inference does), inputs in [0, 1]; "
            f"`python jobs/evaluate.py --model-uri {first.get('alias_uri') or first.get('run_uri')}` attacks it.",
        ]
    lines += ["", "## Provenance", ""]
    if run_id:
        lines.append(f"- MLflow run: `{run_id}`")
    if checkpoint:
        lines.append(f"- Checkpoint (last epoch): `{checkpoint}`")
    if git_commit:
        lines.append(f"- Code: git commit `{git_commit}`")
    lines += [
        "",
        "Robustness of randomized defenses is overestimated by transfer-style attacks; quote the "
        "EOT row (or AutoAttack `rand` from `jobs/evaluate.py`) beside the paper's protocol.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["render_model_card"]
