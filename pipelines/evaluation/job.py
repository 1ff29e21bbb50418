"""The evaluation job: fan the missing units out on Ray, gather, write the tables, log to MLflow.

    from pipelines.evaluation.job import evaluate
    out = evaluate(checkpoint="ray_results/<run>/.../checkpoint.pt", overrides=["eval.attacks=fgsm"])

MLflow. `--run-id` and `--model-uri` log a nested run under the training run (same experiment,
tag `mlflow.parentRunId`); a bare checkpoint or a user's model gets a run of its own. The test rows
are the run's dataset input (pipelines.data_inputs). Metrics `acc_<attack>_<protocol>` (one inference
draw, mean over trials; `rna_core.evaluation.naming`), `acc_<attack>_<protocol>_std`, and worst-of-R /
vote-of-R as `..._worst<R>`, `..._vote<R>` (mean over trials, and their `_std`); artifacts:
the Parquet table, the paper-style tables, the stability summary, the path-analysis plots. A
re-run reopens the same run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rna_core.attacks.registry import attack_spec, get_attack
from rna_core.config import flatten
from rna_core.evaluation import (
    SCORES,
    ResultRow,
    read_rows_parquet,
    render_markdown,
    result_metric,
    score_metric,
    stability,
    stability_table,
    write_rows_parquet,
)
from rna_core.paths import count_paths
from rna_core.units import to_unit

from .. import tracking
from ..cluster import check_ray_address, ensure_ray
from ..data_inputs import evaluation_input, log_inputs
from .fanout import fan_out
from .plan import EvalPlan, plan_evaluation
from .source import load_external_source, load_source
from .store import (
    PATHS_DIR,
    RESULTS_FILE,
    STABILITY_FILE,
    STATE_FILE,
    TABLES_FILE,
    clean_temporaries,
    done_units,
    gather_rows,
    paths_done,
    read_state,
    write_state,
)

FAIL_ONCE_ENV = "RNA_EVAL_FAIL_ONCE_MARKER"  # test hook read by jobs/evaluate.py

Echo = Callable[[str], None]


@dataclass
class EvalOutcome:
    """What a finished evaluation tells its caller (and what `jobs/evaluate.py` prints)."""

    out_dir: str
    results_path: str
    rows: list[ResultRow]  # this command's rows
    tables: str
    stability: str
    mlflow: tracking.RunRef
    parent_run_id: str | None
    units_total: int
    units_skipped: int  # already done by an earlier run
    units_run: int
    seconds: float
    metrics: dict[str, float]
    path_analysis: dict[str, str] = field(default_factory=dict)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summary_metrics(rows: Sequence[ResultRow], plan: EvalPlan) -> dict[str, float]:
    """`acc_<attack>_<protocol>` (mean over trials) and `..._std` (sample std over trials), and the
    same for worst-of-R and vote-of-R (`..._worst<R>`, `..._vote<R>`)."""
    by_name = {a.name: a for a in plan.attacks}
    out: dict[str, float] = {}
    for s in stability(rows):
        attack = by_name.get(s.attack)
        if attack is None:  # a row of an earlier command in this folder: its settings are the defaults but eps
            eps = {"eps": to_unit(s.eps)} if s.eps is not None and "eps" in attack_spec(s.attack).defaults else {}
            attack = get_attack(s.attack, **eps)
        name = result_metric(attack, s.protocol, plan.options.eot_iter, plan.options.forward_precision)
        out[name] = s.mean
        out[f"{name}_std"] = s.std
        group = [r for r in rows if _group(r) == _group(s)]
        for draws in sorted({r.draws for r in group if r.draws is not None}):
            same_r = [r for r in group if r.draws == draws]
            for score in SCORES:
                mean, std = _mean_std([r.score(score) for r in same_r])
                out[score_metric(name, score, draws)] = mean
                out[f"{score_metric(name, score, draws)}_std"] = std
    return out


def _eps_key(eps: float | None) -> float | None:
    return None if eps is None or math.isnan(eps) else round(float(eps), 6)


def _group(r: Any) -> tuple:
    """The rows a stability entry (rna_core.evaluation.stability) summarises: all but the trial."""
    return (r.run_id, r.model, r.method, r.dataset, r.attack, r.protocol, _eps_key(r.eps))


def eval_params(plan: EvalPlan) -> dict[str, Any]:
    """The evaluation run's params: what was evaluated, with which settings (`eval.*`)."""
    o = plan.options
    params: dict[str, Any] = {}
    if plan.source.kind == "checkpoint":  # no training run holds the config: log it here
        params.update({k: v for k, v in flatten(plan.source.cfg).items() if not k.startswith("eval.")})
    if plan.source.external is not None:  # a user's model: its factory; of our config only where the data came from
        params.update({k: v for k, v in flatten(plan.source.cfg).items() if k.startswith(("data.", "mlflow."))})
        params["eval.model"] = plan.source.external.name
        params["eval.factory_args"] = json.dumps(dict(plan.source.external.args), sort_keys=True, default=str)
    params.update(
        {
            "eval.source": plan.source.description,
            "eval.attacks": ",".join(a.name for a in plan.attacks),
            "eval.protocols": ",".join(o.protocols),
            "eval.trials": o.trials,
            "eval.limit": o.limit,
            "eval.images": len(plan.dataset),
            "eval.batch_size": o.batch_size,
            "eval.seed": o.seed,
            "eval.eot_iter": o.eot_iter,
            "eval.inference_draws": o.inference_draws,
            "eval.strategy": o.strategy,
            "eval.forward_precision": o.forward_precision,
            "eval.shard_size": o.shard_size,
            "eval.weights_digest": plan.source.weights_digest,
            "eval.data_digest": plan.data_digest,
            "eval.fingerprint": plan.fingerprint,
            "eval.checkpoint": plan.source.checkpoint_label,
        }
    )
    for a in plan.attacks:
        if a.settings:
            params[f"eval.attack.{a.name}"] = json.dumps(a.settings, sort_keys=True)
    return params


