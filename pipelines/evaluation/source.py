"""The model an evaluation scores: a training run's checkpoint (MLflow), a checkpoint file, or a
user's model (`--model module:factory --weights file`).

Loaded and checked on the driver (config, identity, every weight's shape) and nothing written:
an unknown run, a missing store or file, or weights that do not fit the model are one
ConfigError or CheckpointMismatchError before Ray starts.

A user's model is built on the driver by its factory with the weights loaded strictly
(rna_core.external). Ray workers import the same module. Nodes share no disk, and the module
often lives only in the folder the job started from; Ray's `py_modules` takes local folders only
in the job-level runtime env (`ray.init`, `ray job submit`), which this job does not own once Ray
is up. So the driver zips the module's top-level package folder (or its single .py file) and it
travels beside the weights; each worker process unpacks it once (`tasks.py`). A module found
among the installed packages does not travel: the nodes must have that package, as they have torch.
"""

from __future__ import annotations

import io
import re
import site
import sysconfig
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mlflow.exceptions import MlflowException

from rna_core.builders import model_structure
from rna_core.checkpoint import PREDATES_HINT, checkpoint_config, identity_mismatch, model_identity, read_checkpoint
from rna_core.config import Config, ScalingConfig, apply_overrides, config_from_dict, load_config, to_dict
from rna_core.distributed import state_digest
from rna_core.errors import CheckpointMismatchError, ConfigError
from rna_core.external import ExternalModel, load_into, read_weights
from rna_core.selection import SELECTION_LABELS, SELECTIONS

from .. import tracking
from ..checkpoints import CHECKPOINT_ARTIFACT, selected_artifact
from ..preflight import check_tracking_store
from ..run_folder import base_dir, resolve_paths


@dataclass
class ModelSource:
    """Where the weights come from, loaded and checked (no Ray, no MLflow writes)."""

    kind: str  # "run" or "checkpoint"
    label: str  # for the output folder name
    description: str  # for humans and the MLflow tag
    cfg: Config  # the model's config, with the overrides (and the `eval:` section) applied
    state: dict[str, torch.Tensor]
    weights_digest: str
    tracking_uri: str
    parent_run_id: str | None = None  # the training run (kind "run")
    parent_experiment_id: str | None = None
    training_run_id: str | None = None  # the run a bare checkpoint came from, when it says
    selection: str | None = None  # None: a last-epoch checkpoint; "val" | "test": a selected epoch (rna_core.selection)
    selected_epoch: int | None = None
    external: ExternalModel | None = None  # kind "external": the user's factory
    external_model: nn.Module | None = None  # built on the driver, weights loaded (for the plan's checks)
    code: bytes | None = None  # the zipped module the Ray workers import `external` from (user_code), if not installed

    def structure(self) -> nn.Module:
        """The model's layers, for checks and its path count: ours on the meta device, a user's as built."""
        return self.external_model if self.external_model is not None else model_structure(self.cfg)

    @property
    def checkpoint_label(self) -> str:
        """Which checkpoint of its run this is, as rows, tables and MLflow name it."""
        return SELECTION_LABELS[self.selection]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _config_of(payload: dict[str, Any], where: str, overrides: Sequence[str]) -> Config:
    cfg = checkpoint_config(payload)
    if cfg is None:
        raise ConfigError(f"checkpoint {where} holds no config; evaluate checkpoints written by jobs/train.py")
    # Where training ran (e.g. `ray.address: local`, `use_gpu: false`) says nothing about where
    # this evaluation runs: the ray section starts from the defaults (`--set ray.*` still applies).
    cfg = replace(cfg, ray=ScalingConfig())
    if overrides:
        cfg = config_from_dict(apply_overrides(to_dict(cfg), list(overrides)))
    return resolve_paths(cfg)


