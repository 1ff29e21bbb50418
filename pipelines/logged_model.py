"""The trained network as an MLflow model: logged with its run, registered on request, found by URI.

What a user gets from `mlflow.pytorch.load_model("models:/<name>@<alias>")` (or
`runs:/<run id>/model`) is a `rna_core.inference.FreshPathModel`: the network that draws a fresh
path before every forward, as RNA inference does (its description says so). It is saved with
pickle, not `torch.export`: a path drawn per forward is control flow that an exported graph would
freeze into one path. The pickle refers to rna_core's classes, so rna_core travels with the model
(`code/rna_core`, MLflow puts it on `sys.path` when loading): a notebook needs torch, numpy,
pyarrow, pyyaml and pillow (the logged requirements), not this repository.

The weights also travel as rna_core's checkpoint (`extra_files/checkpoint.pt`, no optimizer
state): `jobs/evaluate.py --model-uri` reads that with `torch.load(weights_only=True)` and checks it
against its config as it checks any checkpoint, and never unpickles code.

Everything goes through an explicit `MlflowClient` (create the logged model, save it with
`mlflow.pytorch.save_model`, upload, finalize, register): the fluent `log_model` would resolve the
experiment from process-global state (`MLFLOW_EXPERIMENT_ID`, see pipelines.tracking).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rna_core
from rna_core.builders import model_from_config
from rna_core.config import Config, flatten
from rna_core.evaluation import final_metric_names
from rna_core.inference import FreshPathModel

MODEL_NAME = "model"  # the last epoch: runs:/<run id>/model
CHECKPOINT_IN_MODEL = "extra_files/checkpoint.pt"
NOTE_TAG = "mlflow.note.content"  # the description MLflow's UI shows
REQUIREMENTS = ("torch", "numpy", "pyarrow", "pyyaml", "pillow")  # what rna_core imports to load a model


def model_name(which: str | None) -> str:
    """`model` for the last epoch, `model_selected_<which>` for a selected epoch's weights."""
    return MODEL_NAME if which is None else f"{MODEL_NAME}_selected_{which}"


@dataclass(frozen=True)
class LoggedModelRef:
    """Where a logged model is: its id and URIs, and its registered version when there is one."""

    model_id: str
    name: str
    run_id: str
    registered: str | None = None  # models:/<name>/<version>
    alias_uri: str | None = None  # models:/<name>@<alias>

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"

    @property
    def run_uri(self) -> str:
        return f"runs:/{self.run_id}/{self.name}"


def requirements() -> list[str]:
    """Exact pins of what loading the model imports (the versions this job runs)."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def inference_model(cfg: Config, state: Mapping[str, torch.Tensor]) -> FreshPathModel:
    """The network of `cfg` with `state`, in eval mode, drawing a fresh path per forward."""
    net = model_from_config(cfg)
    net.load_state_dict(dict(state))
    return FreshPathModel(net.eval(), strategy=cfg.train.sampling, seed=cfg.train.seed).eval()


def describe(model: FreshPathModel, cfg: Config, label: str, epoch: int) -> str:
    """The model's description (logged model, registered version): what it is and what a forward does."""
    return (
        f"{cfg.model.name} {cfg.model.method} '{cfg.model.norm}' on {cfg.data.dataset}, {label} (epoch {epoch}). "
        + model.describe()
        + " Evaluate it with `python jobs/evaluate.py --model-uri <this model's URI>`."
    )


