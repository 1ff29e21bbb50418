"""Metric names, one function per kind, so a name means one computation wherever it is logged.

- Per-epoch (training): `clean_acc` (natural under `transfer`) and `pgd<k>_acc`, k the PGD steps
  that ran (`train.eval_pgd_steps`), under `transfer` on the held-out slice.
- Results (the evaluation job, and training's final evaluation): `acc_<attack><tags>_<protocol>`,
  mean over trials. Tags name every setting that differs from the attack's registered default
  (`acc_pgd20_steps3_transfer` is a 3-step PGD; eps in pixels/255: `acc_fgsm_eps4_transfer`) and,
  under `eot`, an `eot_iter` other than the default for attacks that do not average themselves,
  and `_bf16` when the model's forward ran in bf16 (`eval.forward_precision`; fp32 is untagged).
- Scores of R inference draws beside the one-draw accuracy: `<result metric>_worst<R>` (right
  under all R draws) and `<result metric>_vote<R>` (the plurality of R draws is right), e.g.
  `acc_pgd20_transfer_worst10`.
"""

from __future__ import annotations

from ..attacks.registry import Attack, attack_spec
from ..units import settings_to_pixels
from .protocols import DEFAULT_EOT_ITER

CLEAN_METRIC = "clean_acc"


def pgd_metric(steps: int) -> str:
    """The per-epoch PGD accuracy of a run whose evaluation PGD runs `steps` steps."""
    return f"pgd{int(steps)}_acc"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def result_metric(attack: Attack, protocol: str, eot_iter: int = DEFAULT_EOT_ITER, precision: str = "fp32") -> str:
    """The name of the accuracy of `attack` under `protocol` (see the module docstring)."""
    defaults = settings_to_pixels(attack_spec(attack.name).defaults)
    settings = settings_to_pixels(attack.settings)
    tags = "".join(f"_{k}{_text(v)}" for k, v in settings.items() if k in defaults and v != defaults[k])
    if protocol == "eot" and attack.perturbs and not attack.native_eot and int(eot_iter) != DEFAULT_EOT_ITER:
        tags += f"_eot_iter{int(eot_iter)}"
    if precision != "fp32":
        tags += f"_{precision}"
    return f"acc_{attack.name}{tags}_{protocol}"


SCORES = ("worst", "vote")


def score_metric(metric: str, score: str, draws: int) -> str:
    """The name of worst-of-R (`score="worst"`) or vote-of-R (`"vote"`) beside the one-draw `metric`."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return f"{metric}_{score}{int(draws)}"


__all__ = ["CLEAN_METRIC", "SCORES", "pgd_metric", "result_metric", "score_metric"]
