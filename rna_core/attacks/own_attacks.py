"""Attacks no library implements, run by rna_core: ``natural`` (no attack) and ``cw_inf``.

``cw_inf`` is L-inf PGD on the Carlini-Wagner margin loss (the "CW-inf" of adversarial-training
papers): neither torchattacks (its CW is L2) nor pyautoattack has it, so it uses our own
:func:`~rna_core.attacks.pgd.pgd_linf` with a margin loss; its random start comes from the passed
generator.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..units import to_unit
from .pgd import pgd_linf
from .registry import Attack, register_attack


@register_attack("natural")
class Natural(Attack):
    """No perturbation: clean accuracy, scored by the same protocols as every attack. Runs: rna_core."""

    perturbs = False  # exempt from the unperturbed rule: clean inputs are the point

    def __init__(self, name: str, settings: dict):
        super().__init__(name, {**settings, "eps": 0.0})

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x.clone()


def cw_margin_loss(kappa: float):
    """Sum over the batch of -relu(z_y - max_{i != y} z_i + kappa): ascend it to close the margin.

    With kappa = 50 (the usual CW-inf setting) the gradient is that of the margin until the
    example is misclassified by more than 50 logits, i.e. for the whole attack in practice.
    """

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return -torch.relu(true - other + kappa).sum()

    return loss


@register_attack("cw_inf", eps=to_unit(8), step_size=to_unit(2), steps=20, kappa=50.0, random_start=True)
class CWInf(Attack):
    """PGD-20 (L-inf, step 2/255, random start) on the CW margin loss. Runs: rna_core (pgd_linf)."""

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return pgd_linf(
            model,
            x,
            y,
            eps=s["eps"],
            step_size=s["step_size"],
            steps=s["steps"],
            use_random_start=s["random_start"],
            generator=generator,
            loss_fn=cw_margin_loss(float(s["kappa"])),
        )
