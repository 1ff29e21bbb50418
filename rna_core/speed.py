"""Speed settings of the training step: channels_last memory format and bf16 autocast.

Both are off by default (`TrainConfig.channels_last`, `TrainConfig.amp_bf16`) because they change
results within rounding (channels_last picks other convolution kernels; bf16 keeps 8 bits of
mantissa), and a run's numbers should not depend on a flag nobody asked for. On a GPU with tensor
cores both pay (see docs/benchmarks.md); on CPU they are allowed but rarely help.

`train_step` honours `channels_last` and `amp_bf16` itself. torch.compile is not offered: with
random paths dynamo treats each RandomLayer's integer `choice` as a constant, so every new path
is a new graph (K^L paths; after `recompile_limit` graphs it falls back to eager), measured in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

_FLAG = "_rna_channels_last"


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy `t` to `device`; a CPU->CUDA copy goes through pinned memory without a host sync.

    A plain `.to("cuda")` of pageable memory waits until the GPU has finished all queued work,
    which stalls the host at every call (e.g. at the start of every training step). Same values.
    """
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def use_channels_last(model: nn.Module) -> nn.Module:
    """Convert the model's 4-d parameters and buffers to channels_last, once (idempotent).

    `Module.to(memory_format=...)` rewrites `param.data` in place, so an optimizer built earlier
    still holds the same parameter objects. Call it before wrapping the model in DDP.
    """
    if not getattr(model, _FLAG, False):
        model.to(memory_format=torch.channels_last)
        setattr(model, _FLAG, True)
    return model


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-d batch in channels_last layout (same values); other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextlib.contextmanager
def bf16_autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when enabled; a plain block otherwise."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


class AutocastForward(nn.Module):
    """Runs the wrapped model's forward under bf16 autocast and returns float32 logits.

    Used by the attack so that only the forward is autocast: the loss and the input gradient
    (`torch.autograd.grad`, called outside the wrapper) stay float32, as autocast recommends.
    Random layers are reached through `modules()`, so paths set on the wrapper reach the model.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.inner(x)
        return out.float()


__all__ = ["AutocastForward", "as_channels_last", "bf16_autocast", "to_device_async", "use_channels_last"]
