"""SGD and the paper's learning-rate schedules (multistep at fractions of the run, or cosine)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of the base lr for a 0-based epoch."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    # a milestone never falls on epoch 0 (Python's round(0.5) == 0 would decay a 1-epoch run at once)
    passed = sum(epoch >= max(1, math.floor(m * cfg.epochs + 0.5)) for m in cfg.milestones)
    return cfg.gamma**passed


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch; its state goes into checkpoints with the optimizer's."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))


def apply_config_on_resume(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, next_epoch: int
) -> None:
    """Make a resumed optimizer follow `cfg`, not the settings saved with the checkpoint.

    Loading a checkpoint restores the saved lr, momentum and weight decay and the scheduler's
    base lr, so `--resume --set train.lr=...` changed nothing, and `--set train.epochs=...` ran
    its first resumed epoch at the old schedule's lr. With an unchanged config this is a no-op
    (the same formula, base lr x factor of the epoch, gives the same floats).
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factor = lr_factor(cfg, next_epoch)
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr * factor, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        if "initial_lr" in group:
            group["initial_lr"] = cfg.lr
