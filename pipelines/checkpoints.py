"""The checkpoint files of a training run's folder: epoch checkpoints and selected checkpoints.

Every epoch checkpoint (Ray Train's, `<run folder>/epoch_NNNN/`) holds `checkpoint.pt` in
rna_core's format (model, optimizer, scheduler, epoch, config) and `meta.json` (epoch, MLflow run
id, metrics: readable without torch). An epoch that a model selection keeps
(`rna_core.selection`) is also written, weights only, to `<run folder>/selected_<which>/`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn as nn

from rna_core.checkpoint import read_checkpoint, save_checkpoint
from rna_core.config import Config

from .run_folder import filesystem, is_uri, join

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
SELECTED_DIR = "selected_{which}"  # beside the epoch checkpoints in the run folder
CHECKPOINT_ARTIFACT = f"checkpoint/{CHECKPOINT_FILE}"  # where the training job logs the last epoch's checkpoint


def selected_artifact(which: str) -> str:
    """Where the training job logs a run's selected checkpoint (beside checkpoint/, the last epoch)."""
    return f"{SELECTED_DIR.format(which=which)}/{CHECKPOINT_FILE}"


def write_checkpoint_dir(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    cfg: Config,
    extra: Mapping[str, Any],
) -> Path:
    """`checkpoint.pt` (rna_core format) plus `meta.json` into a local folder."""
    d = Path(directory)
    save_checkpoint(d / CHECKPOINT_FILE, model, optimizer, scheduler, epoch=epoch, config=cfg, extra=dict(extra))
    meta = {
        "epoch": epoch,
        **{k: v for k, v in extra.items() if k != "metrics"},
        "metrics": dict(extra.get("metrics", {})),
    }
    (d / META_FILE).write_text(json.dumps(meta, indent=1))
    return d / CHECKPOINT_FILE


def selected_dir(storage_path: str, run_name: str, which: str) -> str:
    """Folder (local path or URI) of a run's selected checkpoint: `<run folder>/selected_<which>`."""
    return join(join(storage_path, run_name), SELECTED_DIR.format(which=which))


def write_selected(directory: str, model: nn.Module, epoch: int, cfg: Config, extra: Mapping[str, Any]) -> None:
    """The selected epoch's weights (no optimizer state) as `checkpoint.pt` + `meta.json`.

    Local folders are written file by file atomically; an object-store URI gets both files
    uploaded from a temporary folder (an object appears whole or not at all).
    """
    if not is_uri(directory):
        write_checkpoint_dir(directory, model, None, None, epoch, cfg, extra)
        return
    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        write_checkpoint_dir(tmp, model, None, None, epoch, cfg, extra)
        fs, path = filesystem(directory)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


def read_selected(directory: str) -> dict[str, Any]:
    """The payload of a selected checkpoint (see write_selected), read with weights_only=True."""
    if not is_uri(directory):
        return read_checkpoint(Path(directory) / CHECKPOINT_FILE)
    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        fs, path = filesystem(directory)
        pafs.copy_files(f"{path}/{CHECKPOINT_FILE}", f"{tmp}/{CHECKPOINT_FILE}", source_filesystem=fs)
        return read_checkpoint(Path(tmp) / CHECKPOINT_FILE)


__all__ = [
    "CHECKPOINT_ARTIFACT",
    "CHECKPOINT_FILE",
    "META_FILE",
    "read_selected",
    "selected_artifact",
    "selected_dir",
    "write_checkpoint_dir",
    "write_selected",
]
