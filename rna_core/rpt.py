"""The RPI+RPT baseline (Double-Win Quant, Fu et al., ICML 2021) as the model method `rpt`.

As in the original (GATECH-EIC/Double-Win-Quant, `CIFAR/model/preact_resnet.py`), every body conv
is quantized (weights per output channel, inputs with a running range; see `quant.py`) while the
stem conv (on the image), the shortcut projections and the classifier head stay in full precision;
every norm is a switchable BatchNorm: one BatchNorm per precision, each with its own statistics,
because activations at 4 bits and at 16 bits have different distributions. The quantized convs and
the switchable norms are `RandomLayer`s tied under ``"precision"``, so a path is one precision for
the whole network: a `uniform` draw is one random precision (RPI at inference, RPT in training)
and everything built for RNA paths (samplers, EOT, protocols, logging, checkpoints) works on these
models unchanged.

The checkpoint identity carries ``"quantizer": "dwq"`` (this quantizer), so a checkpoint written
with the earlier per-tensor, batch-range quantizer (every layer quantized, no running ranges) is
refused with a CheckpointMismatchError naming that key instead of failing on missing weights.

    model = rna_core.create_model("preact_resnet18", method="rpt", norm="bn", precisions="4-16")
    rna_core.set_path(model, path_for_precision(model, 8))
    precision_of(model)   # 8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .errors import ConfigError
from .models.layers import LayerFactory, check_conv_role
from .norms import NormSpec
from .paths import Path, get_path, random_layers
from .quant import MAX_BITS, PRECISION_TIE, QuantConv2d, QuantLinear
from .random_layer import RandomNorm

# How RPT draws precisions in training: the original draws one per iteration, used both to craft
# the adversarial batch and for the update; the alternative draws the two independently.
RPT_DRAWS = ("per_iteration", "attack_and_update")
DEFAULT_PRECISIONS = "4-16"
# Names the quantizer in the checkpoint identity: Double-Win Quant's (per-output-channel weights,
# running input ranges, full-precision stem/shortcuts/head). Change it when the quantizer changes.
QUANTIZER = "dwq"
# Conv roles the original keeps in full precision (QConv2d called with full_prec=True).
FULL_PRECISION_ROLES = ("stem", "shortcut")


def parse_precisions(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """Read a precision set: `"4-16"`, `"4,8,16"`, `"4-8,16"`, `8` or a sequence of ints.

    Returns the bit widths in ascending order; raises ConfigError on anything else (bits outside
    1..32, a repeated bit width, an empty set, a descending range).
    """
    hint = "write e.g. '4-16' or '4,8,16'"
    if isinstance(spec, bool):
        raise ConfigError(f"precisions {spec!r} is not a set of bit widths; {hint}")
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        items = list(spec)
    bits: list[int] = []
    for item in items:
        if isinstance(item, str) and "-" in item.strip().lstrip("-"):
            lo_text, _, hi_text = item.partition("-")
            lo, hi = _as_bits(lo_text, spec, hint), _as_bits(hi_text, spec, hint)
            if lo > hi:
                raise ConfigError(f"precisions '{spec}': range '{item}' goes down; write the smaller bit width first")
            bits.extend(range(lo, hi + 1))
        else:
            bits.append(_as_bits(item, spec, hint))
    if not bits:
        raise ConfigError(f"precisions '{spec}' is empty; {hint}")
    if len(set(bits)) != len(bits):
        raise ConfigError(f"precisions '{spec}' lists a bit width twice; list each precision once")
    return tuple(sorted(bits))


def _as_bits(item: Any, spec: Any, hint: str) -> int:
    if isinstance(item, bool):
        raise ConfigError(f"precisions '{spec}': {item!r} is not a bit width; {hint}")
    try:
        value = int(str(item).strip()) if not isinstance(item, int) else item
    except ValueError:
        raise ConfigError(f"precisions '{spec}': '{item}' is not an integer bit width; {hint}") from None
    if not 1 <= value <= MAX_BITS:
        raise ConfigError(f"precisions '{spec}': {value} bits is outside 1..{MAX_BITS}; {hint}")
    return value


def format_precisions(bits: Sequence[int]) -> str:
    """Canonical text of a precision set (consecutive runs as ranges): (4,...,16) -> '4-16'."""
    runs: list[list[int]] = []
    for b in sorted(bits):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


class SwitchableBatchNorm(RandomNorm):
    """One BatchNorm2d per precision (own affine and running statistics), switched by the path."""

    def __init__(self, channels: int, precisions: Sequence[int], where: str = "", tie: str | None = PRECISION_TIE):
        super().__init__(tuple(NormSpec("bn") for _ in precisions), channels, where, tie, allow_identical=True)
        self.precisions = tuple(int(b) for b in precisions)

    @property
    def bits(self) -> int:
        return self.precisions[self.choice]

    def extra_repr(self) -> str:
        tie = f", tie={self.tie!r}" if self.tie else ""
        return f"precisions={list(self.precisions)}, bits={self.bits}{tie}"


class RptFactory(LayerFactory):
    """Quantized body convs and switchable BatchNorms, all tied to one precision choice.

    Stem and shortcut convs and the classifier head are plain full-precision layers (not random
    layers, so not part of a path), as in the original.
    """

    def __init__(self, precisions: str | int | Sequence[int] = DEFAULT_PRECISIONS):
        super().__init__("bn")
        self.precisions = parse_precisions(precisions)

    def norm(self, channels: int, where: str) -> nn.Module:
        return SwitchableBatchNorm(channels, self.precisions, where)

    def final_norm(self, channels: int, where: str) -> nn.Module:
        # Double-Win Quant's PreActResNet and WideResNet switch their norm before pooling too.
        return SwitchableBatchNorm(channels, self.precisions, where)

    def conv(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, *, role: str = "body"
    ) -> nn.Module:
        check_conv_role(role)
        if role in FULL_PRECISION_ROLES:
            return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        return QuantConv2d(in_ch, out_ch, kernel, stride, padding, bias=False, precisions=self.precisions)

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        # The classifier head: a plain nn.Linear in the original too.
        return nn.Linear(in_features, out_features)

    def describe(self) -> dict[str, str]:
        # The precision set and the quantizer are part of the checkpoint identity: a model with
        # another set, or a checkpoint of the earlier quantizer, is refused.
        return {"norm": "bn", "precisions": format_precisions(self.precisions), "quantizer": QUANTIZER}


# ---------------------------------------------------------------- paths <-> precisions


def _precision_layers(model: nn.Module) -> list[Any]:
    layers = [m for m in random_layers(model) if isinstance(m, (QuantConv2d, QuantLinear, SwitchableBatchNorm))]
    if not layers:
        raise ConfigError("the model has no quantized layers; build it with method 'rpt' to use precisions")
    return layers


def precision_of(model: nn.Module, path: Path | str | None = None) -> int:
    """Bit width the model runs at (or would run at under `path`), e.g. for logging a drawn path."""
    layers = random_layers(model)
    if path is None:
        path = get_path(model)
    elif isinstance(path, str):
        path = Path.parse(path)
    if len(path) != len(layers):
        raise ConfigError(f"path '{path}' has {len(path)} choices but the model has {len(layers)} random layers")
    quant = {id(m) for m in _precision_layers(model)}
    widths = {layer.precisions[c] for layer, c in zip(layers, path.choices) if id(layer) in quant}
    if len(widths) != 1:
        raise ConfigError(f"path '{path}' mixes precisions {sorted(widths)}; an rpt path runs one precision")
    return widths.pop()


def precisions_of(model: nn.Module) -> tuple[int, ...]:
    """The model's precision set."""
    return tuple(_precision_layers(model)[0].precisions)


def path_for_precision(model: nn.Module, bits: int) -> Path:
    """The path that runs every layer at `bits` (for a fixed-precision evaluation, or `fixed:<path>`)."""
    layers = random_layers(model)
    choices = []
    for layer in layers:
        precisions = getattr(layer, "precisions", None)
        if precisions is None:
            raise ConfigError(
                "the model has random layers that are not precisions; path_for_precision needs an rpt model"
            )
        if bits not in precisions:
            raise ConfigError(f"{bits} bits is not in the model's precisions {format_precisions(precisions)}")
        choices.append(precisions.index(bits))
    if not choices:
        raise ConfigError("the model has no quantized layers; build it with method 'rpt' to use precisions")
    return Path(tuple(choices))


__all__ = [
    "DEFAULT_PRECISIONS",
    "FULL_PRECISION_ROLES",
    "QUANTIZER",
    "RPT_DRAWS",
    "RptFactory",
    "SwitchableBatchNorm",
    "format_precisions",
    "parse_precisions",
    "path_for_precision",
    "precision_of",
    "precisions_of",
]
