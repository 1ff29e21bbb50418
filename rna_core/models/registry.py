"""The model registry: architectures by name, each a builder that takes a layer factory.

`rna_core.create_model` (rna_core/builders.py) pairs a registered architecture with a method's
layer factory (`rna_core.methods`), so every model works with every method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..errors import ConfigError
from .layers import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, LayerFactory, Standardize

ModelBuilder = Callable[[LayerFactory, int, Standardize], nn.Module]

_MODELS: dict[str, ModelBuilder] = {}
_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as `name`; an unknown name is one ConfigError listing the valid ones."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; valid models: {', '.join(list_models())}")
    return _MODELS[name]


def dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input standardisation for `dataset` (CIFAR-10's for others, e.g. synthetic)."""
    return _STATS.get(dataset, _STATS["cifar10"])
