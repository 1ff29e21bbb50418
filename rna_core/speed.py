"""Speed settings of the training step: bf16 autocast and channels_last memory format.

`TrainConfig.amp_bf16` and `TrainConfig.channels_last` are `auto` by default: on where the device
has bf16 fast paths (a CUDA GPU with native bf16, i.e. compute capability >= 8.0; a CPU with
AMX-BF16 or AVX-512 BF16), off elsewhere; `true`/`false` force them. :func:`resolve_speed` turns
a config into the booleans a step runs with, and jobs log those resolved values. Measured on this
project's 2-core CPU (AVX-512 BF16; docs/benchmarks.md): the blackbox PGD-10 step of ResNet-18
runs about 3x faster in bf16 + channels_last than in fp32 (batch 128), with clean and PGD accuracy
after training that agree with fp32 within the stated tolerance (tests/test_bf16_training.py).
They stay switchable because they change results within rounding (bf16 keeps 8 bits of mantissa;
channels_last picks other convolution kernels), so bit-exact comparisons need `false`.

How the step uses them (`rna_core.training.train_step`): the attack's forwards go through
:class:`AutocastForward` (forward in bf16, logits back to fp32, so the loss and the input gradient
stay fp32 as autocast recommends), inside :func:`bf16_weight_cache`, which makes autocast cast
each weight to bf16 once per attack instead of once per PGD step. The update forward runs under
autocast with the loss in fp32 and the backward outside it; the optimizer updates fp32 weights.
In channels_last, norm layers whose CPU kernels are slow in that layout (GroupNorm with small
groups, e.g. `gns:1`: 10x slower than on a contiguous tensor in bf16) are routed around those
kernels (:func:`use_channels_last`), so the batch keeps its layout through the network: GroupNorm
with one channel per group runs as two kernels that torch.compile generates for that norm alone
(forward, and a written-out backward; both in channels_last, statistics in fp32); 2-7 channels
per group, or where those kernels cannot be built, run on a contiguous copy.

The model itself is not compiled: with random paths dynamo treats each RandomLayer's integer
`choice` as a constant, so every new path is a new graph (K^L paths; after `recompile_limit`
graphs it falls back to eager), measured in docs/benchmarks.md. The fused GroupNorm's kernels are
functions of detached tensors alone (no path inside), so a few graphs serve every path and shape.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .norms import BatchGroupNorm

_FLAG = "_rna_channels_last"
SPEED_CHOICES = ("auto", "true", "false")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the bf16 instructions oneDNN uses


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


def wait_for_device(device: torch.device | str) -> None:
    """Wait until `device` has run everything queued (CUDA runs asynchronously): before a clock is read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- auto: the device


def speed_choice(value: Any, key: str = "train.amp_bf16") -> str:
    """`auto`, `true` or `false` from a config value (YAML booleans and their usual spellings too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return "true"
    if text in ("false", "no", "0", "off"):
        return "false"
    if text == "auto":
        return "auto"
    raise ConfigError(f"{key} must be auto, true or false, got {value!r}")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The bf16 instruction sets of this CPU that oneDNN's bf16 kernels use (empty: none).

    From torch's own CPU probe (cpuinfo) when it answers, else from /proc/cpuinfo's flags.
    Plain AVX-512 without these emulates bf16 and is not faster than fp32.
    """
    found: set[str] = set()
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private but stable since torch 2.3: cpuinfo's flags
        found = {name for name in CPU_BF16_FLAGS if caps.get(name)}
    except (AttributeError, RuntimeError, TypeError):
        found = _cpuinfo_flags() & set(CPU_BF16_FLAGS)
    if not torch.backends.mkldnn.is_available():  # no oneDNN: bf16 convolutions have no fast kernel
        return ()
    return tuple(name for name in CPU_BF16_FLAGS if name in found)


