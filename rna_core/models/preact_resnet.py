"""PreActResNet-18 (the model of Double-Win Quant), CIFAR variant, norms from the layer factory.

Wiring and init follow Double-Win Quant (`CIFAR/model/preact_resnet.py`), the only official
PreActResNet-18 of the two papers (RNA's code has none), for both methods, so the RNA vs RPI+RPT
comparison differs in the method only: a projection shortcut takes the block's raw input `x`
(not `relu(bn1(x))`), convs are Kaiming-normal over fan-out, the classifier N(0, 0.001^2). The
norm before pooling is the factory's `final_norm`: plain BatchNorm for RNA (as RNA's WideResNet,
the other pre-activation network), switchable BatchNorm for RPI+RPT (as Double-Win Quant).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..randomness import PathNetwork
from .init import init_resnet_style
from .layers import LayerFactory, Standardize, build_stages, final_norm_identity
from .registry import register_model


class PreActBlock(nn.Module):
    """Pre-activation basic block. `SHORTCUT_ON_BLOCK_INPUT`: whether a projection shortcut reads
    the block's raw input (Double-Win Quant's PreActResNet) or the pre-activated one (WideResNet)."""

    SHORTCUT_ON_BLOCK_INPUT = True

    def __init__(self, f: LayerFactory, in_ch: int, out_ch: int, stride: int, where: str):
        super().__init__()
        self.bn1 = f.norm(in_ch, f"{where}.bn1")
        self.conv1 = f.conv(in_ch, out_ch, 3, stride, 1)
        self.bn2 = f.norm(out_ch, f"{where}.bn2")
        self.conv2 = f.conv(out_ch, out_ch, 3, 1, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = f.conv(in_ch, out_ch, 1, stride, 0, role="shortcut")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            skip = x
        else:
            skip = self.shortcut(x if self.SHORTCUT_ON_BLOCK_INPUT else out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(PathNetwork):
    def __init__(self, f: LayerFactory, blocks: tuple[int, ...], num_classes: int, standardize: Standardize):
        super().__init__()
        self.standardize = standardize
        self.conv1 = f.conv(3, 64, 3, 1, 1, role="stem")
        stages, _ = build_stages(f, PreActBlock, blocks, (64, 128, 256, 512), 64, "layer")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = f.final_norm(512, "bn")
        self.linear = f.linear(512, num_classes)
        init_resnet_style(self)
        # Checkpoint identity: the shortcut wiring and the plain final norm, so a checkpoint of a model
        # wired otherwise is refused by name.
        self.identity_extra = {"shortcut": "block_input", **final_norm_identity(self.bn)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.standardize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("preact_resnet18")
def preact_resnet18(factory: LayerFactory, num_classes: int, standardize: Standardize) -> nn.Module:
    return PreActResNet(factory, (2, 2, 2, 2), num_classes, standardize)
