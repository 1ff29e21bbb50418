"""Weight initialisation per architecture, as the official code of each paper does it.

Two schemes, applied once at the end of a model's constructor (after PyTorch's default init,
which they overwrite), with draws from torch's global generator, so `torch.manual_seed(seed)`
before `create_model` makes the weights reproducible (the training loop seeds it with
`train.seed`):

* :func:`init_resnet_style`: RNA's ResNet (`model/resnet.py`, `init_params`) and Double-Win
  Quant's PreActResNet (`CIFAR/model/preact_resnet.py`, the same `init_params`). Convolutions
  Kaiming-normal over fan-out (std sqrt(2 / (k*k*out))), the classifier's weight N(0, 0.001^2),
  all biases zero.
* :func:`init_wide_resnet_style`: the WideResNet of both papers (`model/wide_resnet.py`,
  `CIFAR/model/wide_resnet.py`). Convolutions N(0, 2 / (k*k*out)) (the same law, drawn by hand),
  the classifier keeps PyTorch's default weight and gets a zero bias.

Quantized convolutions (RPI+RPT) are convolutions here, as Double-Win Quant's QConv2d subclasses
nn.Conv2d. Norm layers are left at weight 1 and bias 0: the official code sets BatchNorm to
exactly that (PyTorch's default), and its GroupNorm and GroupBatchNorm2d start there too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch.nn as nn

from ..quant import QuantConv2d, QuantLinear

CLASSIFIER_STD = 0.001  # RNA resnet.py / Double-Win Quant preact_resnet.py: init.normal_(std=0.001)


def _convs(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (nn.Conv2d, QuantConv2d)))


def _linears(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear)))


def _zero_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def init_resnet_style(model: nn.Module) -> nn.Module:
    """RNA's ResNet / Double-Win Quant's PreActResNet init (see the module docstring)."""
    for m in _convs(model):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")  # default gain: sqrt(2), as the official call
        _zero_bias(m)
    for m in _linears(model):
        nn.init.normal_(m.weight, std=CLASSIFIER_STD)
        _zero_bias(m)
    return model


def init_wide_resnet_style(model: nn.Module) -> nn.Module:
    """The WideResNet init of both papers (see the module docstring)."""
    for m in _convs(model):
        kh, kw = m.weight.shape[-2:]
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (kh * kw * m.weight.shape[0])))
    for m in _linears(model):
        _zero_bias(m)
    return model


__all__ = ["CLASSIFIER_STD", "init_resnet_style", "init_wide_resnet_style"]