def open_eval_run(plan: EvalPlan, echo: Echo) -> tuple[Any, tracking.RunRef]:
    """Reopen the evaluation run of this output folder, or create it (nested under the training run)."""
    src = plan.source
    old = (read_state(plan.out_dir) or {}).get("mlflow")
    reopen = tracking.RunRef.from_dict(old) if old and old.get("tracking_uri") == src.tracking_uri else None
    tags = {
        "rna.entry_point": "jobs/evaluate.py",
        "rna.eval_dir": str(plan.out_dir),
        "rna.source": src.description,
        "rna.git_dirty": str(tracking.git_dirty()),
        "git_commit": tracking.git_commit(),
    }
    if src.parent_run_id:
        tags["mlflow.parentRunId"] = src.parent_run_id
    if src.training_run_id:
        tags["rna.training_run_id"] = src.training_run_id
    tags["rna.checkpoint"] = src.checkpoint_label + (f" (epoch {src.selected_epoch})" if src.selection else "")
    if src.selection == "test":
        tags["rna.selection_on_test_set"] = "true (the papers' way: biased upward)"
    name = f"eval-{plan.row_meta['model']}-{plan.fingerprint[:6]}" + (
        f"-selected-on-{src.selection}" if src.selection else ""
    )
    opened = tracking.open_run(
        src.tracking_uri,
        src.cfg.mlflow.experiment,
        name,
        eval_params(plan),
        tags,
        reopen=reopen,
        experiment_id=src.parent_experiment_id if src.parent_run_id else None,
        if_missing=src.cfg.mlflow.if_run_missing,
        named_by=str(plan.out_dir / STATE_FILE),
    )
    if opened.how == "reopened":
        echo(f"[evaluate] resuming MLflow run {opened.ref.run_id}")
    return opened.client, opened.ref


def log_results(client: Any, ref: tracking.RunRef, plan: EvalPlan, metrics: Mapping[str, float]) -> None:
    tracking.log_metrics(client, ref.run_id, metrics, step=0)
    for name in (RESULTS_FILE, TABLES_FILE, STABILITY_FILE):
        if (plan.out_dir / name).is_file():
            client.log_artifact(ref.run_id, str(plan.out_dir / name))
    if (plan.out_dir / PATHS_DIR).is_dir():
        client.log_artifacts(ref.run_id, str(plan.out_dir / PATHS_DIR), PATHS_DIR)


