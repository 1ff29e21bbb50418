"""From names or a Config to a built network, the same way for every model and method.

`create_model` joins the two registries: the architecture (`rna_core.models`) asks the method's
layer factory (`rna_core.methods`) for every conv, linear and norm, so every model works with
every method. Jobs and pipelines build from a Config with `model_from_config`, or only its layer
structure with `model_structure` (on the meta device: no weights allocated), and take the
method's training choices from `effective_train_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .config import Config, TrainConfig
from .methods import get_method
from .models import dataset_stats, model_builder
from .models.layers import Standardize


def create_model(
    name: str,
    num_classes: int = 10,
    norm: str = "bn",
    method: str = "rna",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset: str = "cifar10",
    **method_options: Any,
) -> nn.Module:
    """Build model `name` with norm spec or random space `norm` (e.g. `"bn,gns:1"`).

    Input standardisation uses `mean`/`std` if given, else the statistics of `dataset`.
    The model carries `rna_spec`, its checkpoint identity: what was built.
    """
    builder = model_builder(name)
    default_mean, default_std = dataset_stats(dataset)
    standardize = Standardize(mean or default_mean, std or default_std)
    factory = get_method(method).layer_factory(norm=norm, **method_options)
    model = builder(factory, num_classes, standardize)
    # A model adds `identity_extra` for parts of its structure that changed since checkpoints
    # were first written (e.g. a plain final norm).
    model.rna_spec = {  # type: ignore[attr-defined]
        "model": name,
        "num_classes": num_classes,
        "method": method,
        **factory.describe(),
        **getattr(model, "identity_extra", {}),
    }
    return model


def model_options(cfg: Config) -> dict[str, Any]:
    """Method options for `create_model` beyond the norm (e.g. `rpt`'s precisions)."""
    return get_method(cfg.model.method).model_options(cfg.model)


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


def model_structure(cfg: Config) -> nn.Module:
    """The model's layers without weights (meta device): for checks, its identity and its path count.

    Cheap for any size; a layer that cannot be built on the meta device is built normally.
    """
    try:
        with torch.device("meta"):
            return model_from_config(cfg)
    except (NotImplementedError, RuntimeError):
        return model_from_config(cfg)


def effective_train_config(cfg: Config) -> TrainConfig:
    """The TrainConfig that `train_step` runs, with the method's training choices mapped onto it."""
    return get_method(cfg.model.method).train_config(cfg)


__all__ = ["create_model", "effective_train_config", "model_from_config", "model_options", "model_structure"]
