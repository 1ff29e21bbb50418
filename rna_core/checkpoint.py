"""Checkpoints: model, optimizer, scheduler, epoch, config and RNG state in one file.

Saved atomically (write a temporary file beside the target, then rename), so a crash never leaves
a half-written checkpoint. Loaded with `torch.load(weights_only=True)`: the file holds only tensors
and plain Python values, and the config is stored flattened. A checkpoint written for another model,
method or random space is refused before any weight is copied.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn as nn

from .config import Config, flatten, unflatten
from .errors import CheckpointMismatchError, ConfigError

FORMAT_VERSION = 1


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: model name, classes, method and space (set by create_model)."""
    spec = getattr(model, "rna_spec", None)
    return dict(spec) if spec else {"model": type(model).__name__}


PREDATES_HINT = (
    "it was written before this code changed the model, so its weights do not fit today's layers; retrain it"
)


def identity_mismatch(
    found: dict[str, Any], expected: dict[str, Any], model_word: str = "model"
) -> tuple[str, bool] | None:
    """How a checkpoint's identity (`found`) differs from the model's: (the differences, predates).

    None when they match. `predates` is true when every difference is a key the checkpoint lacks
    (`quantizer`, `final_norm`, `shortcut`, `norm_versions`: parts of a model that changed after
    older checkpoints were written): then no setting rebuilds the checkpoint's model.
    """
    keys = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if not keys:
        return None
    diffs = "; ".join(f"{k}: checkpoint {found.get(k)!r} vs {model_word} {expected.get(k)!r}" for k in keys)
    return diffs, all(k not in found for k in keys)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    config: Config | None = None,
    rng_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> FsPath:
    """Write the checkpoint atomically; returns its path."""
    target = FsPath(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "identity": model_identity(model),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "config": flatten(config) if config is not None else None,
        "rng_state": rng_state or {},
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the raw payload safely (weights_only=True); a missing/corrupt file is a clear error."""
    p = FsPath(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist; pass the path of a .pt file written by jobs/train.py")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise ConfigError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}); it is not a checkpoint of this project"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "identity" not in payload:
        raise ConfigError(f"checkpoint '{path}' is not a checkpoint of this project (no model/identity entries)")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config | None:
    flat = payload.get("config")
    return unflatten(flat) if flat else None


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler when given); returns the payload (epoch, config, ...)."""
    payload = read_checkpoint(path)
    mismatch = identity_mismatch(payload["identity"], model_identity(model))
    if mismatch is not None:
        diffs, predates = mismatch
        hint = PREDATES_HINT if predates else "build the model the checkpoint was trained with"
        raise CheckpointMismatchError(f"checkpoint '{path}' does not match the model ({diffs}); {hint}")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointMismatchError(f"checkpoint '{path}' does not fit the model's weights ({first})") from None
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload
