"""Model selection: which epoch a training run reports beside its last one, and by what measure.

The result of a run is its last epoch. Robust overfitting (the robust accuracy of adversarial
training peaks early and then falls) makes an earlier epoch worth reporting too, so a run can keep
the epoch that scores best on a selection split and report both, labelled:

- ``val``: a validation split held out from the training set (`data.val_size` rows, never trained
  on). The honest selection: the test set plays no part in it.
- ``test``: the held-out slice of the test set, the papers' way (RNA's `train.py` keeps the epoch
  with the best PGD-20 test accuracy; Double-Win Quant's `train.py` the best PGD-20 test accuracy at
  its lowest precision). Only on request (`train.select_on_test`), since a number selected on the
  test set and reported on it is biased upward; it is labelled "selected on test" wherever it appears.

The score is the method's own selection measure (:func:`selection_criterion`), as the official
code computes it on every evaluation epoch; a later epoch replaces the kept one only when it scores
strictly higher (the official `pgd_acc > best_pgd_acc`), so ties keep the earlier epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .config import Config
from .methods import Criterion, get_method

SELECTIONS = ("val", "test")
SELECTION_LABELS = {
    None: "last epoch",
    "val": "selected on val",
    "test": "selected on test",
}


def selection_criterion(cfg: Config, model: nn.Module) -> Criterion:
    """The method's selection measure (`Method.selection_criterion`): RNA's PGD under `transfer`
    with random paths (its `evaluate_pgd_random_norms`), RPI+RPT's PGD at its lowest precision,
    attacked and scored there (Double-Win Quant's `evaluate_pgd` with `num_bits = num_bits_schedule[0]`)."""
    return get_method(cfg.model.method).selection_criterion(cfg, model)


def split_metric(which: str, criterion: Criterion) -> str:
    """The per-epoch metric a selection reads: on the validation split prefixed `val_`."""
    return f"val_{criterion.metric}" if which == "val" else criterion.metric


@dataclass
class BestEpoch:
    """The best epoch so far of one selection (kept in every epoch checkpoint, for resumes)."""

    which: str
    metric: str
    epoch: int | None = None
    score: float = -math.inf

    def offer(self, epoch: int, score: float) -> bool:
        """Keep `epoch` if it scores strictly higher than the kept one; True when it was kept."""
        if math.isnan(score) or score <= self.score:
            return False
        self.epoch, self.score = int(epoch), float(score)
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"which": self.which, "metric": self.metric, "epoch": self.epoch, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BestEpoch:
        epoch = data.get("epoch")
        return cls(str(data["which"]), str(data["metric"]), None if epoch is None else int(epoch), float(data["score"]))


def selections_of(cfg: Config) -> tuple[str, ...]:
    """The selections a run makes: `val` when data.val_size > 0, `test` when train.select_on_test."""
    return tuple(w for w, on in (("val", cfg.data.val_size > 0), ("test", cfg.train.select_on_test)) if on)


__all__ = [
    "SELECTIONS",
    "SELECTION_LABELS",
    "BestEpoch",
    "Criterion",
    "selection_criterion",
    "selections_of",
    "split_metric",
]
