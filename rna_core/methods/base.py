"""The method registry: what a randomization method (`model.method`) owns, in one place.

A method decides which layers a model gets (its layer factory), which of `model.*` it reads and
how they are checked, how the generic training modes map onto it, which per-epoch measure selects
a checkpoint, and how it is named in tables and model cards. Everything else (models, paths,
training, protocols) is shared, so adding a method is one new module under `rna_core/methods/`
that subclasses :class:`Method` and registers it with :func:`register_method`.

This module imports no method and no config: `rna_core.config` validates `model.*` through
:func:`get_method`, and each method reads the config it is handed by attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.nn as nn

from ..errors import ConfigError
from ..models.layers import LayerFactory


@dataclass(frozen=True)
class Criterion:
    """How an epoch is scored for model selection: a PGD accuracy under a protocol and path strategy."""

    metric: str  # per-epoch metric name on the test slice; `val_<metric>` on the validation split
    protocol: str  # a protocol of rna_core.evaluation
    strategy: str | None  # path strategy of that evaluation; None: the run's train.sampling
    description: str


class Method:
    """Base class of randomization methods; subclasses set `name`, `title` and override what differs."""

    name: str = ""
    title: str = ""  # the long name, with its paper (model cards)

    def layer_factory(self, norm: str, **options: Any) -> LayerFactory:
        """The factory that builds every conv, linear and norm of a model for this method."""
        if options:
            raise ConfigError(f"method '{self.name}' takes no options besides norm; got {sorted(options)}")
        return LayerFactory(norm)

    def model_options(self, model_cfg: Any) -> dict[str, Any]:
        """Keyword arguments for `create_model` beyond the norm, read from `model.*`."""
        return {}

    def validate(self, model_cfg: Any) -> None:
        """Check the `model.*` fields this method reads (a ConfigError names the key)."""

    def train_config(self, cfg: Any) -> Any:
        """The TrainConfig that `rna_core.training.train_step` runs for this method (default: `cfg.train`)."""
        return cfg.train

    def random_space(self, model_cfg: Any) -> str:
        """What is random, in words for a model card (the norm space, a precision set)."""
        return f"`{model_cfg.norm}`"

    def row_label(self, spec: Mapping[str, Any]) -> str:
        """The `method` of a result row, from a model's `rna_spec`: what tells two models apart in a table."""
        return self.name

    def selection_criterion(self, cfg: Any, model: nn.Module) -> Criterion:
        """The per-epoch measure that selects a checkpoint: PGD under `transfer` with random paths."""
        steps = cfg.train.eval_pgd_steps
        return Criterion(f"pgd{steps}_acc", "transfer", None, f"PGD-{steps} accuracy under transfer with random paths")


_METHODS: dict[str, Method] = {}
M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register one instance of a :class:`Method` subclass under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a name")
    _METHODS[cls.name] = cls()
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method `name`; an unknown name is one ConfigError listing the valid ones."""
    if name not in _METHODS:
        raise ConfigError(f"model.method '{name}' is unknown; valid: {', '.join(list_methods())}")
    return _METHODS[name]


def method_row_label(spec: Mapping[str, Any]) -> str:
    """The row label of a model's `rna_spec`; a spec of an unknown method keeps its method name."""
    method = str(spec.get("method", "none"))
    return _METHODS[method].row_label(spec) if method in _METHODS else method


__all__ = ["Criterion", "Method", "get_method", "list_methods", "method_row_label", "register_method"]
