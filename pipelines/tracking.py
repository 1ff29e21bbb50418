"""MLflow helpers: where the store is, one run per job, params, metrics, and a clean end.

Everything goes through an explicit `MlflowClient(tracking_uri)` and explicit experiment and
run ids, never the fluent API's process-global state: a driver that ran `mlflow.set_experiment`
exports `MLFLOW_EXPERIMENT_ID`, which would otherwise silently redirect what a Ray worker logs.
The driver resolves the tracking URI once and hands it to the workers verbatim.

Every job opens its run through :func:`open_run`: reopen the run its job file names (a resume),
else adopt the run an interrupted attempt left behind (matched by owner tags), else create one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rna_core.errors import RnaError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlruns"
PARAM_MAX_CHARS = 6000  # MLflow's limit for one param value
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # model training, not GenAI (MLflow 3's UI reads this tag)


class RunMissingError(RnaError):
    """A job file names an MLflow run that its store does not hold (one line, exit code 2)."""


@dataclass(frozen=True)
class RunRef:
    """Everything a process needs to log into one MLflow run (plain strings: Ray pickles it)."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def to_dict(self) -> dict[str, str]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRef:
        return cls(str(data["tracking_uri"]), str(data["experiment_id"]), str(data["run_id"]))


def _absolute_sqlite(uri: str, base_dir: Path) -> str:
    """`sqlite:///mlflow.db` is relative to the current directory; make it absolute for workers."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base_dir / uri[len(prefix) :]).resolve())
    return uri


def resolve_tracking_uri(base_dir: str | os.PathLike | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store `<base_dir>/mlflow.db` (MLflow's own default)."""
    base = Path(base_dir or os.getcwd()).resolve()
    uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    if not uri:
        return f"sqlite:///{base / DEFAULT_DB_NAME}"
    if "://" not in uri:  # a bare folder means MLflow's file store
        return str((base / uri).resolve())
    return _absolute_sqlite(uri, base)


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store, else the server's choice.

    Set explicitly because MLflow otherwise uses `./mlruns` of whichever process creates the
    experiment first, which may be a worker in a Ray temp folder.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return None


def client_for(tracking_uri: str):  # -> mlflow.MlflowClient (imported lazily: mlflow takes ~1 s)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, creating it (with `artifact_location`) when missing.

    Every experiment a job uses is marked as model training (EXPERIMENT_KIND_TAG), unless someone
    chose another kind for it: MLflow 3's UI otherwise treats it as a GenAI experiment.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:  # created concurrently by another job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The commit of the code being run (`RNA_GIT_COMMIT` wins, e.g. in a container image)."""
    env = os.environ.get("RNA_GIT_COMMIT", "").strip()
    if env:
        return env
    where = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty(repo: str | os.PathLike | None = None) -> bool | None:
    """Whether tracked files differ from the commit (None when git or the repository is absent)."""
    where = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_MAX_CHARS else text[: PARAM_MAX_CHARS - 3] + "..."


def start_run(
    client: Any, experiment_id: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """Create a RUNNING run with `params` and `tags`; returns its id."""
    from mlflow.entities import Param, RunTag

    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])
    if not items:
        client.log_batch(run_id, tags=[RunTag("params", "none")])
    return run_id


