"""The `sweep:` section of the config tree: what a Ray Tune sweep varies and how it ranks trials.

A sweep config is a training config plus this section, whose `space` names flattened config keys
and how to vary them:

    sweep:
      search: grid              # grid | random
      num_samples: 1            # grid: repeats of the grid; random: number of draws
      metric: pgd20_acc         # a per-epoch metric; default pgd<k>_acc, k = train.eval_pgd_steps; ranks, drives ASHA
      mode: max
      scheduler: asha           # asha | none
      asha: {grace_period: 1, reduction_factor: 2, max_t: 2}
      max_concurrent_trials: 2  # default: what the cluster's CPUs/GPUs hold
      seed: 0                   # seeds the random search (each trial's train.seed is logged)
      space:
        model.norm: {grid: ["bn,gns:1", "bn,gn:8,gn:16"]}
        train.sampling: {choice: [uniform, shared, "far:0.5"]}
        train.lr: {loguniform: [0.01, 0.2]}
      arms:                     # optional: named variants that set several keys together
        bn: {model.norm: bn}
        rpt: {model.method: rpt, model.norm: bn, model.precisions: "4-16"}

An arm is a grid dimension whose values are whole groups of settings (a method with its own
options cannot be a product of independent keys): every arm is crossed with the space, so a
sweep of arms alone needs no space. A key is either in the space or in the arms, never both.

Plain Python: parsing a sweep imports no Ray. Whether the swept keys and values fit the rest of
the config is checked by the sweep job before Ray starts (pipelines.sweep.spec).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

SEARCHES = ("grid", "random")
SCHEDULERS = ("asha", "none")
MODES = ("max", "min")
CATEGORICAL = ("grid", "choice")
NUMERIC = ("uniform", "loguniform", "randint")
DOMAIN_KINDS = CATEGORICAL + NUMERIC
LISTED = "list"  # a plain list while parsing: a grid under `search: grid`, a choice under `search: random`


@dataclass(frozen=True)
class Dimension:
    """One swept config key: listed values (`grid`, `choice`) or a range (`uniform`, ...)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def categorical(self) -> bool:
        return self.kind in CATEGORICAL

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


def parse_space(node: Any, key: str = "sweep.space") -> tuple[Dimension, ...]:
    """`space` (dotted keys or nested sections, or its JSON text as flattened) as dimensions.

    A key given twice (`model.norm` in the YAML, then `--set sweep.space.model.norm=...`, which
    arrives as a nested section) takes the later definition, as overrides do everywhere. A plain
    list is a grid (`search: random` makes it a choice when the section is checked).
    """
    if isinstance(node, tuple) and all(isinstance(d, Dimension) for d in node):
        return node
    if isinstance(node, str):
        try:
            node = json.loads(node)
        except json.JSONDecodeError:
            raise ConfigError(f"{key} must map config keys to values, got {node!r}") from None
    dims: dict[str, Dimension] = {}
    for d in _space_items(node, ""):
        dims.pop(d.key, None)
        dims[d.key] = d
    return tuple(dims.values())


def space_text(space: tuple[Dimension, ...]) -> str:
    """The flattened form of `space` (JSON, as MLflow params show it); `parse_space` reads it back."""
    return json.dumps({d.key: d.to_dict() for d in space}, default=str)


def _space_items(node: Any, prefix: str) -> list[Dimension]:
    if not isinstance(node, Mapping) or not node:
        raise ConfigError("sweep.space must map config keys to values, e.g. {model.norm: {grid: [bn, 'bn,gns:1']}}")
    dims: list[Dimension] = []
    for raw_key, value in node.items():
        key = f"{prefix}{raw_key}"
        if isinstance(value, Mapping) and set(value) & set(DOMAIN_KINDS):
            if len(value) != 1:
                raise ConfigError(
                    f"sweep.space.{key} must have exactly one of {', '.join(DOMAIN_KINDS)}, got {sorted(value)}"
                )
            ((kind, values),) = value.items()
            dims.append(_dimension(key, kind, values))
        elif isinstance(value, Mapping):
            dims.extend(_space_items(value, f"{key}."))
        elif isinstance(value, (list, tuple)):  # shorthand: a plain list (grid or choice, by the search)
            dims.append(_dimension(key, LISTED, value))
        else:
            raise ConfigError(
                f"sweep.space.{key} is a single value ({value!r}); give {{grid: [...]}}, {{choice: [...]}}, "
                "{uniform|loguniform|randint: [low, high]}, or set fixed values in the base config"
            )
    return dims