def checked_weights(payload: dict[str, Any], where: str, overrides: Sequence[str]) -> tuple[Config, dict, str]:
    """Config (with overrides and absolute paths), checked weights and their digest."""
    cfg = _config_of(payload, where, overrides)
    model = model_structure(cfg)
    mismatch = identity_mismatch(payload["identity"], model_identity(model), "config")
    if mismatch is not None:
        diffs, predates = mismatch
        hint = PREDATES_HINT if predates else "do not override model.* keys"
        raise CheckpointMismatchError(f"checkpoint {where} does not match its model settings ({diffs}); {hint}")
    state = payload["model"]
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {where} lacks weights for {missing[0]} (and {len(missing) - 1} more); it does not "
            "fit the model"
        )
    for key, tensor in model.state_dict().items():  # shapes too: a mismatch would only fail inside a Ray task
        got = tuple(getattr(state[key], "shape", ()))
        if got != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"checkpoint {where}: {key} has shape {list(got)}, the model needs {list(tensor.shape)}; it "
                "does not fit the model"
            )
    return cfg, state, state_digest(state)


def _local_checkpoint(path: str) -> Path:
    """A checkpoint path as given (relative to the current folder), else under the base folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (base_dir() / p).resolve()


def _selection_of(payload: Mapping[str, Any], where: str) -> tuple[str | None, int | None]:
    """(selection, epoch) a checkpoint says it holds: written by training as `selected_on`."""
    which = (payload.get("extra") or {}).get("selected_on")
    if which is None:
        return None, None
    if which not in SELECTIONS:
        raise ConfigError(
            f"checkpoint {where} says it was selected on '{which}', which this code does not know; update the code"
        )
    return str(which), int(payload.get("epoch", 0))


def load_source(
    run_id: str | None = None, checkpoint: str | None = None, overrides: Sequence[str] = (), selected: str | None = None
) -> ModelSource:
    """The model to evaluate: the checkpoint artifact of MLflow run `run_id`, or a local `checkpoint`.

    `selected` ("val" | "test", with `run_id`) takes the run's selected checkpoint
    (`selected_<which>/checkpoint.pt`) instead of the last epoch's. A checkpoint written as a
    selected one says so itself, so rows of a `checkpoint` are labelled as well.
    `overrides` (`key=value`, e.g. `data.data_dir=DIR` or `eval.trials=3`) change its config.
    """
    if (run_id is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --run-id RUN_ID or --checkpoint PATH")
    if selected is not None and selected not in SELECTIONS:
        raise ConfigError(f"--selected '{selected}' is unknown; valid: {', '.join(SELECTIONS)}")
    if selected is not None and checkpoint is not None:
        raise ConfigError(
            "--selected picks a checkpoint of a training run (--run-id); with --checkpoint, pass the selected "
            "file itself "
            "(<run folder>/selected_<val|test>/checkpoint.pt)"
        )
    uri = tracking.resolve_tracking_uri(base_dir())
    check_tracking_store(uri)  # an unreachable server: one line, not minutes of MLflow retries
    if checkpoint is not None:
        path = _local_checkpoint(checkpoint)
        payload = read_checkpoint(path)
        cfg, state, digest = checked_weights(payload, f"'{checkpoint}'", overrides)
        trained_in = (payload.get("extra") or {}).get("mlflow_run_id")
        which, epoch = _selection_of(payload, f"'{checkpoint}'")
        return ModelSource(
            "checkpoint",
            f"ckpt-{safe_name(path.parent.name)}-{digest[:8]}",
            str(path),
            cfg,
            state,
            digest,
            uri,
            training_run_id=str(trained_in) if trained_in else None,
            selection=which,
            selected_epoch=epoch,
        )
    run_id = run_id.strip()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(
            f"MLflow run '{run_id}' not found: there is no MLflow store at {uri}; "
            "set MLFLOW_TRACKING_URI to the store jobs/train.py used"
        )
    client = tracking.client_for(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"MLflow run '{run_id}' not found in {uri}; pass the run id printed by jobs/train.py "
            "(or set MLFLOW_TRACKING_URI)"
        ) from None
    artifact = CHECKPOINT_ARTIFACT if selected is None else selected_artifact(selected)
    names = {a.path for a in client.list_artifacts(run_id, artifact.rsplit("/", 1)[0])}
    if artifact not in names:
        if selected is not None:
            how = "data.val_size > 0" if selected == "val" else "train.select_on_test=true"
            raise ConfigError(
                f"MLflow run '{run_id}' has no {artifact} artifact: it made no selection on {selected} "
                f"(train with {how}); evaluate its last epoch without --selected"
            )
        raise ConfigError(
            f"MLflow run '{run_id}' has no {artifact} artifact (did its training finish?); evaluate a "
            "--checkpoint instead"
        )
    with tempfile.TemporaryDirectory(prefix="rna-eval-ckpt-") as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        payload = read_checkpoint(local)
    cfg, state, digest = checked_weights(payload, f"of run '{run_id}'", overrides)
    which, epoch = _selection_of(payload, f"{artifact} of run '{run_id}'")
    if which != selected:
        raise ConfigError(
            f"{artifact} of run '{run_id}' holds a checkpoint {SELECTION_LABELS[which]}, not "
            f"{SELECTION_LABELS[selected]}"
        )
    label = f"run-{safe_name(run_id)}" + (f"-selected-{selected}" if selected else "")
    return ModelSource(
        "run",
        label,
        f"runs:/{run_id}/{artifact}",
        cfg,
        state,
        digest,
        uri,
        parent_run_id=run_id,
        parent_experiment_id=run.info.experiment_id,
        training_run_id=run_id,
        selection=which,
        selected_epoch=epoch,
    )


MAX_CODE_BYTES = 64 * 2**20  # a model's code, not its data: bigger folders are installed on the nodes
_SKIPPED = ("__pycache__",)


def _installed(origin: Path) -> bool:
    """Whether a top-level package or module at `origin` sits in this interpreter's installed packages
    (site-packages, the standard library), where workers of the same environment find it."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")} | set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    return origin.parent in {Path(r).resolve() for r in roots if r}


