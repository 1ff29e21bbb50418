"""One Tune trial: a full training run (the training job's own launcher) as a nested MLflow run.

`Tuner(TorchTrainer)` no longer works in Ray 2.60, so each trial is a function trainable that
calls `pipelines.train.run_training` (the same code path as `jobs/train.py`) with Tune's report
callback on the TorchTrainer: a trial is a full Ray Train run (several workers if the config says
so). The trial driver itself asks Tune for only a sliver of a CPU (`sweep.trial_cpus`); the Train
workers hold the real resources.

ASHA and the final evaluation. ASHA sees `asha_epoch`, which the report callback adds to every
epoch report except the last: a trial that reached its last epoch is never stopped while it runs
its final evaluation and logs its model.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from rna_core.config import unflatten
from rna_core.evaluation import epoch_metric_names, final_metric_names

from .. import tracking
from ..run_folder import join, read_job_file
from ..train import run_training
from .spec import plain

ASHA_TIME_ATTR = "asha_epoch"
# Test and operations hook: after this many trials completed in this session, the driver sends
# itself SIGINT, exactly what Ctrl+C does (Tune saves its state; the sweep can be resumed).
INTERRUPT_ENV = "RNA_SWEEP_INTERRUPT_AFTER_TRIALS"


class SweepReportCallback(TuneReportCallback):
    """Tune's report callback, adding `asha_epoch` to every epoch report but the last (see module doc)."""

    def __init__(self, epochs: int):
        super().__init__()
        self._epochs = int(epochs)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [tag_epoch_report(m, self._epochs) for m in metrics], checkpoint)


def tag_epoch_report(metrics: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """The epoch report as Tune should see it (ASHA's time attribute only before the last epoch)."""
    out = dict(metrics)
    epoch = out.get("epoch")
    if isinstance(epoch, (int, float)) and epoch < epochs:
        out[ASHA_TIME_ATTR] = int(epoch)
    return out


def describe_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def sweep_trial(config: dict[str, Any]) -> None:
    """One Tune trial: a full training run as a child MLflow run of the sweep's parent run."""
    meta = config["sweep"]
    arm = config.get("arm")
    params = {**(meta.get("arms") or {}).get(arm, {}), **{k: plain(v) for k, v in config["params"].items()}}
    trial_id = tune.get_context().get_trial_id()
    flat = {**config["base"], **params, "mlflow.run_name": trial_id, "ray.storage_path": meta["trials_dir"]}
    cfg = unflatten(flat)
    tags = {
        "rna.entry_point": "jobs/sweep.py",
        "rna.sweep": meta["name"],
        "rna.sweep_dir": meta["sweep_dir"],
        "rna.trial_id": trial_id,
        "rna.trial_seed": cfg.train.seed,
        "rna.trial_params": describe_params(params)[:5000],
        **({"rna.arm": str(arm)} if arm else {}),
    }
    finished = finished_run_metrics(join(meta["trials_dir"], trial_id), final_metric_names(cfg.train)["natural"])
    if finished is not None:
        # Its training run had ended when the sweep was interrupted, before Tune recorded it:
        # report what the run logged instead of evaluating again.
        tune.report({**finished, "trial_seed": float(cfg.train.seed)})
        return
    out = run_training(
        cfg,
        echo=lambda line: print(f"[{trial_id}] {line}", flush=True),
        parent_run=tracking.RunRef.from_dict(meta["parent"]),
        run_tags=tags,
        trainer_callbacks=[SweepReportCallback(cfg.train.epochs)],
        end_run_on_failure=False,  # stopped by Tune or failed: the driver ends it (reconcile_children)
    )
    last_epoch = dict(out.last_epoch_metrics)
    if not last_epoch:  # resumed after its last epoch (interrupted during the final evaluation):
        logged = tracking.client_for(out.mlflow.tracking_uri).get_run(out.mlflow.run_id).data.metrics
        last_epoch = {k: logged[k] for k in (*epoch_metric_names(cfg.train), "epoch") if k in logged}
    tune.report(
        {
            **last_epoch,
            **out.final_metrics,
            "epochs_done": float(out.epochs_done),
            "trial_seed": float(cfg.train.seed),
            "mlflow_run_id": out.mlflow.run_id,
        }
    )


def finished_run_metrics(run_dir: str, final_metric: str) -> dict[str, Any] | None:
    """The final report of a trial whose training run already FINISHED (else None)."""
    job = read_job_file(run_dir)
    if not job or not job.get("mlflow"):
        return None
    ref = tracking.RunRef.from_dict(job["mlflow"])
    run = tracking.client_for(ref.tracking_uri).get_run(ref.run_id)
    if run.info.status != "FINISHED" or final_metric not in run.data.metrics:
        return None
    m = run.data.metrics
    return {**m, "epochs_done": float(m.get("epoch", 0.0)), "mlflow_run_id": ref.run_id}


class InterruptAfterTrials(Callback):
    """Ctrl+C after INTERRUPT_ENV trials completed in this session (the variable is read when a trial
    completes, not when the callback is built: a restored sweep gets its callbacks back from Tune's
    saved state and must not be interrupted again unless asked)."""

    def __init__(self) -> None:
        self.completed = 0
        self.fired = False

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        limit = os.environ.get(INTERRUPT_ENV, "").strip()
        if limit and not self.fired and self.completed >= int(limit):
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: save the state, stop the trials


__all__ = [
    "ASHA_TIME_ATTR",
    "INTERRUPT_ENV",
    "InterruptAfterTrials",
    "SweepReportCallback",
    "describe_params",
    "finished_run_metrics",
    "sweep_trial",
    "tag_epoch_report",
]
