"""The training job's launcher: plan the run folder, open the MLflow run, fit on Ray Train, log.

Order matters for users: everything that can be wrong in their input (config, data location,
a model that cannot be built, a resume folder that does not fit) is checked before Ray starts
or an MLflow run is created (pipelines.preflight), so a mistake costs one line and leaves
nothing behind. The per-worker function is `pipelines.train_worker.train_loop_per_worker`.

Runs and resumes. A job is one Ray Train run `<storage_path>/<run name>` and one MLflow run.
The launcher writes `rna_job.json` into the run folder (config, MLflow run id and store), and
each epoch checkpoint carries the MLflow run id too. Running again with the same run name (or
`--resume <run folder>`) continues from the last checkpoint (Ray Train finds it in the folder)
into the same MLflow run; so does a retry after a worker failure (`ray.max_failures`). A run
that already trained all its epochs starts nothing when its command runs again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rna_core.builders import model_structure
from rna_core.checkpoint import read_checkpoint
from rna_core.config import Config, apply_overrides, config_from_dict, dump_yaml, flatten, to_dict, unflatten
from rna_core.errors import ConfigError
from rna_core.paths import count_paths

from . import tracking
from .checkpoints import CHECKPOINT_FILE, read_selected
from .cluster import DeviceChoice, check_cluster, choose_training_device, ensure_ray, gpu_capacity
from .logged_model import log_run_models
from .model_card import render_model_card
from .preflight import check_compatible, check_data, check_object_store, check_tracking_store, check_training_config
from .run_artifacts import log_folder, model_record, selection_tags
from .run_folder import (
    JOB_FILE,
    base_dir,
    exists,
    join,
    read_job_file,
    resolve_paths,
    resolve_run_dir,
    write_job_file,
)
from .train_worker import train_loop_per_worker

# "pending" from the MLflow run's creation until the run folder's job file names it, then "written".
# A run still "pending" belongs to an attempt stopped in between (Ctrl+C, a killed trial): the next
# attempt at the same run folder adopts it instead of leaving an orphan beside a second run.
JOB_FILE_TAG = "rna.job_file"

Echo = Callable[[str], None]


@dataclass
class TrainingOutcome:
    """What a finished job tells its caller (and what `jobs/train.py` prints)."""

    run_name: str
    run_dir: str
    checkpoint: str | None  # the final checkpoint file (or folder URI on remote storage)
    mlflow: tracking.RunRef
    experiment: str
    final_metrics: dict[str, float]
    epochs_done: int
    start_epoch: int
    resumed: dict[str, Any] | None
    state_digests: list[str]
    last_epoch_metrics: dict[str, float] = field(default_factory=dict)
    # Model selection (rna_core.selection): {"val" | "test": {epoch, metric, score, checkpoint, criterion}}.
    # The result is the last epoch (`checkpoint`); these are reported beside it, labelled.
    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    # MLflow models (pipelines.logged_model): {"last" | "val": {uri, run_uri, registered, alias_uri}}
    models: dict[str, dict[str, str | None]] = field(default_factory=dict)


@dataclass
class RunPlan:
    cfg: Config
    run_name: str
    run_dir: str
    job: dict[str, Any] | None  # the existing job file when resuming


def load_resume_config(run_dir: str, overrides: list[str] | None = None) -> Config:
    """The config stored with a run (for `--resume` without `--config`), with overrides applied."""
    check_object_store(run_dir, "--resume")
    job = read_job_file(run_dir)
    if job is None:
        raise ConfigError(
            f"'{run_dir}' is not a training run folder (no {JOB_FILE}); pass the run folder printed by jobs/train.py"
        )
    stored = unflatten(job["config"])
    return config_from_dict(apply_overrides(to_dict(stored), overrides or []))


def plan_run(cfg: Config, config_path: str | None = None, resume: str | None = None) -> RunPlan:
    """Decide the run folder: `--resume DIR`, the configured run name, or a fresh timestamped one."""
    base = base_dir()
    if resume:
        run_dir = resolve_run_dir(resume)
        job = read_job_file(run_dir)
        if job is None:
            raise ConfigError(
                f"'{resume}' is not a training run folder (no {JOB_FILE}); pass the run folder printed by jobs/train.py"
            )
        storage, name = run_dir.rsplit("/", 1)
        cfg = resolve_paths(replace(cfg, ray=replace(cfg.ray, storage_path=storage)), base)
        check_compatible(job["config"], cfg, run_dir)
        return RunPlan(cfg, name, run_dir, job)
    cfg = resolve_paths(cfg, base)
    if cfg.mlflow.run_name:
        name = cfg.mlflow.run_name
        run_dir = join(cfg.ray.storage_path, name)
        job = read_job_file(run_dir)
        if job is None and exists(run_dir):
            raise ConfigError(f"{run_dir} exists but was not written by jobs/train.py; choose another mlflow.run_name")
        if job is not None:
            check_compatible(job["config"], cfg, run_dir)
        return RunPlan(cfg, name, run_dir, job)
    stem = Path(config_path).stem if config_path else "train"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, i = name, 1
    while exists(join(cfg.ray.storage_path, candidate)):
        i += 1
        candidate = f"{name}-{i}"
    return RunPlan(cfg, candidate, join(cfg.ray.storage_path, candidate), None)


def already_finished(plan: RunPlan) -> TrainingOutcome | None:
    """The outcome recorded by a run that already trained all of `plan.cfg.train.epochs`, else None."""
    record = (plan.job or {}).get("finished")
    if not record or int(record.get("epochs", 0)) < plan.cfg.train.epochs:
        return None
    epochs = int(record["epochs"])
    return TrainingOutcome(
        run_name=plan.run_name,
        run_dir=plan.run_dir,
        checkpoint=record.get("checkpoint"),
        mlflow=tracking.RunRef.from_dict(plan.job["mlflow"]),
        experiment=str(plan.job.get("experiment", plan.cfg.mlflow.experiment)),
        final_metrics=dict(record.get("final_metrics") or {}),
        epochs_done=epochs,
        start_epoch=epochs,
        resumed=None,
        state_digests=[],
        selected=dict(record.get("selected") or {}),
        models=dict(record.get("models") or {}),
    )


def open_training_run(
    plan: RunPlan, echo: Echo, parent: tracking.RunRef | None = None, extra_tags: dict[str, Any] | None = None
) -> tuple[Any, tracking.RunRef]:
    """Reopen the run of a resumed job, or create (or adopt) the job's run with its params and config.

    With `parent` (a sweep), the run is created as a nested child in the parent's store and
    experiment (MLflow's `mlflow.parentRunId` tag).
    """
    cfg = plan.cfg
    params = {**flatten(cfg), "git_commit": tracking.git_commit()}
    tags = {"rna.run_dir": plan.run_dir, "rna.entry_point": "jobs/train.py", "rna.git_dirty": str(tracking.git_dirty())}
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    owner = {"rna.run_dir": plan.run_dir, JOB_FILE_TAG: "pending"}  # see JOB_FILE_TAG
    reopen = tracking.RunRef.from_dict(plan.job["mlflow"]) if plan.job and plan.job.get("mlflow") else None
    if parent is not None:
        uri, exp_id = parent.tracking_uri, parent.experiment_id
        owner["mlflow.parentRunId"] = parent.run_id
    else:
        uri, exp_id = (reopen.tracking_uri if reopen else tracking.resolve_tracking_uri(base_dir())), None
    opened = tracking.open_run(
        uri,
        cfg.mlflow.experiment,
        plan.run_name,
        params,
        tags,
        reopen=reopen,
        owner=owner,
        experiment_id=exp_id,
        if_missing=cfg.mlflow.if_run_missing,
        named_by=join(plan.run_dir, JOB_FILE),
    )
    if opened.how == "reopened":
        changed = opened.changed
        echo(
            f"resuming MLflow run {opened.ref.run_id}"
            + (f" (changed: {', '.join(sorted(changed))})" if changed else "")
        )
    elif opened.how == "adopted":
        echo(f"reusing MLflow run {opened.ref.run_id} of an earlier attempt stopped before {JOB_FILE} was written")
    return opened.client, opened.ref


def build_trainer(
    cfg: Config, run_name: str, loop_config: dict[str, Any], device: DeviceChoice, callbacks: list | None = None
):
    """The TorchTrainer for `cfg`: DDP over gloo on CPU, NCCL on GPU; checkpoints in storage_path.

    `callbacks` go to the Train RunConfig (a sweep trial passes Tune's report callback).
    """
    use_gpu = device.use_gpu
    resources: dict[str, float] = {"CPU": float(cfg.ray.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(cfg.ray.gpus_per_worker)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=device.backend),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our workers print one line per epoch
            callbacks=list(callbacks or []),
        ),
    )


def run_training(
    cfg: Config,
    *,
    config_path: str | None = None,
    resume: str | None = None,
    echo: Echo = print,
    fail_after_epoch: int | None = None,
    parent_run: tracking.RunRef | None = None,
    run_tags: dict[str, Any] | None = None,
    trainer_callbacks: list | None = None,
    end_run_on_failure: bool = True,
) -> TrainingOutcome:
    """Train `cfg` on Ray and track it in MLflow; returns where everything is.

    `fail_after_epoch` is a test hook: the last worker raises once after that epoch, so the
    FailureConfig retry path (resume from the checkpoint into the same MLflow run) is exercised.
    A sweep trial (pipelines.sweep.trial) passes `parent_run` (its MLflow run becomes a nested
    child of the sweep's run), `run_tags`, and `trainer_callbacks` (Tune's report callback).
    `end_run_on_failure=False` leaves a run that did not finish RUNNING for the caller to end:
    a sweep trial fails with ActorDiedError when Tune stops it (ASHA, Ctrl+C), so only the
    sweep's driver, which knows Tune's status, can tell FINISHED (stopped early) from FAILED.
    """
    if parent_run is None:  # before the run folder is looked up there: S3 clients retry for minutes
        check_object_store(resume or cfg.ray.storage_path, "--resume" if resume else "ray.storage_path")
    plan = plan_run(cfg, config_path, resume)
    cfg = plan.cfg
    check_training_config(cfg)
    finished = already_finished(plan)
    if finished is not None:
        echo(
            f"run {plan.run_name} already trained {finished.epochs_done} of train.epochs={cfg.train.epochs} epochs; "
            f"nothing to do (to train on, resume with a larger train.epochs)"
        )
        return finished
    check_data(cfg, echo)
    if parent_run is None and not plan.job:  # a new run goes to the local store: it must be creatable
        check_tracking_store(tracking.resolve_tracking_uri(base_dir()))
    if parent_run is None and plan.job and plan.job.get("mlflow"):  # a lost run: one line before Ray starts
        named_by = join(plan.run_dir, JOB_FILE)
        tracking.check_reopen(tracking.RunRef.from_dict(plan.job["mlflow"]), cfg.mlflow.if_run_missing, named_by)
    if parent_run is None:  # a sweep trial runs inside the sweep's Ray, checked by the sweep
        stored = ((plan.job or {}).get("mlflow") or {}).get("tracking_uri")
        check_cluster(cfg, stored or tracking.resolve_tracking_uri(base_dir()))  # one line in seconds
    ensure_ray(cfg, echo)
    device = choose_training_device(cfg, gpu_capacity())  # refuses before the run is opened

    client, ref = open_training_run(plan, echo, parent_run, run_tags)
    status = "FAILED"
    try:
        job_record = {
            "format": 1,
            "run_name": plan.run_name,
            "config": flatten(cfg),
            "mlflow": ref.to_dict(),
            "experiment": cfg.mlflow.experiment,
            "created": (plan.job or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": tracking.git_commit(),
        }
        write_job_file(plan.run_dir, job_record)
        tracking.set_tags(client, ref.run_id, {JOB_FILE_TAG: "written"})
        tracking.log_text(client, ref.run_id, "config.yaml", dump_yaml(cfg))
        verb = "resuming" if plan.job else "starting"
        echo(
            f"{verb} run {plan.run_name}: {cfg.model.name} {cfg.model.method} '{cfg.model.norm}', "
            f"{cfg.train.epochs} epochs, {cfg.ray.num_workers} worker(s); folder {plan.run_dir}"
        )

        echo(device.line(cfg))
        tracking.log_new_params(client, ref.run_id, device.params())
        loop_config = {"config": flatten(cfg), "run_name": plan.run_name, "mlflow": ref.to_dict()}
        if fail_after_epoch is not None:
            loop_config["fail_after_epoch"] = int(fail_after_epoch)
        result = build_trainer(cfg, plan.run_name, loop_config, device, trainer_callbacks).fit()
        out = result.return_value or {}

        checkpoint_file, last = None, None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as ckpt_dir:
                client.log_artifacts(ref.run_id, ckpt_dir, "checkpoint")
                last = read_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE)
            checkpoint_file = join(result.checkpoint.path, CHECKPOINT_FILE)
        final = dict(out.get("final", {}))
        selected = dict(out.get("selected") or {})
        for which, info in selected.items():  # beside checkpoint/ (the last epoch): selected_<which>/
            log_folder(client, ref.run_id, info["checkpoint"].rsplit("/", 1)[0], f"selected_{which}")
        tracking.set_tags(client, ref.run_id, selection_tags(cfg, selected))
        models: dict[str, dict[str, str | None]] = {}
        if last is not None:  # the MLflow models: loadable by URI, registered on request
            val = read_selected(selected["val"]["checkpoint"].rsplit("/", 1)[0]) if "val" in selected else None
            refs = log_run_models(client, ref, cfg, last, val, final, out, int(out.get("epochs_done", 0)))
            models = {which: model_record(r) for which, r in refs.items()}
            tracking.set_tags(client, ref.run_id, {f"rna.model.{w}": m["run_uri"] for w, m in models.items()})
        card = render_model_card(
            cfg,
            final,
            run_name=plan.run_name,
            run_id=ref.run_id,
            checkpoint=checkpoint_file,
            num_paths=count_paths(model_structure(cfg)),
            epochs_done=out.get("epochs_done"),
            git_commit=tracking.git_commit(),
            selected=selected,
            models=models,
        )
        tracking.log_text(client, ref.run_id, "model_card.md", card)
        epochs_done = int(out.get("epochs_done", 0))
        if epochs_done >= cfg.train.epochs:  # a rerun of the same command then starts nothing
            job_record["finished"] = {
                "epochs": epochs_done,
                "checkpoint": checkpoint_file,
                "final_metrics": final,
                "selected": selected,
                "models": models,
            }
            write_job_file(plan.run_dir, job_record)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status == "FINISHED" or end_run_on_failure:
            tracking.end_run(client, ref.run_id, status)

    return TrainingOutcome(
        run_name=plan.run_name,
        run_dir=plan.run_dir,
        checkpoint=checkpoint_file,
        mlflow=ref,
        experiment=cfg.mlflow.experiment,
        final_metrics=final,
        epochs_done=int(out.get("epochs_done", 0)),
        start_epoch=int(out.get("start_epoch", 0)),
        resumed=out.get("resumed"),
        state_digests=list(out.get("state_digests", [])),
        last_epoch_metrics=dict(out.get("last_epoch", {})),
        selected=selected,
        models=models,
    )


__all__ = [
    "JOB_FILE_TAG",
    "RunPlan",
    "TrainingOutcome",
    "already_finished",
    "build_trainer",
    "load_resume_config",
    "model_record",
    "open_training_run",
    "plan_run",
    "run_training",
    "selection_tags",
]
