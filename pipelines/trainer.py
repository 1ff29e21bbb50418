"""The driver of a training job: validate, open the MLflow run, start Ray, fit, log, close.

Order matters for users: everything that can be wrong in their input (config, data location,
a model that cannot be built, a resume folder that does not fit) is checked before Ray starts
or an MLflow run is created, so a mistake costs one line and leaves nothing behind.

Where things go. Relative paths in a config (`ray.storage_path`, `data.data_dir`) and the
default MLflow store (`mlflow.db`, `mlruns/`) resolve against a base folder: `$RNA_BASE_DIR`
if set, else the current directory. Under `ray job submit` the current directory is Ray's
temporary copy of the working dir (deleted later, without the git-ignored data), so there the
base is `~/rna_platform` unless `RNA_BASE_DIR` says otherwise (`infra/start_local.sh` sets it
to the repository, so jobs submitted to that cluster write where `mlflow ui` looks).

Runs and resumes. A job is one Ray Train run `<storage_path>/<run name>` and one MLflow run.
The driver writes `rna_job.json` into the run folder (config, MLflow run id and store), and
each epoch checkpoint carries the MLflow run id too. Running again with the same run name (or
`--resume <run folder>`) continues from the last checkpoint (Ray Train V2 finds it in the
folder) into the same MLflow run; so does a retry after a worker failure (`ray.max_failures`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from rna_core.config import Config, apply_overrides, config_from_dict, dump_yaml, flatten, to_dict, unflatten
from rna_core.errors import ConfigError, DatasetNotFoundError
from rna_core.paths import check_strategy

from . import tracking
from .model_card import render_model_card
from .train_loop import CHECKPOINT_FILE, build_model, effective_train_config, train_loop_per_worker

JOB_FILE = "rna_job.json"
# "pending" from the MLflow run's creation until the run folder's job file names it, then "written".
# A run still "pending" belongs to an attempt stopped in between (Ctrl+C, a killed trial): the next
# attempt at the same run folder adopts it instead of leaving an orphan beside a second run.
JOB_FILE_TAG = "rna.job_file"
BASE_DIR_ENV = "RNA_BASE_DIR"
JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver
MODEL_IDENTITY_KEYS = ("model.name", "model.method", "model.norm", "model.precisions", "data.dataset")

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


# ----------------------------------------------------------------------------- paths


def under_job_submission() -> bool:
    return JOB_SUBMISSION_ENV in os.environ


def base_dir() -> Path:
    """The folder relative paths resolve against (see the module docstring)."""
    env = os.environ.get(BASE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    if under_job_submission():
        return (Path.home() / "rna_platform").resolve()
    return Path.cwd().resolve()


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str, base: Path) -> str:
    return path if _is_uri(path) else str((base / Path(path).expanduser()).resolve())


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Make `ray.storage_path` and `data.data_dir` absolute, so workers (other cwd) agree."""
    base = base or base_dir()
    data_dir = cfg.data.data_dir
    if cfg.data.dataset != "synthetic":
        data_dir = _absolute(data_dir or "./data", base)
    return replace(
        cfg,
        data=replace(cfg.data, data_dir=data_dir),
        ray=replace(cfg.ray, storage_path=_absolute(cfg.ray.storage_path, base)),
    )


def _fs(path: str):
    import pyarrow.fs as pafs

    if _is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _join(base: str, leaf: str) -> str:
    return f"{base.rstrip('/')}/{leaf}" if _is_uri(base) else str(Path(base) / leaf)


def read_job_file(run_dir: str, name: str = JOB_FILE) -> dict[str, Any] | None:
    """The `rna_job.json` (or `name`) of a run folder, or None when the folder holds no job of ours."""
    import pyarrow.fs as pafs

    fs, path = _fs(_join(run_dir, name))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read().decode(errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{_join(run_dir, name)} is not valid JSON ({e.msg}); restore it or choose another run folder") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{_join(run_dir, name)} does not hold a job record; restore it or choose another run folder")
    return data


def write_job_file(run_dir: str, data: dict[str, Any], name: str = JOB_FILE) -> None:
    """Write `rna_job.json` (or `name`, e.g. a sweep's file) atomically on local disks."""
    text = json.dumps(data, indent=1, sort_keys=True)
    if _is_uri(run_dir):
        fs, path = _fs(_join(run_dir, name))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, Path(run_dir) / name)


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


