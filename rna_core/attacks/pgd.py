"""Our own L-inf PGD, the attack inside adversarial training.

Written here (not taken from torchattacks) because training needs two things a generic attack
library does not give: gradients with respect to the input only (no parameter gradients are
computed or accumulated during the k inner steps), and a hook to average the gradient over
several fresh paths (EOT). Randomness comes from a passed generator.

Precision and layout: the adversarial batch keeps the memory format of `x` through the loop
(channels_last in, channels_last out: every op here is elementwise on tensors of x's layout),
and stays fp32 whatever the model computes in. When the model runs its forwards in bf16
(`rna_core.speed.AutocastForward`), the whole loop sits in one `bf16_weight_cache` block, so
autocast casts each weight to bf16 once per attack rather than once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..determinism import cross_entropy
from ..speed import AutocastForward, bf16_weight_cache, to_device_async

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """x plus uniform noise in [-eps, eps], clamped to [0, 1]; drawn on the generator's device."""
    gen_device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    noise = to_device_async(noise, x.device)
    # Same draws whatever x's layout; the result takes x's memory format (x is the first operand).
    return (x + (noise * 2 - 1) * eps).clamp_(0, 1)


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, repeats: int = 1
) -> torch.Tensor:
    """d loss / d x summed over `repeats` forwards (each may run a fresh path), input only."""
    grad: torch.Tensor | None = None
    for _ in range(repeats):
        x_req = x.detach().requires_grad_(True)
        loss = loss_fn(model(x_req), y)
        (g,) = torch.autograd.grad(loss, [x_req])
        grad = g if grad is None else grad + g
    return grad if grad is not None else torch.zeros_like(x)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    use_random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
    grad_repeats: int = 1,
    active_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Projected gradient ascent in the L-inf ball of radius `eps` around x, inside [0, 1].

    `grad_repeats` > 1 averages the gradient over that many forwards (EOT when the model draws a
    fresh path on every forward). `active_mask_fn(x_adv)` may return a boolean mask of examples
    still to attack (early stopping); inactive examples keep their current value.
    """
    loss_fn = loss_fn or cross_entropy  # F.cross_entropy, or its deterministic form on GPU (determinism.py)
    x = x.detach()
    x_adv = random_start(x, eps, generator) if use_random_start else x.clone()
    # The L-inf ball intersected with the [0, 1] box, computed once: clamping to it equals
    # projecting on the ball and then on the box, bit for bit (pure comparisons, no arithmetic).
    lower = (x - eps).clamp_(min=0)
    upper = (x + eps).clamp_(max=1)
    with bf16_weight_cache(x.device, runs_in_bf16(model)):
        for _ in range(steps):
            grad = input_gradient(model, x_adv, y, loss_fn, grad_repeats)
            direction = grad.sign()
            if active_mask_fn is not None:
                mask = active_mask_fn(x_adv).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                direction = direction * mask
            # step_size * (+-1 or 0) is exact, so the fused add equals x_adv + step_size * sign bit for bit.
            x_adv = torch.clamp(x_adv.detach().add(direction, alpha=step_size), lower, upper)
    return x_adv


def runs_in_bf16(model: nn.Module) -> bool:
    """Whether the model's forward runs (partly) under our bf16 autocast wrapper."""
    return any(isinstance(m, AutocastForward) for m in model.modules())
