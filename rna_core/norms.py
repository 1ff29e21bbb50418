"""Normalization specs and the one registry that turns a spec into a layer.

A spec is a short string (`bn`, `in`, `ln`, `gn:8`, `gns:1`, `bgn:8`, `bgns:4`); a random space is
a comma-separated list of specs. Every model builds its norm layers through :func:`build_norm`, so
adding a normalization here makes it available to every model and every random space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class NormSpec:
    """A parsed norm spec: the registry key and its optional integer argument."""

    kind: str
    arg: int | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


NormBuilder = Callable[[int, "int | None", str], nn.Module]


@dataclass(frozen=True)
class _Entry:
    builder: NormBuilder
    takes_arg: bool
    help: str


_REGISTRY: dict[str, _Entry] = {}


def register_norm(kind: str, takes_arg: bool, help: str) -> Callable[[NormBuilder], NormBuilder]:
    """Register a builder `(channels, arg, where) -> nn.Module` under `kind`."""

    def deco(fn: NormBuilder) -> NormBuilder:
        _REGISTRY[kind] = _Entry(fn, takes_arg, help)
        return fn

    return deco


def available_norms() -> dict[str, str]:
    """Registered norm kinds and a one-line description of each."""
    return {k: e.help for k, e in _REGISTRY.items()}


def _valid_list() -> str:
    return ", ".join(f"{k}:N" if e.takes_arg else k for k, e in _REGISTRY.items())


def parse_norm_spec(text: str) -> NormSpec:
    """Parse one spec such as `gn:8`; raise ConfigError naming the valid forms otherwise."""
    raw = text.strip()
    kind, sep, arg_text = raw.partition(":")
    kind = kind.strip().lower()
    entry = _REGISTRY.get(kind)
    if entry is None:
        raise ConfigError(f"unknown norm spec '{raw}'; valid specs: {_valid_list()}")
    if entry.takes_arg:
        try:
            arg = int(arg_text)
        except ValueError:
            raise ConfigError(
                f"norm spec '{raw}' needs a positive integer argument, e.g. '{kind}:8'"
            ) from None
        if arg <= 0:
            raise ConfigError(f"norm spec '{raw}' needs a positive integer argument, e.g. '{kind}:8'")
        return NormSpec(kind, arg)
    if sep:
        raise ConfigError(f"norm spec '{raw}' takes no argument; write '{kind}'")
    return NormSpec(kind)


def parse_space(text: str | list[str] | tuple[str, ...]) -> tuple[NormSpec, ...]:
    """Parse a random space (`"bn,gns:1"` or a list of specs) into distinct specs, in order."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    specs = tuple(parse_norm_spec(p) for p in parts if str(p).strip())
    if not specs:
        raise ConfigError("empty norm space; give at least one spec, e.g. 'bn' or 'bn,gns:1'")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"norm space '{text}' lists a spec twice; list each candidate once")
    return specs


def build_norm(spec: NormSpec | str, channels: int, where: str = "") -> nn.Module:
    """Build the layer for `spec` over `channels` channels (`where` names the layer in errors)."""
    if isinstance(spec, str):
        spec = parse_norm_spec(spec)
    return _REGISTRY[spec.kind].builder(channels, spec.arg, where)


def _nearest_divisor(channels: int, wanted: int) -> int:
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), d))


def _groups_from_count(kind: str, channels: int, groups: int, where: str) -> int:
    if channels % groups:
        good = _nearest_divisor(channels, groups)
        raise ConfigError(
            f"norm '{kind}:{groups}' at layer '{where or '?'}' has {channels} channels, which "
            f"{groups} groups do not divide; use a group count that divides {channels}, e.g. '{kind}:{good}'"
        )
    return groups


def _groups_from_size(kind: str, channels: int, size: int, where: str) -> int:
    if channels % size:
        good = _nearest_divisor(channels, size)
        raise ConfigError(
            f"norm '{kind}:{size}' at layer '{where or '?'}' has {channels} channels, which groups "
            f"of {size} channels do not divide; use a group size that divides {channels}, e.g. '{kind}:{good}'"
        )
    return channels // size


class BatchGroupNorm(nn.Module):
    """Batch-group norm (GBN): statistics over the batch *and* the channels of a group.

    Like BatchNorm it keeps running statistics (one mean and variance per group, momentum update,
    unbiased variance) and uses them in eval mode; like GroupNorm the affine parameters are per
    channel. Implemented by viewing the input as (N, G, C/G*H*W) and calling `F.batch_norm`, so it
    costs one fused kernel, as BatchNorm does.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if num_channels % num_groups:
            raise ConfigError(f"BatchGroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        grouped = x.reshape(n, self.num_groups, -1)
        normed = F.batch_norm(
            grouped,
            self.running_mean,
            self.running_var,
            None,
            None,
            self.training,
            self.momentum,
            self.eps,
        ).reshape_as(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return normed * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}"


@register_norm("bn", False, "BatchNorm2d")
def _bn(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.BatchNorm2d(channels)


@register_norm("in", False, "instance norm (GroupNorm with one group per channel, affine)")
def _in(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(channels, channels)


@register_norm("ln", False, "layer norm over C,H,W (GroupNorm with one group)")
def _ln(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(1, channels)


@register_norm("gn", True, "GroupNorm with N groups")
def _gn(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(_groups_from_count("gn", channels, int(arg), where), channels)


@register_norm("gns", True, "GroupNorm with groups of N channels")
def _gns(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(_groups_from_size("gns", channels, int(arg), where), channels)


@register_norm("bgn", True, "batch-group norm (GBN) with N groups")
def _bgn(channels: int, arg: int | None, where: str) -> nn.Module:
    return BatchGroupNorm(channels, _groups_from_count("bgn", channels, int(arg), where))


@register_norm("bgns", True, "batch-group norm (GBN) with groups of N channels")
def _bgns(channels: int, arg: int | None, where: str) -> nn.Module:
    return BatchGroupNorm(channels, _groups_from_size("bgns", channels, int(arg), where))
