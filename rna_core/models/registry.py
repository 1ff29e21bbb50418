"""Model registry and `create_model`, the one way every job and notebook builds a network.

A model builder takes a :class:`LayerFactory`; the *method* (`rna`: norms from a random space;
`rpt`: quantized layers with switchable BatchNorm) decides which factory, so every model works with
every method.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn

from ..errors import ConfigError
from .layers import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, LayerFactory, Standardize

ModelBuilder = Callable[[LayerFactory, int, Standardize], nn.Module]
FactoryBuilder = Callable[..., LayerFactory]

_MODELS: dict[str, ModelBuilder] = {}
_METHODS: dict[str, FactoryBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        _MODELS[name] = fn
        return fn

    return deco


def register_method(name: str) -> Callable[[FactoryBuilder], FactoryBuilder]:
    """Register `fn(norm: str, **options) -> LayerFactory` as a randomization method."""

    def deco(fn: FactoryBuilder) -> FactoryBuilder:
        _METHODS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_methods() -> list[str]:
    return sorted(_METHODS)


@register_method("rna")
def _rna_factory(norm: str = "bn", **options: Any) -> LayerFactory:
    if options:
        raise ConfigError(f"method 'rna' takes no options besides norm; got {sorted(options)}")
    return LayerFactory(norm)


_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


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
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; valid models: {', '.join(list_models())}")
    if method not in _METHODS:
        raise ConfigError(f"unknown method '{method}'; valid methods: {', '.join(list_methods())}")
    default_mean, default_std = _STATS.get(dataset, _STATS["cifar10"])
    standardize = Standardize(mean or default_mean, std or default_std)
    factory = _METHODS[method](norm=norm, **method_options)
    model = _MODELS[name](factory, num_classes, standardize)
    # The checkpoint identity: what was built. A model adds `identity_extra` for parts of its
    # structure that changed since checkpoints were first written (e.g. a plain final norm).
    model.rna_spec = {  # type: ignore[attr-defined]
        "model": name,
        "num_classes": num_classes,
        "method": method,
        **factory.describe(),
        **getattr(model, "identity_extra", {}),
    }
    return model
