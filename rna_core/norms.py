"""Normalization specs and the one registry that turns a spec into a layer.

A spec is a short string (`bn`, `in`, `ln`, `gn:8`, `gns:1`, `bgn:8`, `bgns:4`); a random space is
a comma-separated list of specs. Every model builds its norm layers through :func:`build_norm`, so
adding a normalization here makes it available to every model and every random space.

Each registered kind also says which layer it builds over a given channel count (`describe`), so a
space whose candidates are the same layer at some position (`ln,gn:1`; `gn:1,gns:64` at a 64-channel
layer) is refused, and carries a `version` that is raised whenever its numerics change, so a
checkpoint of the earlier layer is refused rather than loaded into the new one (see
:func:`norm_versions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ConfigError


@dataclass(frozen=True)
class NormSpec:
    """A parsed norm spec: the registry key and its optional integer argument."""

    kind: str
    arg: int | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


NormBuilder = Callable[[int, "int | None", str], nn.Module]
# (channels, arg) -> what layer the spec builds there, in words; equal words mean the same layer.
NormDescriber = Callable[[int, "int | None"], str]


@dataclass(frozen=True)
class _Entry:
    builder: NormBuilder
    takes_arg: bool
    help: str
    describe: NormDescriber | None
    version: int


_REGISTRY: dict[str, _Entry] = {}


def register_norm(
    kind: str, takes_arg: bool, help: str, *, describe: NormDescriber | None = None, version: int = 1
) -> Callable[[NormBuilder], NormBuilder]:
    """Register a builder `(channels, arg, where) -> nn.Module` under `kind`.

    `describe(channels, arg)` names the layer the spec builds at that width (default: the spec
    itself), so two specs that build the same layer are recognised as duplicates. `version` starts
    at 1 and goes up when the layer's numerics change; it becomes part of a checkpoint's identity.
    """

    def deco(fn: NormBuilder) -> NormBuilder:
        _REGISTRY[kind] = _Entry(fn, takes_arg, help, describe, int(version))
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
            raise ConfigError(f"norm spec '{raw}' needs a positive integer argument, e.g. '{kind}:8'") from None
        if arg <= 0:
            raise ConfigError(f"norm spec '{raw}' needs a positive integer argument, e.g. '{kind}:8'")
        return NormSpec(kind, arg)
    if sep:
        raise ConfigError(f"norm spec '{raw}' takes no argument; write '{kind}'")
    return NormSpec(kind)


def parse_space(text: str | list[str] | tuple[str, ...]) -> tuple[NormSpec, ...]:
    """Parse a random space (`"bn,gns:1"` or a list of specs) into distinct specs, in order."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    if not any(str(p).strip() for p in parts):
        raise ConfigError("empty norm space; give at least one spec, e.g. 'bn' or 'bn,gns:1'")
    if not all(str(p).strip() for p in parts):  # 'bn,,in': a spec left out, not a two-spec space
        raise ConfigError(f"norm space '{text}' has an empty spec between commas; write each spec once, e.g. 'bn,in'")
    specs = tuple(parse_norm_spec(p) for p in parts)
    seen: set[NormSpec] = set()
    for spec in specs:
        if spec in seen:
            raise ConfigError(f"norm space '{text}' lists '{spec}' twice; list each candidate once")
        seen.add(spec)
    return specs


def build_norm(spec: NormSpec | str, channels: int, where: str = "") -> nn.Module:
    """Build the layer for `spec` over `channels` channels (`where` names the layer in errors)."""
    if isinstance(spec, str):
        spec = parse_norm_spec(spec)
    return _REGISTRY[spec.kind].builder(channels, spec.arg, where)


def describe_norm(spec: NormSpec | str, channels: int) -> str:
    """The layer `spec` builds over `channels` channels, in words (e.g. 'GroupNorm with 1 group')."""
    if isinstance(spec, str):
        spec = parse_norm_spec(spec)
    entry = _REGISTRY[spec.kind]
    return entry.describe(channels, spec.arg) if entry.describe else str(spec)


def check_distinct_candidates(specs: tuple[NormSpec, ...], channels: int, where: str = "") -> None:
    """Refuse a space with two candidates that build the same layer here (a wasted, doubled choice).

    `ln` and `gn:1` are one GroupNorm; `gns:S` and `gn:C/S` too; whether two specs coincide can
    depend on the layer's width (`gns:64` and `ln` only at 64 channels), hence the check per layer.
    Call it after the candidates were built, so a group count that does not divide is reported first.
    """
    first: dict[str, NormSpec] = {}
    for spec in specs:
        layer = describe_norm(spec, channels)
        if layer in first:
            space = ",".join(map(str, specs))
            raise ConfigError(
                f"norm space '{space}' has two identical candidates at layer '{where or '?'}' ({channels} channels): "
                f"'{first[layer]}' and '{spec}' are both {layer}; drop one of them from the space"
            )
        first[layer] = spec


