"""Layers whose behaviour is one of K choices, and RandomNorm, the RNA layer.

A :class:`RandomLayer` only holds which choice is active; *which* choice is decided outside the
layer by a path (see `paths.py`). Layers sharing a `tie` key always take the same choice, which is
how one random precision for a whole network (RPI+RPT) rides on the same mechanism as RNA's
per-layer choice.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .norms import NormSpec, build_norm, check_distinct_candidates, parse_space


class RandomLayer(nn.Module):
    """Base class of layers with `num_choices` alternatives and one `choice` active at a time."""

    def __init__(self, num_choices: int, tie: str | None = None):
        super().__init__()
        self.num_choices = int(num_choices)
        self.tie = tie
        self.choice = 0

    def set_choice(self, index: int) -> None:
        if not 0 <= index < self.num_choices:
            raise IndexError(f"choice {index} out of range for a layer with {self.num_choices} choices")
        self.choice = int(index)

    def extra_repr(self) -> str:
        tie = f", tie={self.tie!r}" if self.tie else ""
        return f"choices={self.num_choices}, active={self.choice}{tie}"


class RandomNorm(RandomLayer):
    """K candidate normalizations sharing one position in the network; exactly one is applied.

    Each candidate has its own affine parameters and running statistics (where its kind has them;
    `in` has neither). Only the active one runs, so inactive candidates get no gradient from the loss
    and their statistics do not move (the training step then gives them a zero gradient, so SGD decays
    them as the official loops do: `rna_core.training.give_unused_parameters_zero_grad`). Two
    candidates that build the same layer at this width (`ln,gn:1`) are a configuration error;
    `allow_identical` is for layers that repeat one kind on purpose (switchable BatchNorm: one
    BatchNorm per precision).
    """

    def __init__(
        self,
        space: str | tuple[NormSpec, ...],
        channels: int,
        where: str = "",
        tie: str | None = None,
        *,
        allow_identical: bool = False,
    ):
        specs = parse_space(space) if isinstance(space, str) else tuple(space)
        super().__init__(len(specs), tie)
        self.specs = specs
        self.candidates = nn.ModuleList(build_norm(s, channels, where) for s in specs)
        if not allow_identical:
            check_distinct_candidates(specs, channels, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidates[self.choice](x)

    def extra_repr(self) -> str:
        return f"space={','.join(map(str, self.specs))}, " + super().extra_repr()
