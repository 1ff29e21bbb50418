"""The sweep's driver: plan its folder, open the parent run, run the Tuner, reconcile, summarize.

Tracking. The sweep is one MLflow parent run; each trial's training run is a nested child
(`mlflow.parentRunId`) with the flattened config as params (the swept values and the trial's
seed included) and the per-epoch metrics, so the MLflow UI compares trials side by side. When
the sweep ends, the parent gets the summary (pipelines.sweep.summary). Trials that ASHA stopped
keep their MLflow run (FINISHED, tag `rna.early_stopped=true`).

Resume. The sweep's folder is `<ray.storage_path>/<sweep name>` (Tune's experiment folder; the
Train run of each trial sits in `trials/<trial id>`), with `rna_sweep.json` naming the parent
run. Running the same sweep again (or `--resume`) restores Tune's state (`Tuner.restore`):
finished trials are not run again, unfinished and errored trials continue from their last
epoch checkpoint into their own MLflow run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rna_core.config import Config, flatten, to_dict
from rna_core.errors import ConfigError
from rna_core.sweep_config import Dimension, SweepConfig

from .. import tracking
from ..cluster import check_cluster, choose_training_device, cluster_resources, ensure_ray, gpu_capacity
from ..preflight import check_data, check_object_store, check_tracking_store, check_writable_folder
from ..run_folder import base_dir, exists, join, read_job_file, resolve_paths, write_job_file
from ..train import JOB_FILE_TAG
from .spec import base_config, identity, sweep_section, validate_sweep
from .summary import trial_rows, write_summary
from .trial import ASHA_TIME_ATTR, InterruptAfterTrials, sweep_trial

SWEEP_FILE = "rna_sweep.json"
TRIALS_DIR = "trials"

Echo = Callable[[str], None]


@dataclass
class SweepPlan:
    cfg: Config  # the sweep config, paths absolute
    name: str
    sweep_dir: str
    trials_dir: str
    stored: dict[str, Any] | None  # rna_sweep.json of the sweep being resumed

    @property
    def spec(self) -> SweepConfig:
        return sweep_section(self.cfg)

    @property
    def base(self) -> Config:
        return base_config(self.cfg)


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: str
    parent: tracking.RunRef
    experiment: str
    rows: list[dict[str, Any]]
    interrupted: bool
    resumed: bool
    summary_dir: str | None = None
    leaderboard: str = ""
    num_errors: int = 0


def to_tune(d: Dimension) -> Any:
    """A dimension as Tune's search space object."""
    if d.kind == "grid":
        return tune.grid_search(list(d.values))
    if d.kind == "choice":
        return tune.choice(list(d.values))
    low, high = d.values
    if d.kind == "uniform":
        return tune.uniform(low, high)
    if d.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(int(low), int(high) + 1)  # ours is inclusive, Tune's upper bound is not


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
            if diff:
                return diff
        return None
    return None if a == b else f"{where} ({a!r} then, {b!r} now)"


def plan_sweep(cfg: Config, config_path: str | None = None, resume: bool = False) -> SweepPlan:
    """Where the sweep lives, and whether it is a resume (explicit, or the folder exists)."""
    cfg = resolve_paths(cfg)
    spec = sweep_section(cfg)
    name = spec.name or (Path(config_path).stem if config_path else "sweep")
    sweep_dir = join(cfg.ray.storage_path, name)
    stored = read_job_file(sweep_dir, SWEEP_FILE)
    if stored is None and resume:
        raise ConfigError(
            f"nothing to resume: {sweep_dir} holds no sweep ({SWEEP_FILE} missing); run without --resume to start it"
        )
    if stored is None and exists(sweep_dir):
        raise ConfigError(f"{sweep_dir} exists but was not written by jobs/sweep.py; choose another sweep.name")
    if stored is not None:
        diff = _first_difference(stored.get("identity"), identity(cfg))
        if diff:
            raise ConfigError(
                f"cannot resume {sweep_dir}: the sweep changed at {diff}; "
                "resume with the original config, or set sweep.name=<new name> to start another sweep"
            )
    return SweepPlan(cfg, name, sweep_dir, join(sweep_dir, TRIALS_DIR), stored)


