"""The adversarial training step and epoch loop (the paper's recipe), readable top to bottom.

Blackbox mode (the paper): draw an attack path, craft PGD-k on it, draw an independent update path,
take the SGD step on the adversarial batch through the update path. The step returns tensors, not
Python numbers, so there is no host sync inside it; the epoch loop syncs once at the end.

Parameters the update path did not use (inactive RandomNorm candidates, the switchable BNs of
the other precisions) get a zero gradient before the SGD step by default
(`train.inactive_candidates: decay`), so weight decay and momentum move them every step as in
the official loops (see :func:`give_unused_parameters_zero_grad`); `skip` leaves them untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .attacks.pgd import pgd_linf
from .config import INACTIVE_CANDIDATES, AttackConfig, TrainConfig
from .determinism import cross_entropy
from .paths import PathSampler, fresh_path_every_forward, set_path
from .speed import (
    AutocastForward,
    as_channels_last,
    bf16_autocast,
    resolve_speed,
    use_channels_last,
    wait_for_device,
)
from .units import to_unit


@dataclass
class StepOutput:
    """Sums over the batch, kept on the device (no `.item()` inside the step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    n: int


def craft_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None,
    eot_sampler: PathSampler | None = None,
    eot_iter: int = 1,
) -> torch.Tensor:
    """PGD on the model's current path, or averaged over fresh paths when `eot_sampler` is given."""
    kwargs = dict(
        eps=to_unit(attack.eps),
        step_size=to_unit(attack.step_size),
        steps=attack.steps,
        use_random_start=attack.random_start,
        generator=generator,
    )
    if eot_sampler is None:
        return pgd_linf(model, x, y, **kwargs)
    with fresh_path_every_forward(model, eot_sampler):
        return pgd_linf(model, x, y, grad_repeats=eot_iter, **kwargs)


def give_unused_parameters_zero_grad(optimizer: torch.optim.Optimizer, policy: str = "decay") -> int:
    """Give every optimizer parameter whose `.grad` is None a zero gradient (policy `decay`).

    Why: the official loops (RNA and Double-Win Quant `train.py`, torch 1.7/1.8) craft with
    `loss.backward()` and clear with an in-place `opt.zero_grad()`, so every candidate keeps a
    zero `.grad` and `SGD.step` applies weight decay and momentum to it on every step, used or
    not: `buf = momentum * buf + weight_decay * p`, `p -= lr * buf`. We craft with input-only
    gradients and clear with `set_to_none=True`, which would let SGD skip them instead (policy
    `skip`). Call it after the update's backward: under DDP the parameters left None are those
    no rank used (DDP hands locally unused ones the averaged gradient), the same on every rank,
    so the ranks stay identical. Returns how many parameters got a zero gradient.
    """
    if policy not in INACTIVE_CANDIDATES:
        raise ValueError(f"unknown inactive-candidates policy {policy!r}; valid: {', '.join(INACTIVE_CANDIDATES)}")
    if policy == "skip":
        return 0
    filled = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
                filled += 1
    return filled


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    sampler: PathSampler,
    attack_model: nn.Module | None = None,
    noise_generator: torch.Generator | None = None,
) -> StepOutput:
    """One adversarial training step in `cfg.mode`; the model is in train mode throughout (paper).

    `attack_model` is the module used to craft the examples (the bare model when `model` is a
    DDP wrapper, so the attack's forwards do not trigger gradient synchronisation).
    `noise_generator` draws the PGD random start (default: the sampler's generator, which draws
    the paths); DDP ranks pass their own, so that they share paths but not noise.
    """
    noise = noise_generator if noise_generator is not None else sampler.generator
    attacker = attack_model if attack_model is not None else model
    target = attacker  # the module whose random layers paths are set on
    speed = resolve_speed(cfg, x.device)  # `auto` decided for this device (cached)
    if speed.channels_last:
        use_channels_last(target)
        x = as_channels_last(x)
    if speed.amp_bf16:
        attacker = AutocastForward(attacker)  # forward in bf16; loss and input gradient in fp32
    model.train()
    if cfg.mode == "natural":
        sampler.apply(target)
        x_train = x
    elif cfg.mode == "eot":
        x_train = craft_adversarial(attacker, x, y, cfg.attack, noise, sampler, cfg.eot_iter)
        sampler.apply(target)
    else:
        attack_path = sampler.apply(target)
        x_train = craft_adversarial(attacker, x, y, cfg.attack, noise)
        if cfg.mode == "blackbox":
            sampler.apply(target, relative_to=attack_path)
        else:
            set_path(target, attack_path)
    optimizer.zero_grad(set_to_none=True)
    with bf16_autocast(x_train.device, speed.amp_bf16):
        logits = model(x_train)
    loss = cross_entropy(logits.float(), y)
    loss.backward()
    give_unused_parameters_zero_grad(optimizer, cfg.inactive_candidates)
    optimizer.step()
    with torch.no_grad():
        correct = (logits.argmax(1) == y).sum()
    return StepOutput(loss.detach() * y.shape[0], correct, y.shape[0])


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    sampler: PathSampler,
    attack_model: nn.Module | None = None,
    noise_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run one epoch; returns train_loss, train_acc, images, epoch_seconds, images_per_second."""
    start = time.perf_counter()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    n = 0
    for x, y in batches:
        out = train_step(model, x, y, optimizer, cfg, sampler, attack_model, noise_generator)
        loss_sum = loss_sum.to(out.loss_sum.device) + out.loss_sum
        correct = correct.to(out.correct.device) + out.correct
        n += out.n
    wait_for_device(loss_sum.device)  # CUDA queues the steps: the epoch ends when the device has run them
    seconds = time.perf_counter() - start
    n_safe = max(n, 1)
    return {
        "train_loss": float(loss_sum.item()) / n_safe,
        "train_acc": float(correct.item()) / n_safe,
        "images": float(n),
        "epoch_seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate_clean(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sampler: PathSampler
) -> tuple[int, int]:
    """(correct, n) with a fresh path drawn for every batch, model in eval mode."""
    model.eval()
    correct, n = 0, 0
    for x, y in batches:
        sampler.apply(model)
        correct += int((model(x).argmax(1) == y).sum().item())
        n += y.shape[0]
    return correct, n


def evaluate_pgd(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sampler: PathSampler,
    protocol: str = "transfer",
    eps: float = 8.0,
    step_size: float = 2.0,
    steps: int = 20,
    eot_iter: int = 4,
) -> tuple[int, int]:
    """PGD accuracy (correct, n) in eval mode under `transfer`, `fixed-path` or `eot`.

    transfer: attack one path per batch, score on a fresh path. fixed-path: score on the attacked
    path. eot: every forward of the attack draws a fresh path and each step averages `eot_iter`
    gradients; a fresh path scores. (The full protocol set lives in `rna_core.evaluation`.)
    """
    if protocol not in ("transfer", "fixed-path", "eot"):
        raise ValueError(f"unknown protocol {protocol!r}")
    model.eval()
    attack = AttackConfig(eps=eps, step_size=step_size, steps=steps, random_start=True)  # pixels/255
    correct, n = 0, 0
    for x, y in batches:
        attack_path = sampler.apply(model)
        if protocol == "eot":
            x_adv = craft_adversarial(model, x, y, attack, sampler.generator, sampler, eot_iter)
        else:
            x_adv = craft_adversarial(model, x, y, attack, sampler.generator)
        if protocol == "fixed-path":
            set_path(model, attack_path)
        else:
            sampler.apply(model)  # independent of the attack path (see evaluation/protocols.py)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum().item())
        n += y.shape[0]
    return correct, n
