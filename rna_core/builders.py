"""From a Config to the objects a training run needs, the same way for every method.

Jobs and pipelines call these instead of reading method-specific config fields themselves, so a
new method (like `rpt`) needs no change in the training pipeline: `model_from_config` passes the
method's options to `create_model`, and `effective_train_config` turns method-specific training
choices into the generic TrainConfig that `rna_core.training.train_step` already serves.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.nn as nn

from .config import Config, TrainConfig
from .errors import ConfigError
from .models import create_model


def model_options(cfg: Config) -> dict[str, Any]:
    """Method options for `create_model` beyond the norm (only `rpt` has any: its precisions)."""
    if cfg.model.method == "rpt":
        return {"precisions": cfg.model.precisions}
    return {}


def model_from_config(cfg: Config) -> nn.Module:
    """Build the model a Config describes (name, classes, method, norm, dataset statistics)."""
    return create_model(
        cfg.model.name,
        num_classes=cfg.num_classes(),
        norm=cfg.model.norm,
        method=cfg.model.method,
        dataset=cfg.data.dataset,
        **model_options(cfg),
    )


def effective_train_config(cfg: Config) -> TrainConfig:
    """The TrainConfig that `train_step` runs, with method-specific choices mapped onto it.

    For `rpt`, `model.rpt_draws` decides how the adversarial modes draw precisions:
    `per_iteration` (Double-Win Quant's RPT) draws one precision per iteration and uses it to
    craft the batch and to update, which is train_step's `whitebox` (update path = attack path);
    `attack_and_update` draws the two independently, which is `blackbox`. Modes `eot` and
    `natural` keep their meaning. Other methods get `cfg.train` unchanged.
    """
    train = cfg.train
    if cfg.model.method != "rpt" or train.mode not in ("blackbox", "whitebox"):
        return train
    if cfg.model.rpt_draws == "per_iteration":
        return replace(train, mode="whitebox")
    if train.mode == "whitebox":
        raise ConfigError(
            "train.mode 'whitebox' and model.rpt_draws 'attack_and_update' contradict each other; "
            "use rpt_draws per_iteration for one precision per iteration"
        )
    return train


__all__ = ["effective_train_config", "model_from_config", "model_options"]
