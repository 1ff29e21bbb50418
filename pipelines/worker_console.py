"""What a training worker prints: one line per epoch, the device and speed it chose, written
once to the process's own stdout (Ray Train would duplicate or hide plain prints)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import torch

from rna_core.config import Config
from rna_core.speed import SpeedFlags


def say(line: str) -> None:
    """Print one line from a worker exactly once.

    Ray Train patches `print` in workers to also go through its logger, and tees when another
    library has wrapped `sys.stdout`: plain prints then reach the driver twice (or not at all
    at WARNING level). Writing to the process's own stdout bypasses both.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def speed_line(cfg: Config, speed: SpeedFlags) -> str:
    """What `auto` became on this worker's device, e.g. `speed: train.amp_bf16=auto -> true, ...`."""
    return (
        f"speed: train.amp_bf16={cfg.train.amp_bf16} -> {str(speed.amp_bf16).lower()}, "
        f"train.channels_last={cfg.train.channels_last} -> {str(speed.channels_last).lower()} ({speed.reason})"
    )


def device_line(device: torch.device, world: int) -> str:
    """The device this worker trains on, as it sees it (the launcher printed what it asked for)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none (one worker)"
    return f"device: {device} ({name}), {world} worker(s), backend {backend}"


def format_epoch_line(run_name: str, epoch: int, epochs: int, m: Mapping[str, float], pgd: str = "pgd20_acc") -> str:
    """One readable progress line per epoch."""
    parts = [f"[{run_name}] epoch {epoch}/{epochs}", f"loss {m['train_loss']:.4f}", f"train_acc {m['train_acc']:.3f}"]
    for key in ("clean_acc", pgd, f"val_{pgd}"):
        if key in m:
            parts.append(f"{key} {m[key]:.3f}")
    parts += [f"lr {m['lr']:.4g}", f"{m['images_per_second']:.0f} img/s", f"{m['epoch_seconds']:.1f}s"]
    return "  ".join(parts)


def quiet_report_logging() -> None:
    """Ray Train 2.60 logs every `report` (all metrics, every rank) at INFO on the console.

    Our one line per epoch says the same, readably. The logger is Ray-internal (named after its
    file), so this is best effort: if Ray moves it, the lines simply come back.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    internal = getattr(train_context, "logger", None)
    if isinstance(internal, logging.Logger):
        internal.setLevel(logging.WARNING)


__all__ = ["device_line", "format_epoch_line", "quiet_report_logging", "say", "speed_line"]
