"""The protocol for randomized models, ours or anyone's: how evaluation draws their randomness.

Any ``torch.nn.Module`` that maps images in [0, 1] to logits can be evaluated:

- A model that draws its randomness per forward (noise layers, random input transforms) needs
  nothing. It should draw from torch's global RNG: the protocols seed it (forked, so the caller's
  state is untouched) around every attack and every scoring forward, so results reproduce.
- A model that holds a random state between forwards exposes ``resample(generator)``: draw a new
  state from `generator` only (the same seed, the same state) and keep it until the next call.
  The protocols call it wherever they draw: the attack path, every forward of an EOT attack, each
  scoring draw. Our RNA and RPI+RPT networks are such models (:class:`PathNetwork`: the state is
  a path), so the protocols run one code path for ours and foreign ones.
- Optionally a ``randomized`` attribute (bool): whether two forwards can differ at all. Without
  it, a model with ``resample`` counts as randomized, and one without is probed: two forwards of
  the batch under different seeds; identical logits mean deterministic. A deterministic model is
  scored the same under every protocol and every number of draws (no EOT averaging, no
  unperturbed rule: the attacked forward is the scored one).

The protocols run models in eval mode; randomness a model draws only in train mode (dropout)
is off then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from . import paths as _paths  # module access, so a patched `paths.sample_path` sees every draw
from .attacks.registry import seeded_global_rng
from .errors import ConfigError

DEFAULT_SAMPLING = "uniform"
PROBE_ROWS = 16  # rows of the batch the determinism probe runs


class PathNetwork(nn.Module):
    """Base of our networks: their random state is a path, drawn by ``resample`` with ``sampling``.

    ``sampling`` is a strategy of :mod:`rna_core.paths` (``uniform`` by default; ``fixed:<path>``
    makes the network deterministic). The protocols set it for an evaluation
    (:func:`sampling_strategy`); a network without random layers draws nothing.
    """

    sampling: str = DEFAULT_SAMPLING

    def resample(self, generator: torch.Generator) -> None:
        """Draw a path with `generator` and run it until the next call."""
        _paths.set_path(self, _paths.sample_path(self, self.sampling, generator))

    @property
    def randomized(self) -> bool:
        """Whether two forwards can differ: more than one path, and a strategy that draws among them."""
        return _paths.count_paths(self) > 1 and not self.sampling.strip().lower().startswith("fixed")


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose randomness a wrapper's forwards run: a wrapper that changes only how the
    forward computes (e.g. bf16 autocast, `rna_core.speed.AutocastForward`) names it as ``wraps``."""
    while isinstance(getattr(model, "wraps", None), nn.Module):
        model = model.wraps
    return model


def can_resample(model: nn.Module) -> bool:
    return callable(getattr(unwrap(model), "resample", None))


def resample(model: nn.Module, generator: torch.Generator) -> bool:
    """Draw `model`'s random state from `generator` (its ``resample``); False when it holds none."""
    if not can_resample(model):
        return False
    unwrap(model).resample(generator)
    return True


@contextlib.contextmanager
def sampling_strategy(model: nn.Module, strategy: str | None) -> Iterator[None]:
    """Inside the block, `model` (a :class:`PathNetwork`) draws its paths with `strategy`.

    None leaves the model's own. A strategy for a model that draws no paths (a plain network,
    a foreign model) is meaningless: a model without random layers ignores it (it has one path),
    any other model that is not a PathNetwork is refused.
    """
    model = unwrap(model)
    if strategy is None or (not isinstance(model, PathNetwork) and not _paths.random_layers(model)):
        yield
        return
    if not isinstance(model, PathNetwork):
        raise ConfigError(
            f"a path strategy ('{strategy}') needs a model built by rna_core; {type(model).__name__} draws its own "
            "randomness (resample)"
        )
    _paths.parse_strategy(strategy)
    old = model.__dict__.get("sampling")
    model.sampling = strategy
    try:
        yield
    finally:
        if old is None:
            del model.sampling
        else:
            model.sampling = old


def is_randomized(model: nn.Module, x: torch.Tensor, seed: int) -> bool:
    """Whether `model`'s forwards on `x` can differ (see the module docstring), without changing its state.

    The probe of a model without ``randomized`` or ``resample`` runs two forwards of the first
    rows of `x` under two seeds of the global RNG.
    """
    flag = getattr(unwrap(model), "randomized", None)
    if flag is not None:
        return bool(flag)
    if can_resample(model):
        return True
    rows = x[:PROBE_ROWS].detach()
    outs = []
    with torch.no_grad():
        for k in (0, 1):
            with seeded_global_rng(int(seed) + k, x.device):
                outs.append(model(rows))
    return not torch.equal(outs[0], outs[1])


__all__ = [
    "DEFAULT_SAMPLING",
    "PathNetwork",
    "can_resample",
    "is_randomized",
    "resample",
    "sampling_strategy",
    "unwrap",
]
