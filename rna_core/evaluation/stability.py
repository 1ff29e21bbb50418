"""Stability of a randomized model's accuracy over repeated evaluations (the paper's Table 4).

The same evaluation is repeated as N trials with distinct seeds (different path draws and attack
randomness); the statistics are taken over the trials' rows of each (run, model, method, dataset,
attack, protocol, eps). ``std`` is the sample standard deviation (N - 1 in the denominator; 0 for
a single trial), the usual choice when N repetitions estimate a spread.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .results import ResultRow

GROUP_FIELDS = ("run_id", "model", "method", "dataset", "attack", "protocol", "eps")


@dataclass(frozen=True)
class StabilityStats:
    run_id: str
    model: str
    method: str
    dataset: str
    attack: str
    protocol: str
    eps: float | None
    trials: int
    seeds: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float


def _eps(e: float | None) -> float | None:
    return None if e is None or math.isnan(e) else round(float(e), 6)


def stability(rows: Iterable[ResultRow]) -> list[StabilityStats]:
    """Mean, std, min and max accuracy over trials, one entry per group (in first-seen order)."""
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for r in rows:
        groups[(r.run_id, r.model, r.method, r.dataset, r.attack, r.protocol, _eps(r.eps))].append(r)
    out = []
    for key, members in groups.items():
        trials = {r.trial for r in members}
        if len(trials) != len(members):
            raise ValueError(f"rows of {key} repeat a trial; merge result files with merge_rows first")
        accs = [r.accuracy for r in sorted(members, key=lambda r: r.trial)]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        seeds = tuple(r.seed for r in sorted(members, key=lambda r: r.trial))
        out.append(
            StabilityStats(*key, trials=len(accs), seeds=seeds, mean=mean, std=std, min=min(accs), max=max(accs))
        )
    return out


def stability_table(rows: Iterable[ResultRow]) -> str:
    """Markdown: one line per model, method, attack and protocol with mean, std, min, max (%)."""
    lines = [
        "| Model | Method | Attack | Protocol | Trials | Mean | Std | Min | Max |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in stability(rows):
        lines.append(
            f"| {s.model} | {s.method} | {s.attack} | {s.protocol} | {s.trials} | "
            f"{100 * s.mean:.2f} | {100 * s.std:.2f} | {100 * s.min:.2f} | {100 * s.max:.2f} |"
        )
    return "\n".join(lines)
