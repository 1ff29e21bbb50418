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
