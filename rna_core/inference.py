"""A randomized network packaged as its users run it: every forward draws a fresh path.

RNA (and RPI+RPT) defend at inference by choosing a random sub-network for each query. A model
handed to someone else (an MLflow model, a notebook) must keep doing that on its own, without a
training loop around it that calls `set_path`. :class:`FreshPathModel` wraps a built network and
draws a path from its own seeded `torch.Generator` before every forward, with the strategy the
network was trained with (`far:<f>` has no reference path here and draws like `uniform`, as the
evaluation protocols score it). `reseed(seed)` restarts the sequence of draws, so two users who
reseed alike see the same paths.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .paths import check_strategy, count_paths, sample_path, set_path


class FreshPathModel(nn.Module):
    """`model` (inputs in [0, 1], logits out) that draws a fresh path with `strategy` before every forward."""

    def __init__(self, model: nn.Module, strategy: str = "uniform", seed: int = 0):
        super().__init__()
        check_strategy(model, strategy)
        self.model = model
        self.strategy = str(strategy)
        self.seed = int(seed)
        self.num_paths = count_paths(model)
        self.draws = 0
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int) -> None:
        """Restart the draws from `seed` (the generator is rebuilt at the next forward)."""
        self.seed, self.draws, self._generator = int(seed), 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_paths > 1:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            set_path(self.model, sample_path(self.model, self.strategy, self._generator))
            self.draws += 1
        return self.model(x)

    def describe(self) -> str:
        """One paragraph for model registries and cards: what a forward does."""
        if self.num_paths <= 1:
            return "A deterministic network (one path): every forward runs the same sub-network."
        return (
            f"A randomized defense with {self.num_paths:,} paths: every forward draws a fresh path "
            f"(strategy '{self.strategy}') from the model's own torch.Generator, seeded {self.seed} when "
            "loaded (call reseed(s) to repeat a sequence of draws). Inputs: float32 images, NCHW, in [0, 1] "
            "(standardisation is the model's first layer); outputs: logits. One forward's accuracy is what "
            "papers report; attack it with EOT (fresh paths inside the attack) before trusting it."
        )

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, seed={self.seed}, paths={self.num_paths}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = None  # rebuilt from the seed: a loaded model starts its draws afresh
        state["draws"] = 0
        return state


__all__ = ["FreshPathModel"]