def bf16_fast_path(device: torch.device | str) -> str | None:
    """Why `device` runs bf16 fast (a short text for logs), or None when it does not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:  # before Ampere bf16 is emulated (is_bf16_supported() says True there too)
            return None
        return f"cuda: {torch.cuda.get_device_name(index)} (sm_{major}{minor}, bf16 tensor cores)"
    if device.type == "cpu":
        features = cpu_bf16_features()
        return f"cpu: {', '.join(features)}" if features else None
    return None


@dataclass(frozen=True)
class SpeedFlags:
    """The speed settings a step runs with, after `auto` was decided for a device."""

    amp_bf16: bool
    channels_last: bool
    reason: str  # why auto decided as it did (or "set explicitly")

    def params(self) -> dict[str, str]:
        """As MLflow params: `resolved.train.*` beside the configured `train.*` values."""
        return {
            "resolved.train.amp_bf16": str(self.amp_bf16).lower(),
            "resolved.train.channels_last": str(self.channels_last).lower(),
            "resolved.bf16_fast_path": self.reason,
        }


def resolve_speed(cfg: Any, device: torch.device | str) -> SpeedFlags:
    """Decide `auto` for `device`: a TrainConfig's amp_bf16 and channels_last as booleans."""
    amp, layout = speed_choice(cfg.amp_bf16, "train.amp_bf16"), speed_choice(cfg.channels_last, "train.channels_last")
    if "auto" not in (amp, layout):
        return SpeedFlags(amp == "true", layout == "true", "set explicitly")
    return _resolve_auto(amp, layout, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _resolve_auto(amp: str, layout: str, device: str) -> SpeedFlags:
    fast = bf16_fast_path(device)
    reason = fast or f"{torch.device(device).type}: no bf16 fast path (off)"
    return SpeedFlags(
        amp == "true" or (amp == "auto" and fast is not None),
        layout == "true" or (layout == "auto" and fast is not None),
        reason,
    )


# ----------------------------------------------------------------------------- channels_last


# Below this many channels per group, the CPU's channels_last GroupNorm kernel in bf16 runs about
# one group per instruction: `gns:1` (1 channel per group) forward + backward at batch 128 took
# 4-14x longer than copying to contiguous, normalizing there and copying back, and 8-19x longer
# than the fused kernels below; from 16 channels per group on it is the fastest (measured per
# ResNet-18 stage, bench/norm_layout.py, docs/benchmarks.md). In fp32 the channels_last kernel is
# not slower enough to pay for the copies.
SMALL_GROUP_CHANNELS = 8


def _layout_guarded(module: nn.Module) -> bool:
    """Norm layers that may hand back another layout than channels_last, or need a contiguous input:
    GroupNorm (slow channels_last kernel with small groups), InstanceNorm and batch-group norm
    (they reshape, which copies to contiguous and returns contiguous)."""
    return isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, BatchGroupNorm))


def _small_group_bf16_cpu(module: nn.GroupNorm, x: Any) -> bool:
    """The case the channels_last CPU GroupNorm kernel is slow at: few channels per group, bf16/fp16."""
    return (
        module.num_channels // module.num_groups < SMALL_GROUP_CHANNELS
        and isinstance(x, torch.Tensor)
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and not x.is_contiguous()
    )


def _channel_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm with one channel per group: output in x's dtype, fp32 mean and 1/std per (n, c).

    Statistics in fp32, as `F.group_norm` under autocast computes them; compiled, the kernels read
    and write the batch's layout (channels_last) directly.
    """
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean) * rstd * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y.to(x.dtype), mean, rstd


def _channel_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_channel_norm_forward` for x (x's dtype), weight and bias (fp32), in fp32 inside."""
    g = grad.float()
    xhat = (x.float() - mean) * rstd
    # one reduction pass for the per-(n, c) sums, one pointwise pass for grad_x
    sum_g = g.sum(dim=(2, 3), keepdim=True)
    sum_g_xhat = (g * xhat).sum(dim=(2, 3), keepdim=True)
    grad_bias = sum_g.sum(dim=(0, 2, 3))
    grad_weight = sum_g_xhat.sum(dim=(0, 2, 3))
    hw = x.shape[2] * x.shape[3]
    grad_x = (g - sum_g / hw - xhat * (sum_g_xhat / hw)) * (rstd * weight.view(1, -1, 1, 1))
    return grad_x.to(x.dtype), grad_weight, grad_bias