# ----------------------------------------------------------------------------- validation


def check_writable_folder(path: str, what: str) -> None:
    """ConfigError unless the local folder `path` exists or can be created, and can be written.

    Checked on the nearest existing ancestor, creating nothing, so a bad `ray.storage_path`,
    `--out` or MLflow store is one line before any run is opened (not a traceback after it).
    URIs (s3://, gs://, http://) are left to their clients.
    """
    if _is_uri(path) and not path.startswith("file://"):
        return
    target = Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {target} cannot be created: {probe} is a file, not a folder; choose another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {target} is not writable (no write permission on {probe}); choose another place")


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """The MLflow store must be usable: a local one creatable, a tracking server answering.

    An unreachable server otherwise hangs in MLflow's own retries for minutes before the first
    run is created; here it is one line after `timeout_s`.
    """
    if uri.startswith("sqlite:///"):
        check_writable_folder(str(Path(uri[len("sqlite:///"):]).parent), "the MLflow store's folder")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # the server answered (a proxy may not route /health): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"the MLflow tracking server {uri} is not reachable ({reason}); start it or fix MLFLOW_TRACKING_URI") from None
    elif "://" not in uri:
        check_writable_folder(uri, "the MLflow store")


def load_resume_config(run_dir: str, overrides: list[str] | None = None) -> Config:
    """The config stored with a run (for `--resume` without `--config`), with overrides applied."""
    job = read_job_file(run_dir)
    if job is None:
        raise ConfigError(f"'{run_dir}' is not a training run folder (no {JOB_FILE}); pass the run folder printed by jobs/train.py")
    stored = unflatten(job["config"])
    return config_from_dict(apply_overrides(to_dict(stored), overrides or []))


def check_compatible(stored_flat: dict[str, Any], cfg: Config, run_dir: str) -> None:
    """A resumed run must train the same network; refuse a different model before Ray starts."""
    flat = flatten(cfg)
    for key in MODEL_IDENTITY_KEYS:
        if key in stored_flat and str(stored_flat[key]) != str(flat.get(key)):
            raise ConfigError(
                f"cannot resume {run_dir}: it trains {key}={stored_flat[key]} but the config says {flat.get(key)}; "
                "resume with the run's own config (omit --config) or pick a new mlflow.run_name"
            )


def check_data(cfg: Config, echo: Echo | None = None) -> None:
    """Fail fast (one line) when the dataset is not where the config says; download once if asked.

    Downloading here, on the driver, keeps N workers from racing to download into one folder.
    """
    d = cfg.data
    if d.dataset == "synthetic":
        return
    from rna_core.data.parquet import check_parquet_dataset, dataset_exists, dataset_rows
    from rna_core.data.torchvision_data import _FOLDERS, load_torchvision_cifar

    root = d.data_dir or "./data"
    for split in ("train", "test"):
        if dataset_exists(_join(root, f"{split}.parquet")):
            check_parquet_dataset(_join(root, f"{split}.parquet"))  # corrupt or foreign: one line, before Ray
            if split == "train":
                check_val_size(cfg, dataset_rows(_join(root, "train.parquet")))
            continue
        if _is_uri(root):
            raise DatasetNotFoundError(
                f"no {split}.parquet under {root}; upload the files written by "
                f"`python jobs/prepare_data.py --dataset {d.dataset} --out DIR` there"
            )
        if (Path(root) / _FOLDERS[d.dataset]).is_dir():
            if split == "train":
                check_val_size(cfg, 50_000)  # CIFAR-10 and CIFAR-100 both have 50,000 training images
            continue
        if d.download:
            if echo:
                echo(f"downloading {d.dataset} ({split}) to {root} ...")
            load_torchvision_cifar(d.dataset, root=root, train=split == "train", download=True)
            if split == "train":
                check_val_size(cfg, 50_000)
            continue
        raise DatasetNotFoundError(
            f"{d.dataset} data not found in {root} (neither {split}.parquet nor torchvision files); "
            f"run `python jobs/prepare_data.py --dataset {d.dataset} --out DIR` and set data.data_dir=DIR, "
            "or set data.download=true"
        )


