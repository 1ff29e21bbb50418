"""Uniform b-bit quantization with a straight-through gradient, and quantized conv/linear layers.

These are the layers of the RPI+RPT baseline (Double-Win Quant, Fu et al., ICML 2021). Each layer
is a :class:`RandomLayer` whose choices are the precisions of a set (e.g. 4..16 bits): the active
choice decides to how many bits both the weights and the layer's input are quantized. All layers
share the tie key ``"precision"``, so one path choice is one precision for the whole network and
sampling, logging and checkpoints reuse the RNA path machinery unchanged.

The quantizer is the one the paper uses: per tensor and per forward, the range is the tensor's own
min and max, split into 2^b - 1 equal steps; the backward pass is the identity (straight-through
estimator), so PGD and SGD see gradients through every precision.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .random_layer import RandomLayer

PRECISION_TIE = "precision"
MAX_BITS = 32


def quantize_values(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`x` rounded to the nearest of 2^bits evenly spaced levels between its min and max.

    No gradient logic here (see :func:`quantize`). Computed in float32 even for half inputs, so
    2^16 - 1 levels do not overflow; a constant tensor (max == min) is returned unchanged.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    xf = x.detach().float()
    lo, hi = torch.aminmax(xf)
    levels = float(2**bits - 1)
    # The floor keeps a constant tensor finite: (x - lo) is exactly 0 there, so 0 / tiny = 0.
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    # (x - lo) / scale lies in [0, levels] up to rounding error, so no clamp is needed; one new
    # tensor and in-place ops keep this to a few memory passes.
    q = xf - lo
    q.div_(scale).round_().mul_(scale).add_(lo)
    return q.to(x.dtype)


class _QuantizeSTE(torch.autograd.Function):
    """Forward: uniform quantization. Backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        return quantize_values(x, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable uniform quantization: quantized forward, identity gradient."""
    return _QuantizeSTE.apply(x, int(bits))


class _QuantLayer(RandomLayer):
    """Shared bookkeeping: the precision set, the active precision, and the tie."""

    def __init__(self, precisions: Sequence[int], tie: str | None = PRECISION_TIE):
        precisions = tuple(int(b) for b in precisions)
        if not precisions:
            raise ValueError("a quantized layer needs at least one precision")
        bad = [b for b in precisions if not 1 <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"precisions must be in 1..{MAX_BITS} bits, got {bad}")
        super().__init__(len(precisions), tie)
        self.precisions = precisions

    @property
    def bits(self) -> int:
        """The precision of the active choice."""
        return self.precisions[self.choice]

    def extra_repr(self) -> str:
        return f"precisions={list(self.precisions)}, bits={self.bits}, " + super().extra_repr()


class QuantConv2d(_QuantLayer):
    """Conv2d whose weight and input are quantized to the active precision (bias kept in float).

    Parameters are named and initialised as in `nn.Conv2d`, so state dicts look familiar.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        precisions: Sequence[int] = (8,),
        tie: str | None = PRECISION_TIE,
    ):
        super().__init__(precisions, tie)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _reset(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bits
        return F.conv2d(quantize(x, b), quantize(self.weight, b), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, " + super().extra_repr()
        )


class QuantLinear(_QuantLayer):
    """Linear layer whose weight and input are quantized to the active precision (bias in float)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        precisions: Sequence[int] = (8,),
        tie: str | None = PRECISION_TIE,
    ):
        super().__init__(precisions, tie)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _reset(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bits
        return F.linear(quantize(x, b), quantize(self.weight, b), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, " + super().extra_repr()


def _reset(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """PyTorch's default init for Conv2d/Linear (Kaiming uniform, a=sqrt(5)), kept identical."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


__all__ = ["MAX_BITS", "PRECISION_TIE", "QuantConv2d", "QuantLinear", "quantize", "quantize_values"]
