"""A small CNN for smoke runs and fast tests (not a paper model): 4 norm layers, seconds on a CPU.

The head pools to 2x2 and flattens rather than pooling globally: with an instance-style norm
(`in`, `gns:1`) as the last norm, a global average would leave each channel with a per-example
mean fixed by the norm's bias, and the paths choosing it would barely see the input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..randomness import PathNetwork
from .layers import LayerFactory, Standardize
from .registry import register_model


class SmallCNN(PathNetwork):
    def __init__(self, f: LayerFactory, num_classes: int, standardize: Standardize, width: int = 16):
        super().__init__()
        self.standardize = standardize
        chans = (width, width * 2, width * 4, width * 4)
        convs, norms = [], []
        in_ch = 3
        for i, ch in enumerate(chans):
            convs.append(f.conv(in_ch, ch, 3, 1 if i == 0 else 2, 1, role="stem" if i == 0 else "body"))
            norms.append(f.norm(ch, f"norm{i + 1}"))
            in_ch = ch
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.linear = f.linear(in_ch * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.standardize(x)
        for conv, norm in zip(self.convs, self.norms):
            out = F.relu(norm(conv(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 2).flatten(1))


@register_model("small_cnn")
def small_cnn(factory: LayerFactory, num_classes: int, standardize: Standardize) -> nn.Module:
    return SmallCNN(factory, num_classes, standardize)