# `RNA_FUSED_GROUPNORM=0` keeps the contiguous-copy route (to compare the two, or where building
# the kernel misbehaves); the fused one is switched off by itself when it cannot be built.
_fused_state = {"enabled": os.environ.get("RNA_FUSED_GROUPNORM", "1") != "0", "failure": None}


# Graphs each kernel may have. Dynamic shapes and detached inputs leave few (autocast on or off,
# the input dtype, small tensors); dynamo's default of 8 per function is shared by all code and,
# when reached, silently runs the Python function eagerly, which is slower than the copy route.
RECOMPILE_LIMIT = 32


@functools.cache
def _compiled(fn: Any) -> Any:
    # dynamic: one graph for every layer's channels, spatial size and batch, not one per shape.
    # Both run inside an autograd.Function on detached tensors (never nn.Parameters, whose shapes
    # dynamo keeps static), so training, attacks and no-grad evaluation share their graphs.
    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)

    return run


class _FusedChannelNorm(torch.autograd.Function):
    """Autograd around the two compiled kernels (the backward is written out, see above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = x.detach(), weight.detach()
        y, mean, rstd = _compiled(_channel_norm_forward)(x, weight, bias.detach(), eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        try:
            grad_x, grad_weight, grad_bias = _compiled(_channel_norm_backward)(grad.detach(), x, weight, mean, rstd)
        except Exception as exc:  # the backward kernel could not be built: the same math, uncompiled
            _switch_off(exc)
            grad_x, grad_weight, grad_bias = _channel_norm_backward(grad, x, weight, mean, rstd)
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def set_fused_group_norm(enabled: bool) -> None:
    """Route small-group bf16 channels_last GroupNorm through the fused kernel (True) or a copy."""
    _fused_state["enabled"] = bool(enabled)


def fused_group_norm_active() -> bool:
    """Whether the fused kernel is in use: enabled and not switched off by a failed build."""
    return bool(_fused_state["enabled"]) and _fused_state["failure"] is None


def _fused_group_norm(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor | None:
    """The fused kernel's output, or None where it is off or cannot be built (then: the copy)."""
    if not fused_group_norm_active():
        return None
    weight = module.weight if module.weight is not None else torch.ones(x.shape[1])
    bias = module.bias if module.bias is not None else torch.zeros(x.shape[1])
    try:
        return _FusedChannelNorm.apply(x, weight, bias, module.eps)
    except Exception as exc:  # no C++ compiler, or inductor cannot build here: keep training, slower
        _switch_off(exc)
        return None


