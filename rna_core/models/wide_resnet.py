"""WideResNet-34-10 (the RNA paper's "WideResNet32"): pre-activation blocks (no dropout), factory norms.

As RNA's `model/wide_resnet.py` (and Double-Win Quant's copy): a projection shortcut reads the
pre-activated input `relu(bn1(x))`; the norm before pooling is the factory's `final_norm` (plain
BatchNorm for RNA, so WRN-34-10 has 30 random layers; switchable BatchNorm for RPI+RPT); convs are
drawn N(0, 2 / (k*k*out)) and the classifier bias is zero.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..randomness import PathNetwork
from .init import init_wide_resnet_style
from .layers import LayerFactory, Standardize, build_stages, final_norm_identity
from .preact_resnet import PreActBlock
from .registry import register_model


class WideBasicBlock(PreActBlock):
    """The WideResNet block: a PreActBlock whose projection shortcut reads the pre-activated input."""

    SHORTCUT_ON_BLOCK_INPUT = False


class WideResNet(PathNetwork):
    def __init__(self, f: LayerFactory, depth: int, widen: int, num_classes: int, standardize: Standardize):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.standardize = standardize
        self.conv1 = f.conv(3, widths[0], 3, 1, 1, role="stem")
        stages, in_ch = build_stages(f, WideBasicBlock, (n, n, n), widths[1:], widths[0], "block")
        self.block1, self.block2, self.block3 = stages
        self.bn = f.final_norm(in_ch, "bn")
        self.linear = f.linear(in_ch, num_classes)
        init_wide_resnet_style(self)
        # Checkpoint identity: the plain final norm (RNA method), so a checkpoint whose final norm
        # was random is refused by name.
        self.identity_extra = final_norm_identity(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.standardize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("wrn34_10")
def wrn34_10(factory: LayerFactory, num_classes: int, standardize: Standardize) -> nn.Module:
    return WideResNet(factory, 34, 10, num_classes, standardize)


@register_model("wrn16_2")
def wrn16_2(factory: LayerFactory, num_classes: int, standardize: Standardize) -> nn.Module:
    """A small WideResNet for fast experiments and tests (not a paper model)."""
    return WideResNet(factory, 16, 2, num_classes, standardize)