def check_val_size(cfg: Config, train_rows: int) -> None:
    """The validation split must leave every worker training rows (one line before Ray, not in a worker)."""
    d = cfg.data
    if d.val_size and train_rows - d.val_size < cfg.ray.num_workers:
        raise ConfigError(
            f"data.val_size ({d.val_size}) leaves {max(train_rows - d.val_size, 0)} of the {train_rows} training images "
            f"for {cfg.ray.num_workers} worker(s); lower data.val_size"
        )


def preflight(cfg: Config) -> None:
    """Checks that need no data and no cluster: the model builds, the batch fits the workers."""
    import torch

    effective_train_config(cfg)  # method-specific training choices can contradict each other
    try:
        with torch.device("meta"):  # builds the layer structure without allocating weights
            structure = build_model(cfg)
    except ConfigError:
        raise
    except (NotImplementedError, RuntimeError):  # a layer that cannot be built on meta
        structure = build_model(cfg)
    check_strategy(structure, cfg.train.sampling)  # e.g. a fixed: path of the wrong length
    check_writable_folder(cfg.ray.storage_path, "ray.storage_path")
    if cfg.data.batch_size < cfg.ray.num_workers:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) is the global batch and must be >= ray.num_workers "
            f"({cfg.ray.num_workers}); raise the batch or use fewer workers"
        )
    if cfg.data.dataset == "synthetic":
        n = cfg.data.train_limit or cfg.data.synthetic_size
        if min(n, cfg.data.synthetic_size) < cfg.ray.num_workers:
            raise ConfigError(f"the training set ({n} images) is smaller than ray.num_workers ({cfg.ray.num_workers})")
        check_val_size(cfg, cfg.data.synthetic_size)


# ----------------------------------------------------------------------------- Ray