def _dimension(key: str, kind: str, values: Any) -> Dimension:
    if kind not in DOMAIN_KINDS and kind != LISTED:
        raise ConfigError(f"sweep.space.{key}: '{kind}' is not a search domain; valid: {', '.join(DOMAIN_KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"sweep.space.{key}.{kind} must be a non-empty list, got {values!r}")
    values = tuple(values)
    if kind in CATEGORICAL or kind == LISTED:
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"sweep.space.{key} lists a value twice: {list(values)}")
        return Dimension(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"sweep.space.{key}.{kind} must be [low, high] numbers, got {list(values)}")
    low, high = values
    if kind == "randint" and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"sweep.space.{key}.randint bounds must be integers, got {list(values)}")
    if not low < high:
        raise ConfigError(f"sweep.space.{key}.{kind} needs low < high, got {list(values)}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"sweep.space.{key}.loguniform needs low > 0, got {list(values)}")
    return Dimension(key, kind, (int(low), int(high)) if kind == "randint" else (float(low), float(high)))


@dataclass(frozen=True)
class Arm:
    """A named group of settings (flattened config keys) that a trial takes together."""

    name: str
    settings: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def parse_arms(node: Any, key: str = "sweep.arms") -> tuple[Arm, ...]:
    """`arms` ({name: {dotted or nested keys: value}} or its JSON text, as flattened) as Arms.

    An arm given twice (the YAML, then `--set sweep.arms.<name>.<key>=...`) merges, the later value winning.
    """
    if isinstance(node, tuple) and all(isinstance(a, Arm) for a in node):
        return node
    if node is None or node == "":
        return ()
    if isinstance(node, str):
        try:
            node = json.loads(node)
        except json.JSONDecodeError:
            raise ConfigError(f"{key} must map arm names to settings, got {node!r}") from None
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key} must map arm names to settings, e.g. {{bn: {{model.norm: bn}}}}; got {node!r}")
    arms = []
    for name, settings in node.items():
        name = str(name)
        if not ARM_NAME.match(name):
            raise ConfigError(f"{key}: arm name '{name}' must be letters, digits, '_', '-' or '.'")
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(f"{key}.{name} must map config keys to values, e.g. {{model.norm: bn}}")
        arms.append(Arm(name, tuple(_flat_settings(settings, ""))))
    return tuple(arms)


def _flat_settings(node: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            out.update(_flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return list(out.items())


def arms_text(arms: tuple[Arm, ...]) -> str:
    """The flattened form of `arms` (JSON, as MLflow params show it); `parse_arms` reads it back."""
    return json.dumps({a.name: a.as_dict() for a in arms}, default=str)


@dataclass(frozen=True)
class AshaConfig:
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None  # default: the longest trial's train.epochs


@dataclass(frozen=True)
class SweepConfig:
    """The `sweep:` section: the search space, the search, the ranking metric and the scheduler."""

    space: tuple[Dimension, ...] = field(default=(), metadata={"parse": parse_space, "flat": space_text})
    arms: tuple[Arm, ...] = field(default=(), metadata={"parse": parse_arms, "flat": arms_text})
    name: str | None = None
    search: str = "grid"
    num_samples: int = 1
    metric: str | None = None  # a per-epoch metric; None: pgd<k>_acc, k = train.eval_pgd_steps (set by Config)
    mode: str = "max"
    scheduler: str = "none"
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = None
    seed: int = 0
    trial_cpus: float = 0.1

    def __post_init__(self) -> None:
        listed_as = "choice" if self.search == "random" else "grid"
        space = tuple(Dimension(d.key, listed_as, d.values) if d.kind == LISTED else d for d in self.space)
        object.__setattr__(self, "space", space)

    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return grid * max(1, len(self.arms)) * self.num_samples

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"sweep arm '{name}' is not in sweep.arms ({', '.join(a.name for a in self.arms)})")

    def validate(self) -> None:
        if not self.space and not self.arms:
            raise ConfigError(
                "the sweep: section needs a space or arms, e.g. space: {model.norm: {grid: ['bn,gns:1', 'bn,in']}}"
            )
        both = sorted({k for a in self.arms for k, _ in a.settings} & {d.key for d in self.space})
        if both:
            raise ConfigError(f"sweep key '{both[0]}' is both in sweep.space and in sweep.arms; keep it in one")
        if self.search not in SEARCHES:
            raise ConfigError(f"sweep.search '{self.search}' is unknown; valid: {', '.join(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sweep.scheduler '{self.scheduler}' is unknown; valid: {', '.join(SCHEDULERS)}")
        if self.mode not in MODES:
            raise ConfigError(f"sweep.mode must be max or min, got '{self.mode}'")
        if self.num_samples < 1:
            raise ConfigError(f"sweep.num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(
                f"sweep.max_concurrent_trials must be >= 1 (or omitted for automatic), got {self.max_concurrent_trials}"
            )
        if not 0 < self.trial_cpus <= 64:
            raise ConfigError(f"sweep.trial_cpus must be in (0, 64], got {self.trial_cpus}")
        a = self.asha
        if a.grace_period < 1 or a.reduction_factor <= 1 or (a.max_t is not None and a.max_t < a.grace_period):
            raise ConfigError("sweep.asha needs grace_period >= 1, reduction_factor > 1 and max_t >= grace_period")
        if self.search == "grid":
            sampled = [d for d in self.space if d.kind != "grid"]
            if sampled:
                raise ConfigError(
                    f"sweep.search is grid but sweep.space.{sampled[0].key} is {sampled[0].kind}; "
                    "use search: random to sample, or list grid values"
                )


__all__ = [
    "Arm",
    "AshaConfig",
    "CATEGORICAL",
    "DOMAIN_KINDS",
    "Dimension",
    "NUMERIC",
    "SweepConfig",
    "arms_text",
    "parse_arms",
    "parse_space",
    "space_text",
]
