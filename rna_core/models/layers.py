"""Building blocks shared by every model: input standardisation and the layer factory.

Models never construct a norm or a conv directly; they ask a :class:`LayerFactory`. The default
factory makes plain convolutions and, per norm position, either one norm (a single spec) or a
:class:`RandomNorm` over a space. Other factories (quantized layers for RPI+RPT) plug in here
without touching model code. Models name each conv's role (`stem`, `body`, `shortcut`) and
build only the classifier head with `linear`, so a factory can treat those layers differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..norms import build_norm, norm_versions, parse_space
from ..random_layer import RandomNorm

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Standardize(nn.Module):
    """First layer of every model: (x - mean) / std, so attacks work in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


CONV_ROLES = ("stem", "body", "shortcut")


def check_conv_role(role: str) -> None:
    """A misspelt role would silently build a body conv; refuse it (a programming error)."""
    if role not in CONV_ROLES:
        raise ValueError(f"conv role must be one of {', '.join(CONV_ROLES)}, got {role!r}")


class LayerFactory:
    """Makes the convs, linears and norms of a model from a norm spec or random space."""

    def __init__(self, norm: str = "bn"):
        self.norm_text = norm
        self.space = parse_space(norm)

    def norm(self, channels: int, where: str) -> nn.Module:
        if len(self.space) == 1:
            return build_norm(self.space[0], channels, where)
        return RandomNorm(self.space, channels, where)

    def final_norm(self, channels: int, where: str) -> nn.Module:
        """The norm between the last pre-activation block and global pooling (WRN, PreActResNet).

        A plain BatchNorm2d whatever the space, never random: RNA's WideResNet builds it with
        `nn.BatchNorm2d` directly (`model/wide_resnet.py`), so with `bn,gns:1` no path standardises
        each image per channel right before pooling. The `rpt` factory puts its switchable
        BatchNorm here instead, as Double-Win Quant does.
        """
        return nn.BatchNorm2d(channels)

    def conv(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, *, role: str = "body"
    ) -> nn.Module:
        """A bias-free conv. `role` (one of CONV_ROLES) says where it sits: `stem` (the first conv,
        on the image), `shortcut` (a residual projection) or `body`. This factory builds all three
        alike; the `rpt` factory keeps stem and shortcut convs in full precision, as the original.
        """
        check_conv_role(role)
        return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """The classifier head (the only linear layer the models build)."""
        return nn.Linear(in_features, out_features)

    def describe(self) -> dict[str, str]:
        """What the factory builds, for checkpoints and model cards.

        `norm_versions` (only when the space holds a norm whose numerics changed, e.g. `in=2`)
        makes a checkpoint of the earlier layer fail the identity check by name.
        """
        versions = norm_versions(self.space)
        return {"norm": ",".join(map(str, self.space)), **({"norm_versions": versions} if versions else {})}


def final_norm_identity(norm: nn.Module) -> dict[str, str]:
    """Checkpoint-identity entry of a model whose final norm is a plain BatchNorm (not random).

    Such models made that norm a RandomNorm before; the entry makes their older checkpoints fail
    the identity check instead of loading into the plain layer.
    """
    return {} if isinstance(norm, RandomNorm) else {"final_norm": "bn"}


BlockBuilder = Callable[[LayerFactory, int, int, int, str], nn.Module]


def build_stages(
    f: LayerFactory,
    block: BlockBuilder,
    blocks_per_stage: Sequence[int],
    widths: Sequence[int],
    in_ch: int,
    prefix: str,
) -> tuple[list[nn.Sequential], int]:
    """The residual stages of a CIFAR ResNet/WRN: each stage but the first halves the resolution.

    Returns the stages and the output channel count. Blocks are named `<prefix><stage>.<index>`
    (e.g. `layer2.0`), which is how norm-configuration errors name a layer.
    """
    stages = []
    for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
        layers = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            layers.append(block(f, in_ch, width, stride, f"{prefix}{i + 1}.{j}"))
            in_ch = width
        stages.append(nn.Sequential(*layers))
    return stages, in_ch