def ensure_ray(cfg: Config, echo: Echo | None = None) -> None:
    """Connect to a cluster (`ray.address`, `RAY_ADDRESS`, or one started with `ray start`), or start one.

    `ray.address: local` always starts a private local instance (tests, or a laptop where
    someone else's cluster runs).
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    needed = math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    # The dashboard is on because Train V2's placement-group cleaner polls the State API (served
    # by the dashboard) and logs a warning every second without it; it listens on localhost only.
    local_kwargs = dict(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, dashboard_host="127.0.0.1")
    if address == "local":
        ray.init(address="local", **local_kwargs)
        return
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")  # a cluster started with `ray start` on this machine
        if echo:
            echo("connected to the running Ray cluster")
    except ConnectionError:
        ray.init(**local_kwargs)


def resolve_use_gpu(cfg: Config) -> bool:
    flag = str(cfg.ray.use_gpu).lower()
    if flag in ("true", "false"):
        return flag == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_trainer(cfg: Config, run_name: str, loop_config: dict[str, Any], use_gpu: bool, callbacks: list | None = None):
    """The TorchTrainer for `cfg`: DDP over gloo on CPU, NCCL on GPU; checkpoints in storage_path.

    `callbacks` go to the Train RunConfig (a sweep trial passes Tune's report callback).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": float(cfg.ray.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(cfg.ray.gpus_per_worker)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
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


# ----------------------------------------------------------------------------- the job


@dataclass
class RunPlan:
    cfg: Config
    run_name: str
    run_dir: str
    job: dict[str, Any] | None  # the existing job file when resuming


def resolve_run_dir(run_dir: str) -> str:
    """The absolute form of a run folder given on the command line (`--resume`)."""
    return _absolute(run_dir.rstrip("/"), base_dir())


def plan_run(cfg: Config, config_path: str | None = None, resume: str | None = None) -> RunPlan:
    """Decide the run folder: `--resume DIR`, the configured run name, or a fresh timestamped one."""
    base = base_dir()
    if resume:
        run_dir = resolve_run_dir(resume)
        job = read_job_file(run_dir)
        if job is None:
            raise ConfigError(f"'{resume}' is not a training run folder (no {JOB_FILE}); pass the run folder printed by jobs/train.py")
        storage, name = run_dir.rsplit("/", 1)
        cfg = resolve_paths(replace(cfg, ray=replace(cfg.ray, storage_path=storage)), base)
        check_compatible(job["config"], cfg, run_dir)
        return RunPlan(cfg, name, run_dir, job)
    cfg = resolve_paths(cfg, base)
    if cfg.mlflow.run_name:
        name = cfg.mlflow.run_name
        run_dir = _join(cfg.ray.storage_path, name)
        job = read_job_file(run_dir)
        if job is None and _exists(run_dir):
            raise ConfigError(f"{run_dir} exists but was not written by jobs/train.py; choose another mlflow.run_name")
        if job is not None:
            check_compatible(job["config"], cfg, run_dir)
        return RunPlan(cfg, name, run_dir, job)
    stem = Path(config_path).stem if config_path else "train"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, i = name, 1
    while _exists(_join(cfg.ray.storage_path, candidate)):
        i += 1
        candidate = f"{name}-{i}"
    return RunPlan(cfg, candidate, _join(cfg.ray.storage_path, candidate), None)


def already_finished(plan: RunPlan) -> TrainingOutcome | None:
    """The outcome recorded by a run that already trained all of `plan.cfg.train.epochs`, else None.

    Rerunning the command of a finished run used to start Ray, set its MLflow run back to
    RUNNING and log the final evaluation a second time.
    """
    record = (plan.job or {}).get("finished")
    if not record or int(record.get("epochs", 0)) < plan.cfg.train.epochs:
        return None
    epochs = int(record["epochs"])
    return TrainingOutcome(
        run_name=plan.run_name, run_dir=plan.run_dir, checkpoint=record.get("checkpoint"),
        mlflow=tracking.RunRef.from_dict(plan.job["mlflow"]), experiment=str(plan.job.get("experiment", plan.cfg.mlflow.experiment)),
        final_metrics=dict(record.get("final_metrics") or {}), epochs_done=epochs, start_epoch=epochs, resumed=None, state_digests=[],
        selected=dict(record.get("selected") or {}),
    )


def _open_mlflow_run(
    plan: RunPlan, echo: Echo, parent: tracking.RunRef | None = None, extra_tags: dict[str, Any] | None = None
) -> tuple[Any, tracking.RunRef]:
    """Reopen the run of a resumed job, or create the job's run with its params and config.

    With `parent` (a sweep), the run is created as a nested child in the parent's store and
    experiment (MLflow's `mlflow.parentRunId` tag).
    """
    cfg = plan.cfg
    params = {**flatten(cfg), "git_commit": tracking.git_commit()}
    tags = {"rna.run_dir": plan.run_dir, "rna.entry_point": "jobs/train.py", "rna.git_dirty": str(tracking.git_dirty())}
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    if plan.job and plan.job.get("mlflow"):
        ref = tracking.RunRef.from_dict(plan.job["mlflow"])
        client = tracking.client_for(ref.tracking_uri)
        changed = tracking.reopen_run(client, ref.run_id, params)
        echo(f"resuming MLflow run {ref.run_id}" + (f" (changed: {', '.join(sorted(changed))})" if changed else ""))
        return client, ref
    owner = {"rna.run_dir": plan.run_dir, JOB_FILE_TAG: "pending"}  # see JOB_FILE_TAG
    if parent is not None:
        uri, exp_id = parent.tracking_uri, parent.experiment_id
        client = tracking.client_for(uri)
        owner["mlflow.parentRunId"] = parent.run_id
    else:
        uri = tracking.resolve_tracking_uri(base_dir())
        client = tracking.client_for(uri)
        exp_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment, tracking.artifact_root_for(uri))
    run_id, adopted = tracking.start_or_adopt_run(client, exp_id, plan.run_name, params, tags, owner)
    if adopted:
        echo(f"reusing MLflow run {run_id} of an earlier attempt stopped before {JOB_FILE} was written")
    return client, tracking.RunRef(uri, exp_id, run_id)