def reopen_run(client: Any, run_id: str, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Mark an existing run RUNNING again (a resumed job) and reconcile its params.

    MLflow refuses to change a logged param, so params that differ on resume (e.g. a longer
    `train.epochs`) are recorded as tags `resume.changed.<key>` = "old -> new" instead; new
    keys are logged. Returns the changed keys with (old, new).
    """
    client.update_run(run_id, status="RUNNING")
    return log_new_params(client, run_id, params)


def log_new_params(client: Any, run_id: str, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Log params a running run does not have yet (e.g. values a worker decides, like `auto`).

    A key already logged with another value (a resumed run on other hardware) is recorded as tag
    `resume.changed.<key>` = "old -> new", since MLflow refuses to change a param. Returns those keys.
    """
    from mlflow.entities import Param, RunTag

    old = client.get_run(run_id).data.params
    new_params, tags, changed = [], [], {}
    for key, value in params.items():
        text = _param_value(value)
        if key not in old:
            new_params.append(Param(key, text))
        elif old[key] != text:
            changed[key] = (old[key], text)
            tags.append(RunTag(f"resume.changed.{key}", f"{old[key]} -> {text}"[:5000]))
    for i in range(0, max(len(new_params), len(tags)), 100):  # MLflow takes 100 params per batch
        client.log_batch(run_id, params=new_params[i : i + 100], tags=tags[i : i + 100])
    return changed


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log numeric `metrics` at `step` in one request (non-numbers are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, int(step))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def find_run(client: Any, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The newest run of `experiment_id` carrying all `tags` (exact values), or None."""
    if any("'" in str(v) for v in tags.values()):
        return None  # a value MLflow's filter syntax cannot quote: never adopt by guess
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=where, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def start_or_adopt_run(
    client: Any,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    owner: Mapping[str, str],
) -> tuple[str, bool]:
    """Reopen the newest run carrying all `owner` tags, else create one with `tags` and `owner`.

    Returns (run id, adopted). Lets an attempt that was stopped right after creating its run be
    continued by the next attempt, instead of leaving an orphan run beside a second one.
    """
    found = find_run(client, experiment_id, owner)
    if found is not None:
        reopen_run(client, found, params)
        return found, True
    return start_run(client, experiment_id, run_name, params, {**tags, **owner}), False


@dataclass
class OpenedRun:
    """The run a job logs into, and how it got it: "reopened", "adopted" or "created"."""

    client: Any
    ref: RunRef
    how: str
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # params that differ on a reopen


def open_run(
    tracking_uri: str,
    experiment: str | None,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    *,
    reopen: RunRef | None = None,
    owner: Mapping[str, str] | None = None,
    experiment_id: str | None = None,
    if_missing: str = "error",
    named_by: str = "the job file",
) -> OpenedRun:
    """The one way a job gets its MLflow run (training run, sweep parent, evaluation run).

    `reopen`: the run a job file (`named_by`) names (a resume). When its store no longer holds
    it (the store was deleted or replaced, or the run deleted), the job stops with one line
    (RunMissingError), unless `if_missing="new"` asks for a new run in `tracking_uri`. `owner`:
    tags that identify the job's run (e.g. its folder plus a "pending" marker) so that an attempt
    stopped after creating its run but before naming it in its job file is adopted instead of left
    beside a second run; they are set on a new run. `experiment_id` (a nested run: its parent's
    experiment) wins over the experiment name.
    """
    if reopen is not None and check_reopen(reopen, if_missing, named_by):
        client = client_for(reopen.tracking_uri)
        changed = reopen_run(client, reopen.run_id, params)
        return OpenedRun(client, reopen, "reopened", changed)
    client = client_for(tracking_uri)
    exp_id = experiment_id or get_or_create_experiment(client, str(experiment), artifact_root_for(tracking_uri))
    if owner:
        run_id, adopted = start_or_adopt_run(client, exp_id, run_name, params, tags, owner)
        return OpenedRun(client, RunRef(tracking_uri, exp_id, run_id), "adopted" if adopted else "created")
    return OpenedRun(client, RunRef(tracking_uri, exp_id, start_run(client, exp_id, run_name, params, tags)), "created")


def check_reopen(reopen: RunRef, if_missing: str = "error", named_by: str = "the job file") -> bool:
    """Whether the run a job file names can be reopened; RunMissingError (one line) when its store lost
    it, unless `if_missing="new"` (then False: a new run). Jobs call it before Ray starts too."""
    if run_exists(reopen):
        return True
    if if_missing != "new":
        raise RunMissingError(
            f"{named_by} names MLflow run {reopen.run_id}, which the store {reopen.tracking_uri} does not hold "
            "(deleted or replaced); point MLFLOW_TRACKING_URI at the store that holds it, or start fresh: "
            "--set mlflow.if_run_missing=new logs into a new run"
        )
    return False


def run_exists(ref: RunRef) -> bool:
    """Whether the store of `ref` holds its run, not deleted (a missing SQLite file is not created)."""
    from mlflow.exceptions import MlflowException

    if ref.tracking_uri.startswith("sqlite:///") and not Path(ref.tracking_uri[len("sqlite:///") :]).is_file():
        return False
    try:
        run = client_for(ref.tracking_uri).get_run(ref.run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def log_text(client: Any, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    """Log `text` as the artifact file `name` (under `artifact_path`)."""
    with tempfile.TemporaryDirectory(prefix="rna-artifact-") as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        client.log_artifact(run_id, str(p), artifact_path)


def end_run(client: Any, run_id: str, status: str = "FINISHED") -> None:
    """Terminate the run (FINISHED, FAILED or KILLED): a job never leaves a run RUNNING."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    client.set_terminated(run_id, status=status)


__all__ = [
    "OpenedRun",
    "RunMissingError",
    "RunRef",
    "artifact_root_for",
    "check_reopen",
    "client_for",
    "end_run",
    "find_run",
    "get_or_create_experiment",
    "git_commit",
    "git_dirty",
    "log_metrics",
    "log_text",
    "open_run",
    "reopen_run",
    "run_exists",
    "resolve_tracking_uri",
    "set_tags",
    "start_or_adopt_run",
    "start_run",
]