def norm_versions(specs: tuple[NormSpec, ...]) -> str:
    """The kinds of `specs` whose layer changed since version 1, as 'kind=version,...' ('' if none).

    A model's checkpoint identity carries this, so a checkpoint written with an earlier `in` or
    `bgn` is refused by name instead of being loaded into a layer that computes something else.
    """
    changed = sorted({s.kind for s in specs if _REGISTRY[s.kind].version > 1})
    return ",".join(f"{kind}={_REGISTRY[kind].version}" for kind in changed)


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
    """Batch-group norm (GBN; `GroupBatchNorm2d` in the RNA code): statistics over the batch *and*
    the channels of a group, one mean and variance per group, affine parameters per channel.

    The numerics are the RNA paper's convention (UniSerj/Random-Norm-Aggregation, `model/norm.py`),
    not BatchNorm's, and differ from `F.batch_norm` in three ways:

    * train mode normalises with the *unbiased* variance of the batch-and-group values
      (BatchNorm normalises with the biased one);
    * the running statistics move as ``running = momentum * running + (1 - momentum) * batch``
      with momentum 0.1, so the newest batch weighs 0.9 (BatchNorm's 0.1 is the new batch's weight);
    * the running variance takes that unbiased variance times a further ``N / (N - 1)``
      (N the batch size).

    Eval mode normalises with the running statistics, so an example's output does not depend on
    the rest of its batch. Statistics are computed in float32 (also under bf16 autocast) and the
    result has the input's dtype. A train-mode batch of one example is an error (N / (N - 1)).
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if num_channels % num_groups:
            raise ConfigError(f"BatchGroupNorm: {num_groups} groups do not divide {num_channels} channels")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum is the running value's weight and must be in [0, 1), got {momentum}")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, groups, channels = x.shape[0], self.num_groups, self.num_channels
        grouped = x.reshape(n, groups, -1).float()  # (N, G, C/G*H*W): one row of values per group
        if self.training:
            if n < 2:
                raise ValueError(
                    "BatchGroupNorm needs at least 2 examples per batch in train mode "
                    "(its running variance is scaled by N / (N - 1)); use a larger batch"
                )
            count = n * grouped.shape[2]
            mean = grouped.mean(dim=2).mean(dim=0)  # equal row lengths: the mean over batch and group
            centred = grouped - mean.view(1, groups, 1)
            var = centred.square().sum(dim=2).sum(dim=0) / (count - 1)  # unbiased, as Tensor.var
            with torch.no_grad():
                keep = self.momentum
                self.running_mean.mul_(keep).add_(mean.detach(), alpha=1.0 - keep)
                self.running_var.mul_(keep).add_(var.detach(), alpha=(1.0 - keep) * n / (n - 1))
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
            centred = grouped - mean.view(1, groups, 1)
        # centred / sqrt(var + eps) * weight + bias in one pass, with a per-channel scale.
        scale = (self.weight.float().view(groups, -1) / torch.sqrt(var + self.eps).view(groups, 1)).reshape(
            1, channels, 1
        )
        out = torch.addcmul(self.bias.float().view(1, channels, 1), centred.view(n, channels, -1), scale)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum} (weight of the running value)"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _grouped(layer: str, groups_of: Callable[[int, int | None], int]) -> NormDescriber:
    """Describer of a grouped norm: '<layer> with <G> group(s)' at a given channel count."""
    return lambda channels, arg: f"{layer} with {_plural(groups_of(channels, arg), 'group')}"


@register_norm("bn", False, "BatchNorm2d", describe=lambda c, a: "BatchNorm2d")
def _bn(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.BatchNorm2d(channels)


# Version 2: nn.InstanceNorm2d as in the RNA code (version 1 was an affine GroupNorm(C, C), i.e. `gns:1`).
@register_norm(
    "in", False, "InstanceNorm2d (no affine, no running statistics)", describe=lambda c, a: "InstanceNorm2d", version=2
)
def _in(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.InstanceNorm2d(channels)


@register_norm(
    "ln", False, "layer norm over C,H,W (GroupNorm with one group)", describe=_grouped("GroupNorm", lambda c, a: 1)
)
def _ln(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(1, channels)


@register_norm("gn", True, "GroupNorm with N groups", describe=_grouped("GroupNorm", lambda c, a: int(a)))
def _gn(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(_groups_from_count("gn", channels, int(arg), where), channels)


@register_norm(
    "gns", True, "GroupNorm with groups of N channels", describe=_grouped("GroupNorm", lambda c, a: c // int(a))
)
def _gns(channels: int, arg: int | None, where: str) -> nn.Module:
    return nn.GroupNorm(_groups_from_size("gns", channels, int(arg), where), channels)


# Version 2 of bgn/bgns: the RNA code's numerics (see BatchGroupNorm); version 1 used F.batch_norm's.
@register_norm(
    "bgn",
    True,
    "batch-group norm (GBN) with N groups",
    describe=_grouped("BatchGroupNorm", lambda c, a: int(a)),
    version=2,
)
def _bgn(channels: int, arg: int | None, where: str) -> nn.Module:
    return BatchGroupNorm(channels, _groups_from_count("bgn", channels, int(arg), where))


@register_norm(
    "bgns",
    True,
    "batch-group norm (GBN) with groups of N channels",
    describe=_grouped("BatchGroupNorm", lambda c, a: c // int(a)),
    version=2,
)
def _bgns(channels: int, arg: int | None, where: str) -> nn.Module:
    return BatchGroupNorm(channels, _groups_from_size("bgns", channels, int(arg), where))