def _log_text(client: Any, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="rna-artifact-") as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        client.log_artifact(run_id, str(p), artifact_path)


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
    A sweep trial (pipelines/sweep.py) passes `parent_run` (its MLflow run becomes a nested
    child of the sweep's run), `run_tags`, and `trainer_callbacks` (Tune's report callback).
    `end_run_on_failure=False` leaves a run that did not finish RUNNING for the caller to end:
    a sweep trial fails with ActorDiedError when Tune stops it (ASHA, Ctrl+C), so only the
    sweep's driver, which knows Tune's status, can tell FINISHED (stopped early) from FAILED.
    """
    plan = plan_run(cfg, config_path, resume)
    cfg = plan.cfg
    preflight(cfg)
    finished = already_finished(plan)
    if finished is not None:
        echo(f"run {plan.run_name} already trained {finished.epochs_done} of train.epochs={cfg.train.epochs} epochs; "
             f"nothing to do (to train on, resume with a larger train.epochs)")
        return finished
    check_data(cfg, echo)
    if parent_run is None and not plan.job:  # a new run goes to the local store: it must be creatable
        check_tracking_store(tracking.resolve_tracking_uri(base_dir()))

    client, ref = _open_mlflow_run(plan, echo, parent_run, run_tags)
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
        _log_text(client, ref.run_id, "config.yaml", dump_yaml(cfg))
        verb = "resuming" if plan.job else "starting"
        echo(f"{verb} run {plan.run_name}: {cfg.model.name} {cfg.model.method} '{cfg.model.norm}', "
             f"{cfg.train.epochs} epochs, {cfg.ray.num_workers} worker(s); folder {plan.run_dir}")

        ensure_ray(cfg, echo)
        use_gpu = resolve_use_gpu(cfg)
        loop_config = {"config": flatten(cfg), "run_name": plan.run_name, "mlflow": ref.to_dict()}
        if fail_after_epoch is not None:
            loop_config["fail_after_epoch"] = int(fail_after_epoch)
        result = build_trainer(cfg, plan.run_name, loop_config, use_gpu, trainer_callbacks).fit()
        out = result.return_value or {}

        checkpoint_file = None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as ckpt_dir:
                client.log_artifacts(ref.run_id, ckpt_dir, "checkpoint")
            checkpoint_file = _join(result.checkpoint.path, CHECKPOINT_FILE)
        final = dict(out.get("final", {}))
        selected = dict(out.get("selected") or {})
        for which, info in selected.items():  # beside checkpoint/ (the last epoch): selected_<which>/
            _log_folder(client, ref.run_id, info["checkpoint"].rsplit("/", 1)[0], f"selected_{which}")
        tracking.set_tags(client, ref.run_id, selection_tags(cfg, selected))
        from rna_core import count_paths

        card = render_model_card(
            cfg, final, run_name=plan.run_name, run_id=ref.run_id, checkpoint=checkpoint_file,
            num_paths=count_paths(_meta_model(cfg)), epochs_done=out.get("epochs_done"),
            git_commit=tracking.git_commit(), selected=selected,
        )
        _log_text(client, ref.run_id, "model_card.md", card)
        epochs_done = int(out.get("epochs_done", 0))
        if epochs_done >= cfg.train.epochs:  # a rerun of the same command then starts nothing
            job_record["finished"] = {"epochs": epochs_done, "checkpoint": checkpoint_file, "final_metrics": final,
                                      "selected": selected}
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
    )


def selection_tags(cfg: Config, selected: dict[str, dict[str, Any]]) -> dict[str, str]:
    """MLflow tags saying which checkpoint each reported number comes from (rna_core.selection)."""
    tags = {"rna.result": "last epoch (checkpoint/); final_* metrics"}
    for which, info in selected.items():
        note = " (selected on the test set, the papers' way: biased upward)" if which == "test" else ""
        tags[f"rna.selected_on_{which}"] = (
            f"epoch {info['epoch']} by {info['metric']} {info['score']:.4f}; selected_{which}/, {which}_selected_* metrics{note}"
        )
    if cfg.train.select_on_test:
        tags["rna.selection_on_test_set"] = "true"
    return tags


def _log_folder(client: Any, run_id: str, folder: str, artifact_path: str) -> None:
    """Log a local folder or an object-store folder (copied to a temporary folder first) as artifacts."""
    if not _is_uri(folder):
        client.log_artifacts(run_id, folder, artifact_path)
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(folder)
    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs)
        client.log_artifacts(run_id, tmp, artifact_path)


def _meta_model(cfg: Config):
    """The model's structure without weights (for counting paths on the driver)."""
    import torch

    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (NotImplementedError, RuntimeError):
        return build_model(cfg)


__all__ = [
    "JOB_FILE",
    "JOB_FILE_TAG",
    "TrainingOutcome",
    "base_dir",
    "build_trainer",
    "check_data",
    "ensure_ray",
    "load_resume_config",
    "plan_run",
    "preflight",
    "read_job_file",
    "resolve_paths",
    "resolve_run_dir",
    "run_training",
]