def run_evaluation(plan: EvalPlan, echo: Echo = print, fail_once_marker: str | None = None) -> EvalOutcome:
    """Fan the plan's missing units out on Ray, gather, write the tables and log them to MLflow.

    `fail_once_marker` is a test hook: the first task to create that file raises once.
    """
    start = time.monotonic()
    o = plan.options
    clean_temporaries(plan.out_dir)
    done = done_units(plan.out_dir)
    todo = [u for u in plan.units if u.unit_id not in done]
    with_paths = bool(o.path_analysis) and count_paths(plan.source.structure()) > 1 and not paths_done(plan)
    shards = len({(u.first, u.stop) for u in plan.units})
    echo(
        f"[evaluate] {plan.row_meta['model']} {plan.row_meta['method']} on {len(plan.dataset)} "
        f"{plan.row_meta['dataset']} images: "
        f"{len(plan.attacks)} attack(s) x {len(o.protocols)} protocol(s) x {o.trials} trial(s) x {shards} shard(s) = "
        f"{len(plan.units)} units; {len(plan.units) - len(todo)} done earlier; folder {plan.out_dir}"
    )

    if todo or with_paths:
        check_ray_address(plan.source.cfg)  # before the run opens: one line, nothing started
    client, ref = open_eval_run(plan, echo)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        log_inputs(client, ref.run_id, [evaluation_input(plan.source.cfg, plan.dataset, o.limit)])  # the test rows
        write_state(
            plan.out_dir,
            {
                "format": 1,
                "source": plan.source.description,
                "fingerprint": plan.fingerprint,
                "weights_digest": plan.source.weights_digest,
                "data_digest": plan.data_digest,
                "mlflow": ref.to_dict(),
                "parent_run_id": plan.source.parent_run_id,
                "options": asdict(plan.options),
            },
        )
        ran = 0
        if todo or with_paths:
            ensure_ray(plan.source.cfg, echo)
            ran = fan_out(plan, todo, echo, with_paths, fail_once_marker)
        row_run = plan.source.training_run_id or ref.run_id
        rows = gather_rows(plan, row_run)
        results = plan.out_dir / RESULTS_FILE
        write_rows_parquet(rows, results, merge=True)
        all_rows = [r for r in read_rows_parquet(results) if r.run_id == row_run]
        title = f"{plan.row_meta['model']} {plan.row_meta['method']}, {plan.source.description}"
        if plan.source.selection == "test":
            title += " (selected on the test set, the papers' way: biased upward)"
        (plan.out_dir / TABLES_FILE).write_text(render_markdown(all_rows, title=title))
        (plan.out_dir / STABILITY_FILE).write_text(
            f"# Stability over trials: {title}\n\nAccuracy (%) over trials; std is the sample standard deviation.\n\n"
            + stability_table(all_rows)
            + "\n"
        )
        metrics = summary_metrics(all_rows, plan)
        metrics.update(
            {
                "eval_images": float(len(plan.dataset)),
                "eval_units": float(len(plan.units)),
                "eval_units_run": float(ran),
                "eval_seconds": time.monotonic() - start,
            }
        )
        log_results(client, ref, plan, metrics)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(client, ref.run_id, status)

    paths_dir = plan.out_dir / PATHS_DIR
    paths = {p.name: str(p) for p in sorted(paths_dir.glob("*"))} if paths_dir.is_dir() else {}
    return EvalOutcome(
        out_dir=str(plan.out_dir),
        results_path=str(results),
        rows=rows,
        tables=render_markdown(rows),
        stability=stability_table(rows),
        mlflow=ref,
        parent_run_id=plan.source.parent_run_id,
        units_total=len(plan.units),
        units_skipped=len(plan.units) - len(todo),
        units_run=ran,
        seconds=time.monotonic() - start,
        metrics=metrics,
        path_analysis=paths,
    )


def evaluate(
    run_id: str | None = None,
    checkpoint: str | None = None,
    overrides: Sequence[str] = (),
    echo: Echo = print,
    selected: str | None = None,
    model: str | None = None,
    weights: str | None = None,
    factory_args: Sequence[str] = (),
) -> EvalOutcome:
    """Load, validate and plan (nothing started or written on a bad input), then run.

    The model is a training run's checkpoint (`run_id`), a checkpoint file, or a user's `model`
    ("module:factory", with `weights` and `factory_args`). `overrides` change the config, its
    `eval:` section included (`eval.attacks=fgsm`).
    """
    if model is not None:
        source = load_external_source(model, weights, factory_args, overrides)
    else:
        source = load_source(run_id=run_id, checkpoint=checkpoint, overrides=overrides, selected=selected)
    return run_evaluation(plan_evaluation(source), echo)


__all__ = [
    "EvalOutcome",
    "FAIL_ONCE_ENV",
    "evaluate",
    "log_results",
    "open_eval_run",
    "run_evaluation",
    "summary_metrics",
]