def _switch_off(exc: Exception) -> None:
    """Remember why the fused kernel failed and warn once; from now on the copy route runs."""
    first = _fused_state["failure"] is None
    _fused_state["failure"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if first:
        warnings.warn(
            "rna_core.speed: the fused channels_last GroupNorm could not be built "
            f"({_fused_state['failure']}); small-group GroupNorm runs on a contiguous copy instead",
            RuntimeWarning,
            stacklevel=3,
        )


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that steps around the slow channels_last CPU kernel for small groups in bf16.

    Same parameters, buffers and state_dict as nn.GroupNorm (use_channels_last swaps the class of
    existing layers in place); other inputs run nn.GroupNorm's own forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _small_group_bf16_cpu(self, x):
            # fused for one channel per group (RNA's `gns:1`) only: a grouped form of the kernel
            # with 4 channels per group was 10-30x slower than the copy route (bench/norm_layout.py)
            out = _fused_group_norm(self, x) if self.num_groups == self.num_channels else None
            if out is not None:
                return out
            x = x.contiguous()  # (the input gradient then comes back contiguous)
        return super().forward(x)


def _channels_last_output(module: nn.Module, args: tuple, out: Any) -> Any:
    """Hand channels_last on to the next layer (a no-op when the output already is)."""
    if isinstance(out, torch.Tensor) and out.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return None


def use_channels_last(model: nn.Module) -> nn.Module:
    """Convert the model to channels_last, once (idempotent); same parameters, same state_dict.

    `Module.to(memory_format=...)` rewrites `param.data` in place, so an optimizer built earlier
    still holds the same parameter objects. GroupNorm layers become :class:`ChannelsLastGroupNorm`
    (small groups on a bf16 CPU batch: the fused kernel for one channel per group, else a
    contiguous copy), and every norm that may change the layout gets a hook handing channels_last
    on, so the next convolution sees channels_last again. Without them a ResNet-18 `bn,gns:1` bf16
    step on this CPU spent half its time in channels_last GroupNorm kernels, and was only 1.4x
    faster than fp32; with the copies instead of the fused kernel it was 1.13x slower than the
    same `bn` step (docs/benchmarks.md). Call it before wrapping the model in DDP.
    """
    if not getattr(model, _FLAG, False):
        model.to(memory_format=torch.channels_last)
        for module in model.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = ChannelsLastGroupNorm
            if _layout_guarded(module):
                module.register_forward_hook(_channels_last_output)
        setattr(model, _FLAG, True)
    return model


def optimizer_state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state (SGD's momentum) the parameter's memory format.

    A resumed run loads the optimizer state as it was saved; a checkpoint written in another layout
    (another machine's `auto`, or `channels_last` switched) would otherwise leave contiguous
    momentum beside channels_last weights: slower update kernels, and not the state a run that
    never stopped has.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if param.dim() != 4:
                continue
            layout = torch.channels_last if param.is_contiguous(memory_format=torch.channels_last) else None
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    if layout is not None:
                        state[key] = value.contiguous(memory_format=layout)
                    elif not value.is_contiguous():
                        state[key] = value.contiguous()


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-d batch in channels_last layout (same values); other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# ----------------------------------------------------------------------------- bf16 autocast


@contextlib.contextmanager
def bf16_autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when enabled; a plain block otherwise."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def bf16_weight_cache(device: torch.device, enabled: bool) -> Iterator[None]:
    """Keep autocast's bf16 copies of the weights for the whole block, with autocast itself off.

    Autocast caches the bf16 cast of each leaf weight until the *outermost* autocast region
    exits. An attack calls :class:`AutocastForward` k times, each its own region, so every PGD
    step would cast all weights again. This opens a disabled outer region: inner forwards share
    one cast per weight (the weights do not change during an attack), while code between them
    (the loss, the step) still runs in fp32. Same values as without the cache.
    """
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=False):
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
        self.train(inner.training)  # a new Module is in train mode; keep the wrapped model's mode

    @property
    def wraps(self) -> nn.Module:
        """The wrapped model: its randomness (`resample`, `sampling`) is the wrapper's (rna_core.randomness)."""
        return self.inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.inner(x)
        return out.float()


# ----------------------------------------------------------------------------- evaluation

# Precision of the model's forward inside evaluation attacks and scoring (`eval.forward_precision`).
# fp32 by default: measured on a trained checkpoint (docs/benchmarks.md, bench/eval_precision.py).
FORWARD_PRECISIONS = ("fp32", "bf16")


def evaluation_forward(model: nn.Module, precision: str) -> nn.Module:
    """The module an evaluation attacks and scores: `model` itself in fp32; in bf16 the model in
    channels_last with its forward under bf16 autocast (:class:`AutocastForward`: logits, losses and
    the attacks' input gradients stay fp32). Random layers and `resample` are reached through
    `modules()`, so the protocols draw the same paths either way."""
    if precision not in FORWARD_PRECISIONS:
        raise ConfigError(f"forward precision must be one of {', '.join(FORWARD_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    return AutocastForward(use_channels_last(model)).train(model.training)


__all__ = [
    "FORWARD_PRECISIONS",
    "SPEED_CHOICES",
    "AutocastForward",
    "SpeedFlags",
    "as_channels_last",
    "bf16_autocast",
    "bf16_fast_path",
    "bf16_weight_cache",
    "cpu_bf16_features",
    "evaluation_forward",
    "optimizer_state_like_params",
    "resolve_speed",
    "speed_choice",
    "to_device_async",
    "use_channels_last",
    "wait_for_device",
]
