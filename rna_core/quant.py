"""Uniform b-bit quantization with a straight-through gradient, and quantized conv/linear layers.

These are the layers of the RPI+RPT baseline (Double-Win Quant, Fu et al., ICML 2021). Each layer
is a :class:`RandomLayer` whose choices are the precisions of a set (e.g. 4..16 bits): the active
choice decides to how many bits both the weights and the layer's input are quantized. All layers
share the tie key ``"precision"``, so one path choice is one precision for the whole network and
sampling, logging and checkpoints reuse the RNA path machinery unchanged.

The quantizer follows the original code (GATECH-EIC/Double-Win-Quant, `CIFAR/model/quantize.py`):

* Weights: per output channel, the range is that channel's own min and max, split into 2^b - 1
  equal steps (a channel of small weights keeps its own levels instead of collapsing to one).
* Inputs (activations): one scalar range per layer, shared by all precisions. In train mode the
  layer quantizes with the batch's min and max over all elements and folds them into a running
  range, ``running = 0.1 * running + 0.9 * batch`` (the original's momentum convention: 0.1 is the
  *old* value's weight). In eval mode it quantizes with the running range, clamping values outside
  it to the end levels, so a prediction never depends on the other images of the batch (which the
  early-stop protocol and AutoAttack assume).
* Backward: the identity (straight-through estimator), so PGD and SGD see gradients through every
  precision, clamped values included.

Precision: the layers compute in float32 even inside a bf16 autocast region (`train.amp_bf16`):
bf16 keeps 8 significant bits, so a 9-16-bit quantized activation or weight cast to bf16 for the
convolution would land on bf16's grid instead of its own, and the precisions above 8 bits would
all compute the same thing. The rest of the model (norms, the full-precision head) still autocasts.

Deviations, both deliberate: the original starts the running range at zero, so its first batches
measure a range shrunk toward 0; here the first training batch sets the range directly (a counter
of measured batches says which batch is the first). And a layer that was never measured (a model
that never ran a train-mode forward) falls back to the batch range in eval, so an untrained model
still runs; its predictions then do depend on the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .random_layer import RandomLayer

PRECISION_TIE = "precision"
MAX_BITS = 32
# Weight of the OLD running value when a training batch is folded in (Double-Win Quant's QConv2d
# passes momentum=0.1 to its QuantMeasure): the newest batch weighs 0.9.
RANGE_MOMENTUM = 0.1


def quantize_values(
    x: torch.Tensor, bits: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """`x` rounded to the nearest of 2^bits evenly spaced levels from `lo` to `hi`.

    `lo`/`hi` default to x's own min and max (one range for the whole tensor); given, they may be
    scalars or broadcast against `x` (one range per channel), and values outside them are clamped
    to the end levels. No gradient logic here (see :func:`quantize`). Computed in float32 even for
    half inputs, so 2^16 - 1 levels do not overflow; a constant tensor (max == min) is returned
    unchanged.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if (lo is None) != (hi is None):
        raise ValueError("give both lo and hi, or neither")
    xf = x.detach().float()
    if lo is None or hi is None:
        lo, hi = torch.aminmax(xf)
    else:
        lo, hi = lo.detach().float(), hi.detach().float()
    levels = float(2**bits - 1)
    # The floor keeps a zero-width range finite: (x - lo) / tiny is clamped to an end level, and
    # a constant tensor measured against its own range gives exactly 0 / tiny = 0.
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    # One new tensor and in-place ops keep this to a few memory passes.
    q = xf - lo
    q.div_(scale).clamp_(0.0, levels).round_().mul_(scale).add_(lo)
    return q.to(x.dtype)


def channel_range(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel min and max of a weight (dim 0 is the output channel), shaped to broadcast."""
    lo, hi = torch.aminmax(weight.detach().flatten(1), dim=1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return lo.view(shape), hi.view(shape)


class _QuantizeSTE(torch.autograd.Function):
    """Forward: uniform quantization. Backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return quantize_values(x, bits, lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return grad, None, None, None


def quantize(
    x: torch.Tensor, bits: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable uniform quantization (range as in :func:`quantize_values`): identity gradient."""
    return _QuantizeSTE.apply(x, int(bits), lo, hi)


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """A weight quantized per output channel (each channel's own min/max), identity gradient."""
    lo, hi = channel_range(weight)
    return quantize(weight, bits, lo, hi)


class RunningRange(nn.Module):
    """The input range of one quantized layer: measured in train mode, frozen in eval mode.

    `forward(x)` returns the (lo, hi) to quantize `x` with. Train mode: the batch's min and max
    over all elements, folded into the running range under no_grad (the first measured batch sets
    it; later ones mix with `momentum`, the old value's weight). Eval mode: the running range, or
    the batch's own range if nothing was ever measured. The choice is made with `torch.where` on
    the counter, so no forward waits for the device to report a value.
    """

    def __init__(self, momentum: float = RANGE_MOMENTUM):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("num_measured", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        measured = self.num_measured > 0
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.running_min.copy_(torch.where(measured, m * self.running_min + (1 - m) * lo, lo))
                self.running_max.copy_(torch.where(measured, m * self.running_max + (1 - m) * hi, hi))
                self.num_measured.add_(1)
            return lo, hi
        return torch.where(measured, self.running_min, lo), torch.where(measured, self.running_max, hi)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


@contextlib.contextmanager
def full_precision(x: torch.Tensor) -> Iterator[None]:
    """Autocast off for the block on `x`'s device (quantized levels need float32's 24 bits)."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


class _QuantLayer(RandomLayer):
    """Shared bookkeeping: the precision set, the active precision, the tie and the input range."""

    def __init__(self, precisions: Sequence[int], tie: str | None = PRECISION_TIE):
        precisions = tuple(int(b) for b in precisions)
        if not precisions:
            raise ValueError("a quantized layer needs at least one precision")
        bad = [b for b in precisions if not 1 <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"precisions must be in 1..{MAX_BITS} bits, got {bad}")
        super().__init__(len(precisions), tie)
        self.precisions = precisions
        # One range for all precisions, as in the original (its QuantMeasure is per layer).
        self.input_range = RunningRange()

    @property
    def bits(self) -> int:
        """The precision of the active choice."""
        return self.precisions[self.choice]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range(x)
        return quantize(x, self.bits, lo, hi)

    def extra_repr(self) -> str:
        return f"precisions={list(self.precisions)}, bits={self.bits}, " + super().extra_repr()


class QuantConv2d(_QuantLayer):
    """Conv2d whose weight (per output channel) and input (running range) are quantized (bias in float).

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
        with full_precision(x):
            qx = self.quantize_input(x.float())
            return F.conv2d(qx, quantize_weight(self.weight, self.bits), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, " + super().extra_repr()
        )


class QuantLinear(_QuantLayer):
    """Linear layer whose weight (per output row) and input (running range) are quantized (bias in float).

    The `rpt` models keep their classifier head in full precision (as the original does); this
    layer is for models that want a quantized linear.
    """

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
        with full_precision(x):
            qx = self.quantize_input(x.float())
            return F.linear(qx, quantize_weight(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, " + super().extra_repr()


def _reset(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """PyTorch's default init for Conv2d/Linear (Kaiming uniform, a=sqrt(5)), kept identical."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


__all__ = [
    "MAX_BITS",
    "PRECISION_TIE",
    "RANGE_MOMENTUM",
    "QuantConv2d",
    "QuantLinear",
    "RunningRange",
    "channel_range",
    "full_precision",
    "quantize",
    "quantize_values",
    "quantize_weight",
]
