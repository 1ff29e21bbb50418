"""Paths through a randomized network, and the strategies that draw them.

A path is one choice per :class:`RandomLayer`, in module order. Strategies are a small registry so
they can be swept by name: `uniform`, `shared`, `fixed:<path>`, `far:<fraction>`. Every draw comes
from a `torch.Generator`, never from global random state, so a run is reproducible from its seed.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ConfigError
from .random_layer import RandomLayer

_DIGITS = string.digits + string.ascii_lowercase


@dataclass(frozen=True)
class Path:
    """One choice per random layer. `str(path)` is compact (one base-36 character a layer)."""

    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(int(c) for c in self.choices))
        if any(c < 0 for c in self.choices):
            raise ConfigError(f"path has a negative choice: {self.choices}")

    def __len__(self) -> int:
        return len(self.choices)

    def __str__(self) -> str:
        if all(c < len(_DIGITS) for c in self.choices):
            return "".join(_DIGITS[c] for c in self.choices)
        return ".".join(map(str, self.choices)) + ("." if len(self.choices) == 1 else "")

    @classmethod
    def parse(cls, text: str) -> Path:
        """Read back the form written by `str(path)`."""
        text = text.strip()
        try:
            if "." in text:
                return cls(tuple(int(p) for p in text.split(".") if p != ""))
            return cls(tuple(_DIGITS.index(ch) for ch in text.lower()))
        except ValueError:
            raise ConfigError(f"cannot read path '{text}': expected one base-36 character per layer") from None

    def differences(self, other: Path) -> int:
        """Number of layers where the two paths choose differently."""
        if len(self) != len(other):
            raise ConfigError(f"paths of different lengths ({len(self)} vs {len(other)}) cannot be compared")
        return sum(a != b for a, b in zip(self.choices, other.choices))


def random_layers(model: nn.Module) -> list[RandomLayer]:
    """The model's random layers in module order (the order of a path's choices)."""
    return [m for m in model.modules() if isinstance(m, RandomLayer)]


def _units(layers: list[RandomLayer]) -> list[list[int]]:
    """Groups of layer indices that must take the same choice (tied layers form one unit)."""
    units: list[list[int]] = []
    by_tie: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.tie is None:
            units.append([i])
        elif layer.tie in by_tie:
            by_tie[layer.tie].append(i)
        else:
            by_tie[layer.tie] = [i]
            units.append(by_tie[layer.tie])
    return units


def _unit_choices(layers: list[RandomLayer], unit: list[int]) -> int:
    return min(layers[i].num_choices for i in unit)


def path_units(model: nn.Module, varying_only: bool = False) -> list[list[int]]:
    """Groups of random-layer indices that always share a choice (a tie), in path order.

    With `varying_only`, units with a single choice (which no path can change) are left out.
    """
    layers = random_layers(model)
    units = _units(layers)
    return [u for u in units if _unit_choices(layers, u) > 1] if varying_only else units


def count_paths(model: nn.Module) -> int:
    """Number of distinct paths (K^L for L independent layers with K choices)."""
    layers = random_layers(model)
    return math.prod(_unit_choices(layers, u) for u in _units(layers))


def get_path(model: nn.Module) -> Path:
    """The path the model currently runs."""
    return Path(tuple(layer.choice for layer in random_layers(model)))


def set_path(model: nn.Module, path: Path | str) -> None:
    """Make the model run `path` (a Path or its string form) until the next set_path."""
    if isinstance(path, str):
        path = Path.parse(path)
    layers = random_layers(model)
    _check_fits(layers, path)
    for layer, c in zip(layers, path.choices):
        layer.choice = c


def _check_fits(layers: list[RandomLayer], path: Path) -> None:
    """ConfigError unless `path` is a valid path of a model with these random layers."""
    if len(path) != len(layers):
        raise ConfigError(f"path '{path}' has {len(path)} choices but the model has {len(layers)} random layers")
    for i, (layer, c) in enumerate(zip(layers, path.choices)):
        if c >= layer.num_choices:
            raise ConfigError(f"path '{path}' chooses {c} at random layer {i}, which has {layer.num_choices} choices")
    for unit in _units(layers):
        if len({path.choices[i] for i in unit}) > 1:
            raise ConfigError(f"path '{path}' gives different choices to tied layers {unit}")


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator).item())


StrategyFn = Callable[[list[RandomLayer], torch.Generator | None, "Path | None", str], Path]
_STRATEGIES: dict[str, StrategyFn] = {}


def register_strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register `fn(layers, generator, relative_to, arg) -> Path` as a sampling strategy."""

    def deco(fn: StrategyFn) -> StrategyFn:
        _STRATEGIES[name] = fn
        return fn

    return deco


def available_strategies() -> list[str]:
    return list(_STRATEGIES)


def _expand(layers: list[RandomLayer], units: list[list[int]], unit_choice: list[int]) -> Path:
    choices = [0] * len(layers)
    for unit, c in zip(units, unit_choice):
        for i in unit:
            choices[i] = c
    return Path(tuple(choices))