def default_max_concurrent(cfg: Config, use_gpu: bool) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least one."""
    res = cluster_resources()
    r = cfg.ray
    per_trial_cpu = r.num_workers * r.cpus_per_worker + sweep_section(cfg).trial_cpus
    fits = int(res.get("CPU", 1) // per_trial_cpu) if per_trial_cpu > 0 else 1
    if use_gpu and r.gpus_per_worker > 0:
        fits = min(fits, int(res.get("GPU", 0) // (r.num_workers * r.gpus_per_worker)))
    return max(1, fits)


def build_scheduler(spec: SweepConfig, base: Config):
    """ASHA over `asha_epoch` (absent in a trial's last epoch report), or None.

    The metric and mode reach it from TuneConfig (Tune's `set_search_properties`).
    """
    if spec.scheduler != "asha":
        return None
    epochs = max([base.train.epochs] + [int(v) for d in spec.space if d.key == "train.epochs" for v in d.values])
    return ASHAScheduler(
        time_attr=ASHA_TIME_ATTR,
        max_t=spec.asha.max_t or epochs,
        grace_period=spec.asha.grace_period,
        reduction_factor=spec.asha.reduction_factor,
        stop_last_trials=False,
    )


def _param_space(plan: SweepPlan, parent: tracking.RunRef) -> dict[str, Any]:
    arms = {"arm": tune.grid_search([a.name for a in plan.spec.arms])} if plan.spec.arms else {}
    return {
        **arms,
        "params": {d.key: to_tune(d) for d in plan.spec.space},
        "base": flatten(plan.base),
        "sweep": {
            "name": plan.name,
            "sweep_dir": plan.sweep_dir,
            "trials_dir": plan.trials_dir,
            "parent": parent.to_dict(),
            "arms": {a.name: a.as_dict() for a in plan.spec.arms},
        },
    }


def _build_tuner(plan: SweepPlan, parent: tracking.RunRef, use_gpu: bool, echo: Echo):
    spec = plan.spec
    trainable = tune.with_resources(sweep_trial, {"cpu": spec.trial_cpus})
    if plan.stored is not None and tune.Tuner.can_restore(plan.sweep_dir):
        echo(f"resuming sweep {plan.name} from {plan.sweep_dir} (finished trials are kept, the rest continue)")
        return tune.Tuner.restore(
            plan.sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        ), True
    concurrent = spec.max_concurrent_trials or default_max_concurrent(plan.cfg, use_gpu)
    storage, name = plan.sweep_dir.rsplit("/", 1)
    tuner = tune.Tuner(
        trainable,
        param_space=_param_space(plan, parent),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            scheduler=build_scheduler(spec, plan.base),
            # our own generator (seeded: the random search is reproducible), limited to `concurrent`
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[InterruptAfterTrials()],
            failure_config=tune.FailureConfig(max_failures=0),  # worker failures are retried by Ray Train
            verbose=1,
        ),
    )
    echo(
        f"sweep {plan.name}: {spec.num_trials()} trial(s), "
        f"{spec.search} search, scheduler {spec.scheduler}, up to {concurrent} at once; folder {plan.sweep_dir}"
    )
    return tuner, False


def open_parent(plan: SweepPlan, config_text: str, echo: Echo) -> tuple[Any, tracking.RunRef]:
    """Reopen the parent run of a resumed sweep, or create (or adopt) it with the sweep's params."""
    reopen = tracking.RunRef.from_dict(plan.stored["mlflow"]) if plan.stored is not None else None
    # the base value of a swept key would mislead in the UI
    swept = {d.key for d in plan.spec.space} | {k for a in plan.spec.arms for k, _ in a.settings}
    sweep_params = {k: v for k, v in flatten(replace(plan.base, sweep=plan.spec)).items() if k.startswith("sweep.")}
    params = {
        **{k: ("<swept>" if k in swept else v) for k, v in flatten(plan.base).items()},
        **sweep_params,
        "git_commit": tracking.git_commit(),
    }
    tags = {
        "rna.entry_point": "jobs/sweep.py",
        "rna.sweep_dir": plan.sweep_dir,
        "rna.sweep": plan.name,
        "rna.git_dirty": str(tracking.git_dirty()),
    }
    owner = {"rna.sweep_dir": plan.sweep_dir, JOB_FILE_TAG: "pending"}  # "written" once SWEEP_FILE names it
    uri = reopen.tracking_uri if reopen else tracking.resolve_tracking_uri(base_dir())
    opened = tracking.open_run(
        uri,
        plan.cfg.mlflow.experiment,
        plan.name,
        {} if reopen and tracking.run_exists(reopen) else params,
        tags,
        reopen=reopen,
        owner=owner,
        if_missing=plan.cfg.mlflow.if_run_missing,
        named_by=join(plan.sweep_dir, SWEEP_FILE),
    )
    if opened.how == "reopened":
        echo(f"resuming MLflow parent run {opened.ref.run_id}")
        return opened.client, opened.ref
    if opened.how == "adopted":
        echo(
            f"reusing MLflow parent run {opened.ref.run_id} of an earlier attempt stopped before {SWEEP_FILE} "
            "was written"
        )
    tracking.log_text(opened.client, opened.ref.run_id, "sweep.yaml", config_text)
    return opened.client, opened.ref


def child_runs(client: Any, parent: tracking.RunRef) -> list[Any]:
    """The trial runs nested under the sweep's parent run."""
    return client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10000
    )


def saved_trial_statuses(sweep_dir: str) -> dict[str, str]:
    """trial id -> Tune status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) as Tune saved it.

    Read from the experiment state on disk, not from the ResultGrid: after an interrupt Tune
    saves the state first and then stops the running trials, which marks them TERMINATED in
    memory; the saved state (what `Tuner.restore` continues from) still says RUNNING.
    """
    return {t.trial_id: t.status for t in ExperimentAnalysis(sweep_dir).trials}


def trial_status(tune_status: str, metrics: Mapping[str, Any]) -> str:
    if tune_status == "ERROR":
        return "error"
    if tune_status != "TERMINATED":
        return "incomplete"
    return "completed" if "epochs_done" in metrics else "early_stopped"


def reconcile_children(client: Any, parent: tracking.RunRef, statuses: Mapping[str, str]) -> dict[str, str]:
    """End child runs that Tune stopped from outside (ASHA, errors, an interrupt); trial id -> run id.

    A trial Tune terminated (completed, or stopped early by ASHA) ends FINISHED even if something
    else ended its run first; a run that ended FINISHED on its own stays FINISHED (Tune may not
    have recorded the trial's last report before an interrupt: the resume reports it).
    """
    end_as = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED", "incomplete": "KILLED"}
    runs: dict[str, str] = {}
    for run in child_runs(client, parent):
        trial_id = run.data.tags.get("rna.trial_id", "")
        runs[trial_id] = run.info.run_id
        status = statuses.get(trial_id, "incomplete")
        tracking.set_tags(
            client,
            run.info.run_id,
            {"rna.trial_status": status, "rna.early_stopped": str(status == "early_stopped").lower()},
        )
        if run.info.status == "RUNNING" or (end_as[status] == "FINISHED" and run.info.status != "FINISHED"):
            tracking.end_run(client, run.info.run_id, end_as[status])
    return runs


def run_sweep(
    cfg: Config,
    *,
    config_path: str | None = None,
    config_text: str | None = None,
    resume: bool = False,
    echo: Echo = print,
) -> SweepOutcome:
    """Run (or resume) a sweep; returns where everything is. Validation happens before Ray starts."""
    validate_sweep(cfg)
    check_object_store(cfg.ray.storage_path, "ray.storage_path")  # before the sweep folder is looked up there
    plan = plan_sweep(cfg, config_path, resume)
    check_data(plan.base, echo)
    check_writable_folder(plan.cfg.ray.storage_path, "ray.storage_path")
    if not plan.stored:
        check_tracking_store(tracking.resolve_tracking_uri(base_dir()))
    stored = ((plan.stored or {}).get("mlflow") or {}).get("tracking_uri")
    check_cluster(plan.base, stored or tracking.resolve_tracking_uri(base_dir()))  # trials train on any node
    text = config_text or yaml.safe_dump(to_dict(plan.cfg), sort_keys=False)

    client, parent = open_parent(plan, text, echo)
    status = "FAILED"
    statuses: dict[str, str] = {}
    try:
        write_job_file(
            plan.sweep_dir,
            {
                "format": 1,
                "name": plan.name,
                "identity": identity(plan.cfg),
                "mlflow": parent.to_dict(),
                "experiment": plan.cfg.mlflow.experiment,
                "created": (plan.stored or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            name=SWEEP_FILE,
        )
        tracking.set_tags(client, parent.run_id, {JOB_FILE_TAG: "written"})
        spec = plan.spec  # a local Ray has room for the trial drivers beside their workers
        ensure_ray(plan.base, echo, extra_cpus=spec.trial_cpus * (spec.max_concurrent_trials or 1))
        tuner, restored = _build_tuner(plan, parent, choose_training_device(plan.base, gpu_capacity()).use_gpu, echo)
        grid = tuner.fit()
        last = {str((r.metrics or {}).get("trial_id")): (r.metrics or {}) for r in grid}
        statuses = {
            tid: trial_status(st, last.get(tid, {})) for tid, st in saved_trial_statuses(plan.sweep_dir).items()
        }
        run_ids = reconcile_children(client, parent, statuses)
        rows = trial_rows(grid, plan.spec, plan.base, statuses, run_ids)
        interrupted = any(s == "incomplete" for s in statuses.values())
        outcome = SweepOutcome(
            plan.name,
            plan.sweep_dir,
            parent,
            plan.cfg.mlflow.experiment,
            rows,
            interrupted,
            restored or plan.stored is not None,
        )
        if interrupted:
            status = "KILLED"
            done = sum(s != "incomplete" for s in statuses.values())
            echo(
                f"sweep {plan.name} interrupted with {done} of {len(statuses)} trials done; Tune saved its state "
                f"in {plan.sweep_dir}: run the same sweep again (or with --resume) to continue"
            )
            return outcome
        outcome.summary_dir, outcome.leaderboard = write_summary(
            client, plan.sweep_dir, plan.name, plan.spec, plan.base, parent, rows
        )
        outcome.num_errors = sum(r["status"] == "error" for r in rows)
        status = "FAILED" if outcome.num_errors else "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        reconcile_children(client, parent, statuses)
        raise
    except Exception:  # the driver failed: no child run may stay RUNNING
        try:
            reconcile_children(client, parent, statuses)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise
    finally:
        tracking.end_run(client, parent.run_id, status)


__all__ = [
    "SWEEP_FILE",
    "SweepOutcome",
    "SweepPlan",
    "build_scheduler",
    "child_runs",
    "default_max_concurrent",
    "plan_sweep",
    "reconcile_children",
    "run_sweep",
    "to_tune",
]
