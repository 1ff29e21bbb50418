"""ResNet-18, CIFAR variant (3x3 stem, no max-pool), with every norm from the layer factory.

As RNA's `model/resnet.py`: 20 norm layers (two per block, one per projection shortcut, one after the
stem), convs Kaiming-normal over fan-out, the classifier N(0, 0.001^2), zero biases.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..randomness import PathNetwork
from .init import init_resnet_style
from .layers import LayerFactory, Standardize, build_stages
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, f: LayerFactory, in_ch: int, out_ch: int, stride: int, where: str):
        super().__init__()
        self.conv1 = f.conv(in_ch, out_ch, 3, stride, 1)
        self.bn1 = f.norm(out_ch, f"{where}.bn1")
        self.conv2 = f.conv(out_ch, out_ch, 3, 1, 1)
        self.bn2 = f.norm(out_ch, f"{where}.bn2")
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                f.conv(in_ch, out_ch, 1, stride, 0, role="shortcut"), f.norm(out_ch, f"{where}.shortcut")
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(PathNetwork):
    def __init__(self, f: LayerFactory, blocks: tuple[int, ...], num_classes: int, standardize: Standardize):
        super().__init__()
        self.standardize = standardize
        self.conv1 = f.conv(3, 64, 3, 1, 1, role="stem")
        self.bn1 = f.norm(64, "bn1")
        stages, _ = build_stages(f, BasicBlock, blocks, (64, 128, 256, 512), 64, "layer")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = f.linear(512, num_classes)
        init_resnet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.standardize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(factory: LayerFactory, num_classes: int, standardize: Standardize) -> nn.Module:
    return ResNet(factory, (2, 2, 2, 2), num_classes, standardize)