@register_strategy("uniform")
def _uniform(layers: list[RandomLayer], generator: torch.Generator | None, relative_to: Path | None, arg: str) -> Path:
    units = _units(layers)
    return _expand(layers, units, [_randint(_unit_choices(layers, u), generator) for u in units])


@register_strategy("shared")
def _shared(layers: list[RandomLayer], generator: torch.Generator | None, relative_to: Path | None, arg: str) -> Path:
    if not layers:
        return Path(())
    k = min(layer.num_choices for layer in layers)
    c = _randint(k, generator)
    return Path((c,) * len(layers))


@register_strategy("fixed")
def _fixed(layers: list[RandomLayer], generator: torch.Generator | None, relative_to: Path | None, arg: str) -> Path:
    if not arg:
        return Path((0,) * len(layers))
    path = Path.parse(arg)
    _check_fits(layers, path)
    return path


@register_strategy("far")
def _far(layers: list[RandomLayer], generator: torch.Generator | None, relative_to: Path | None, arg: str) -> Path:
    """Uniform, except that relative to a given path at least `fraction` of the units differ."""
    fraction = float(arg) if arg else 1.0
    units = _units(layers)
    if relative_to is None:
        return _uniform(layers, generator, None, "")
    if len(relative_to) != len(layers):
        raise ConfigError(f"relative_to path has {len(relative_to)} choices, the model {len(layers)} random layers")
    free = [j for j, u in enumerate(units) if _unit_choices(layers, u) > 1]
    must_differ = min(len(free), math.ceil(fraction * len(free) - 1e-9))
    order = torch.randperm(len(free), generator=generator).tolist()
    differ = {free[j] for j in order[:must_differ]}
    picks: list[int] = []
    for j, unit in enumerate(units):
        k = _unit_choices(layers, unit)
        base = relative_to.choices[unit[0]]
        if j in differ:
            c = _randint(k - 1, generator)
            picks.append(c if c < base else c + 1)
        else:
            picks.append(_randint(k, generator))
    return _expand(layers, units, picks)


def parse_strategy(text: str) -> tuple[str, str]:
    """Split `far:0.5` into (`far`, `0.5`), validating the name and the argument."""
    name, _, arg = text.strip().partition(":")
    name = name.strip().lower()
    if name not in _STRATEGIES:
        raise ConfigError(
            f"unknown sampling strategy '{text}'; valid: {', '.join(_STRATEGIES)} (e.g. 'far:0.5', 'fixed:0101')"
        )
    if name == "far" and arg:
        try:
            frac = float(arg)
        except ValueError:
            frac = -1.0
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"strategy '{text}': the fraction after 'far:' must be a number in [0, 1]")
    if name in ("uniform", "shared") and arg:
        raise ConfigError(f"strategy '{name}' takes no argument; write '{name}'")
    if name == "fixed" and arg:
        Path.parse(arg)  # unreadable text fails here, at configuration time, not in a worker
    return name, arg


def check_strategy(model: nn.Module, strategy: str) -> None:
    """ConfigError unless `strategy` can draw paths for `model` (e.g. a `fixed:` path of the right
    length). For drivers to call before a cluster starts; `model` may live on the meta device."""
    sample_path(model, strategy, torch.Generator().manual_seed(0))


def sample_path(
    model: nn.Module,
    strategy: str = "uniform",
    generator: torch.Generator | None = None,
    relative_to: Path | None = None,
) -> Path:
    """Draw a path for `model` with `strategy` (`uniform`, `shared`, `fixed:<path>`, `far:<fraction>`).

    Does not change the model; pass the result to :func:`set_path`.
    """
    name, arg = parse_strategy(strategy)
    path = _STRATEGIES[name](random_layers(model), generator, relative_to, arg)
    return path


class PathSampler:
    """A strategy bound to a generator: the object training and evaluation loops hold."""

    def __init__(self, strategy: str = "uniform", generator: torch.Generator | None = None, seed: int | None = None):
        parse_strategy(strategy)
        self.strategy = strategy
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else seed)
        self.generator = generator
        self.draws = 0

    def sample(self, model: nn.Module, relative_to: Path | None = None) -> Path:
        self.draws += 1
        return sample_path(model, self.strategy, self.generator, relative_to)

    def apply(self, model: nn.Module, relative_to: Path | None = None) -> Path:
        """Draw a path and set it on the model; returns the path."""
        path = self.sample(model, relative_to)
        set_path(model, path)
        return path


@contextlib.contextmanager
def fresh_path_every_forward(model: nn.Module, sampler: PathSampler) -> Iterator[PathSampler]:
    """Inside the block, every forward of `model` first draws and sets a fresh path (for EOT)."""

    def hook(module: nn.Module, args: tuple) -> None:
        sampler.apply(module)

    handle = model.register_forward_pre_hook(hook)
    try:
        yield sampler
    finally:
        handle.remove()
