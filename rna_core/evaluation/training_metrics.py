"""What a training run measures on its held-out slices, with the evaluation job's own code.

Per epoch: `clean_acc` and `pgd<k>_acc` (natural and PGD-k under `transfer`, k =
`train.eval_pgd_steps`, the training threat model's eps and step size). After the last epoch:
natural and PGD-k under `transfer` and EOT-PGD-k under `eot`, named as the evaluation job names
the same computations (:func:`rna_core.evaluation.naming.result_metric`), and computed exactly
as it computes them: with the same seed, batch size, strategy and test rows, `jobs/evaluate.py`
reports the same numbers for the saved checkpoint. The final evaluation scores R =
``DEFAULT_INFERENCE_DRAWS`` inference draws, as the evaluation job does by default, so it also
logs `<name>_worst10` and `<name>_vote10`; per-epoch measures score one draw.

Under data parallelism batch b goes to rank b % world and uses the seed the sequential run gives
it (`batch_seed`), and the counts are summed over ranks: a result does not depend on the number
of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..attacks.registry import Attack, get_attack
from ..data.loader import BatchIterator
from ..data.tensor_dataset import ImageTensorDataset
from ..distributed import all_reduce_sum
from ..units import to_unit
from .naming import CLEAN_METRIC, SCORES, pgd_metric, result_metric, score_metric
from .protocols import DEFAULT_EOT_ITER, DEFAULT_INFERENCE_DRAWS, Counts, evaluate_batch
from .seeds import batch_seed, trial_seed

FINAL_SEED = 0  # the evaluation job's default seed (trial 0): its numbers and these agree
TRAINING_METRICS = ("train_loss", "train_acc")
TIMING_METRICS = ("lr", "epoch_seconds", "images_per_second")


@dataclass(frozen=True)
class Measure:
    """One accuracy to compute: an attack under a protocol, logged as `name`."""

    name: str
    attack: Attack
    protocol: str
    strategy: str | None = None  # None: the run's train.sampling


def pgd_attack(train_cfg: Any, name: str = "pgd20") -> Attack:
    """PGD (or EOT-PGD with `name="eot_pgd"`) in the training threat model, `eval_pgd_steps` steps."""
    a = train_cfg.attack
    return get_attack(name, eps=to_unit(a.eps), step_size=to_unit(a.step_size), steps=int(train_cfg.eval_pgd_steps))


def epoch_measures(train_cfg: Any) -> list[Measure]:
    """`clean_acc` and `pgd<k>_acc`, evaluated every `train.eval_every` epochs."""
    return [
        Measure(CLEAN_METRIC, get_attack("natural"), "transfer"),
        Measure(pgd_metric(train_cfg.eval_pgd_steps), pgd_attack(train_cfg), "transfer"),
    ]


def epoch_metric_names(train_cfg: Any) -> tuple[str, ...]:
    """Every metric an epoch logs: training loss and accuracy, the held-out measures, lr and timing."""
    return (*TRAINING_METRICS, *(m.name for m in epoch_measures(train_cfg)), *TIMING_METRICS)


def final_measures(train_cfg: Any) -> list[Measure]:
    """Natural and PGD under `transfer` (the paper's setting), EOT-PGD under `eot` (the adaptive one)."""
    pairs = [
        (get_attack("natural"), "transfer"),
        (pgd_attack(train_cfg), "transfer"),
        (pgd_attack(train_cfg, "eot_pgd"), "eot"),
    ]
    return [Measure(result_metric(attack, protocol), attack, protocol) for attack, protocol in pairs]


FINAL_INFERENCE_DRAWS = DEFAULT_INFERENCE_DRAWS  # R of the final evaluation: the evaluation job's default


def final_metric_names(train_cfg: Any) -> dict[str, str]:
    """{"natural" | "pgd" | "eot": metric name} of the final evaluation of a run with `train_cfg`."""
    return dict(zip(("natural", "pgd", "eot"), (m.name for m in final_measures(train_cfg))))


def evaluate_measures(
    model: nn.Module,
    data: ImageTensorDataset,
    measures: Sequence[Measure],
    *,
    batch_size: int,
    seed: int,
    strategy: str,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    eot_iter: int = DEFAULT_EOT_ITER,
    inference_draws: int = 1,
) -> dict[str, float]:
    """{measure name: accuracy} plus "n" (images), each rank scoring batches b with b % world == rank.

    With `inference_draws` R > 1 also `<name>_worst<R>` and `<name>_vote<R>`. Batch b of trial 0
    uses `batch_seed(trial_seed(seed, 0), b)`, as `evaluate_model` and the evaluation job's units
    do. Counts are summed over ranks when a process group is up.
    """
    tseed = trial_seed(seed, 0)
    counts = [Counts() for _ in measures]
    n_local = 0
    batches = BatchIterator(data, batch_size, shuffle=False, seed=0, device=device)
    for b, (x, y) in enumerate(batches):
        if b % world != rank:
            continue
        bseed = batch_seed(tseed, b)
        for i, m in enumerate(measures):
            counts[i] = counts[i] + evaluate_batch(
                model, x, y, m.attack, m.protocol, bseed, eot_iter, m.strategy or strategy, inference_draws
            )
        n_local += int(y.shape[0])
    flat = [float(v) for c in counts for v in (c.correct, c.worst, c.vote)] + [float(n_local)]
    totals = all_reduce_sum(flat, device)
    n = totals[-1]
    out: dict[str, float] = {}
    for i, m in enumerate(measures):
        correct, worst, vote = totals[3 * i : 3 * i + 3]
        out[m.name] = correct / max(n, 1.0)
        if inference_draws > 1:
            for score, value in zip(SCORES, (worst, vote)):
                out[score_metric(m.name, score, inference_draws)] = value / max(n, 1.0)
    out["n"] = n
    return out


__all__ = [
    "FINAL_INFERENCE_DRAWS",
    "FINAL_SEED",
    "epoch_metric_names",
    "Measure",
    "epoch_measures",
    "evaluate_measures",
    "final_measures",
    "final_metric_names",
    "pgd_attack",
]