def _code_copy(folder: Path) -> str:
    """rna_core without caches, for `code_paths`."""
    target = folder / "rna_core"
    shutil.copytree(Path(rna_core.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


class _QuietPickleWarning(logging.Filter):
    """MLflow warns on every pickled model; ours is pickled on purpose (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


def log_trained_model(
    client: Any,
    run: Any,  # tracking.RunRef
    cfg: Config,
    payload: Mapping[str, Any],
    *,
    which: str | None,
    metrics: Mapping[str, float],
    input_example: np.ndarray,
    step: int,
    metric_dataset: Mapping[str, str] | None = None,
    register_as: str | None = None,
    alias: str | None = None,
) -> LoggedModelRef:
    """Log the checkpoint `payload` (rna_core format, as read with weights_only) of run `run` as an MLflow model.

    `which` is None for the last epoch, else the selection ("val"). `metrics` (the model's final
    accuracies, as the run logged them at `step`) are linked to the model (and to
    `metric_dataset`, the evaluation input), so the UI's model list shows them. `register_as`
    registers a new version under that name and points `alias` at it.
    """
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model, infer_signature

    epoch = int(payload.get("epoch", 0))
    net = inference_model(cfg, payload["model"])
    label = "the last epoch" if which is None else f"the epoch selected on {which}"
    description = describe(net, cfg, label, epoch)
    example = np.array(input_example, dtype=np.float32, copy=True)  # writable: torch.from_numpy below
    with torch.no_grad():
        logits = net(torch.from_numpy(example)).numpy()
    net.reseed(net.seed)  # the signature's forward drew a path: a loaded model starts at the seed
    tags = {
        NOTE_TAG: description,
        "rna.checkpoint": label,
        "rna.epoch": str(epoch),
        "rna.sampling": net.strategy,
        "rna.paths": str(net.num_paths),
        "rna.inference_seed": str(net.seed),
    }
    name = model_name(which)
    logged = client.create_logged_model(
        run.experiment_id,
        name=name,
        source_run_id=run.run_id,
        tags=tags,
        params={k: str(v)[:6000] for k, v in flatten(cfg).items()},
        model_type=f"{cfg.model.method} {cfg.model.name}",
    )
    try:
        client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        weights = {**dict(payload), "optimizer": None, "scheduler": None}  # the network only
        mlflow_model = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=run.run_id,
            model_id=logged.model_id,
            metadata={"rna": {"checkpoint": CHECKPOINT_IN_MODEL, "which": which or "last", "epoch": epoch}},
        )
        with tempfile.TemporaryDirectory(prefix="rna-mlflow-model-") as tmp:
            folder = Path(tmp)
            torch.save(weights, folder / "checkpoint.pt")
            quiet = _QuietPickleWarning()
            logging.getLogger("mlflow.pytorch").addFilter(quiet)
            try:
                mlflow.pytorch.save_model(
                    net,
                    str(folder / "model"),
                    mlflow_model=mlflow_model,
                    signature=infer_signature(example, logits),
                    input_example=example,
                    code_paths=[_code_copy(folder)],
                    extra_files=[str(folder / "checkpoint.pt")],
                    pip_requirements=requirements(),
                    serialization_format="pickle",
                )
            finally:
                logging.getLogger("mlflow.pytorch").removeFilter(quiet)
            client.log_model_artifacts(logged.model_id, str(folder / "model"))
        now = int(time.time() * 1000)
        linked = [
            Metric(k, float(v), now, int(step), model_id=logged.model_id, **dict(metric_dataset or {}))
            for k, v in metrics.items()
        ]
        if linked:
            client.log_batch(run.run_id, metrics=linked)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    ref = LoggedModelRef(logged.model_id, name, run.run_id)
    if register_as:
        ref = register(client, ref, register_as, alias, description)
    return ref


def register(client: Any, ref: LoggedModelRef, name: str, alias: str | None, description: str) -> LoggedModelRef:
    """A new version of registered model `name` from the logged model, with `alias` pointing at it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Models trained by jobs/train.py (rna-platform).")
    except MlflowException:
        pass  # it exists (or was created concurrently by another trial): add a version
    version = client.create_model_version(
        name, source=ref.uri, run_id=ref.run_id, model_id=ref.model_id, description=description
    )
    alias_uri = None
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
        alias_uri = f"models:/{name}@{alias}"
    return LoggedModelRef(ref.model_id, ref.name, ref.run_id, f"models:/{name}/{version.version}", alias_uri)


def log_run_models(
    client: Any,
    run: Any,
    cfg: Config,
    last: Mapping[str, Any],
    selected_val: Mapping[str, Any] | None,
    final: Mapping[str, float],
    worker_out: Mapping[str, Any],
    epochs_done: int,
) -> dict[str, LoggedModelRef]:
    """A training run's models: the last epoch's (`model`, registered when `mlflow.registered_model` is
    set) and the one selected on the validation split (`model_selected_val`), each with its final
    accuracies. (A test-set selection is biased and stays a plain artifact.)"""
    names = list(final_metric_names(cfg.train).values())
    common = dict(
        input_example=worker_out["input_example"], step=epochs_done, metric_dataset=worker_out.get("eval_dataset")
    )
    refs = {
        "last": log_trained_model(
            client,
            run,
            cfg,
            last,
            which=None,
            metrics={n: final[n] for n in names if n in final},
            register_as=cfg.mlflow.registered_model,
            alias=cfg.mlflow.model_alias,
            **common,
        )
    }
    if selected_val is not None:
        scores = {f"val_selected_{n}": final[f"val_selected_{n}"] for n in names if f"val_selected_{n}" in final}
        refs["val"] = log_trained_model(client, run, cfg, selected_val, which="val", metrics=scores, **common)
    return refs


__all__ = [
    "CHECKPOINT_IN_MODEL",
    "LoggedModelRef",
    "MODEL_NAME",
    "describe",
    "inference_model",
    "log_run_models",
    "log_trained_model",
    "model_name",
    "register",
    "requirements",
]