def code_origin(spec: ExternalModel) -> Path | None:
    """The folder or .py file the workers need in order to import `spec.module`; None when installed."""
    origin = spec.origin()
    if origin is None or _installed(origin):
        return None
    return origin


def _files(origin: Path) -> list[tuple[Path, str]]:
    if origin.is_file():
        return [(origin, origin.name)]
    out = []
    for p in sorted(origin.rglob("*")):
        rel = p.relative_to(origin.parent)
        if p.is_file() and not any(part in _SKIPPED or part.startswith(".") for part in rel.parts):
            out.append((p, rel.as_posix()))
    return out


def pack(origin: Path) -> bytes:
    """`origin` (a package folder or a .py file) as zip bytes, paths relative to its parent folder."""
    files = _files(origin)
    size = sum(p.stat().st_size for p, _ in files)
    if size > MAX_CODE_BYTES:
        raise ConfigError(
            f"--model: {origin} holds {size / 2**20:.0f} MiB, too much to ship to the workers with each evaluation "
            f"(at most {MAX_CODE_BYTES // 2**20} MiB); pip install that package on the cluster's nodes instead"
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, name in files:
            zf.write(p, name)
    return buf.getvalue()


def load_external_source(
    model: str, weights: str | None, factory_args: Sequence[str] = (), overrides: Sequence[str] = ()
) -> ModelSource:
    """A user's model: `model` ("module:factory") built with `factory_args` and `weights` loaded.

    `overrides` (`data.data_dir=DIR`, `eval.*`, `mlflow.*`) apply to the default config: a user's
    model has no config of its own, so the dataset comes from `data.*`.
    """
    spec = ExternalModel.parse(model, factory_args)
    if not weights:
        raise ConfigError(f"--model {spec.name} needs --weights FILE (a state dict: torch.save or .safetensors)")
    cfg = resolve_paths(load_config(None, list(overrides)))
    uri = tracking.resolve_tracking_uri(base_dir())
    check_tracking_store(uri)
    path = _local_checkpoint(weights)
    state = read_weights(path)
    built = spec.build()
    load_into(built, state, f"weights '{weights}'", spec.name)
    digest = state_digest(state)
    origin = code_origin(spec)
    return ModelSource(
        "external",
        f"model-{safe_name(spec.name)}-{digest[:8]}",
        f"{spec.name} {path}",
        cfg,
        state,
        digest,
        uri,
        external=spec,
        external_model=built.eval(),
        code=None if origin is None else pack(origin),
    )


__all__ = [
    "MAX_CODE_BYTES",
    "ModelSource",
    "checked_weights",
    "code_origin",
    "load_external_source",
    "load_source",
    "pack",
    "safe_name",
]
