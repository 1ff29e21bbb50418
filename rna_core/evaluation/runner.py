"""Evaluate one model under several attacks, protocols and trials; return result rows.

The loop is trials x batches x attacks, each a call of :func:`run_protocols` for all protocols with
the seed ``batch_seed(trial_seed(seed, t), b)``; its outcome per protocol is exactly the one of
:func:`evaluate_batch` with that seed, the attack run once for the protocols that share it. A
fan-out that hands batches to other workers calls the same functions with the same seeds and sums
the counts, and gets the same rows. A progress bar (tqdm, on stderr) shows only when stderr is a
terminal.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks.registry import Attack, resolve_attack
from ..data.loader import BatchIterator
from ..data.tensor_dataset import ImageTensorDataset
from ..errors import ConfigError
from ..randomness import unwrap
from ..units import to_pixels
from .protocols import DEFAULT_EOT_ITER, DEFAULT_INFERENCE_DRAWS, Counts, check_protocol, run_protocols
from .results import ResultRow, method_label
from .seeds import batch_seed, trial_seed

META_FIELDS = ("run_id", "model", "method", "dataset")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def make_batches(
    data: ImageTensorDataset | Batches, batch_size: int, limit: int | None, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation batches, in a fixed order (no shuffle), at most `limit` examples, on `device`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 or None = all examples), got {limit}")
    if isinstance(data, ImageTensorDataset):
        subset = data.head(limit) if limit else data
        return list(BatchIterator(subset, batch_size, shuffle=False, seed=0, device=device))
    out, seen = [], 0
    for x, y in data:
        if limit and seen >= limit:
            break
        if limit and seen + len(y) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        out.append((x.to(device), y.to(device)))
        seen += len(y)
    return out


def _meta(model: nn.Module, data: Any, meta: dict[str, Any] | None) -> dict[str, str]:
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise ConfigError(f"unknown meta field(s) {', '.join(unknown)}; valid: {', '.join(META_FIELDS)}")
    model = unwrap(model)  # a bf16 forward wrapper labels as the model it runs
    spec = getattr(model, "rna_spec", {}) or {}
    defaults = {
        "run_id": "local",
        "model": spec.get("model", type(model).__name__),
        "method": method_label(spec),
        "dataset": getattr(data, "name", "unknown"),
    }
    return {k: str(meta.get(k, defaults[k])) for k in META_FIELDS}


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty()


def evaluate_model(
    model: nn.Module,
    data: ImageTensorDataset | Batches,
    attacks: Sequence[str | Attack] = ("natural", "pgd20"),
    protocols: Sequence[str] = ("transfer",),
    trials: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    meta: dict[str, Any] | None = None,
    eot_iter: int = DEFAULT_EOT_ITER,
    strategy: str | None = "uniform",
    include_natural: bool = True,
    progress: bool | None = None,
    inference_draws: int = DEFAULT_INFERENCE_DRAWS,
    share_attacks: bool = True,
) -> list[ResultRow]:
    """Rows for every attack x protocol x trial (``natural`` added first unless `include_natural` is False).

    `model` is any module on images in [0, 1] (ours, or one that follows rna_core.randomness).
    `data` is a dataset (batched here, in order) or an iterable of (x, y) batches in [0, 1].
    `meta` gives run_id, model, method and dataset for the rows (defaults: "local", the model's
    ``rna_spec``, the dataset's name). `inference_draws` is R of worst-of-R and vote-of-R;
    `strategy` the path strategy of our networks (None: the model's own). `progress`: None shows
    a bar only on a terminal. The protocols that score one attack output two ways share its run
    (:func:`~rna_core.evaluation.protocols.run_protocols`; `share_attacks=False` runs each alone,
    with the same rows).
    """
    if trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials}")
    if inference_draws < 1:
        raise ConfigError(f"inference_draws must be a positive integer, got {inference_draws}")
    resolved = [resolve_attack(a) for a in attacks]
    if include_natural and "natural" not in {a.name for a in resolved}:
        resolved.insert(0, resolve_attack("natural"))
    names = [a.name for a in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"attack names must be unique in one evaluation, got {', '.join(names)}")
    for p in protocols:
        check_protocol(p)
    if len(set(protocols)) != len(protocols):
        raise ConfigError(f"protocols must be unique, got {', '.join(protocols)}")
    info = _meta(model, data, meta)
    batches = make_batches(data, batch_size, limit, _device_of(model))
    totals: dict[tuple[str, str, int], Counts] = defaultdict(Counts)
    seconds: dict[tuple[str, str, int], float] = defaultdict(float)
    bar = tqdm(
        total=trials * len(batches),
        desc=f"evaluate {info['model']}",
        unit="batch",
        disable=not _show_progress(progress),
        file=sys.stderr,
    )
    try:
        for t in range(trials):
            tseed = trial_seed(seed, t)
            for b, (x, y) in enumerate(batches):
                bseed = batch_seed(tseed, b)
                for attack in resolved:
                    outcomes = run_protocols(
                        model, x, y, attack, protocols, bseed, eot_iter, strategy, inference_draws, share_attacks
                    )
                    for protocol, outcome in outcomes.items():
                        key = (attack.name, protocol, t)
                        totals[key] = totals[key] + outcome.counts
                        seconds[key] += outcome.seconds
                bar.update(1)
    finally:
        bar.close()
    rows = []
    for t in range(trials):
        for attack in resolved:
            eps = to_pixels(attack.eps)
            for protocol in protocols:
                c = totals[(attack.name, protocol, t)]
                rows.append(
                    ResultRow.make(
                        **info,
                        attack=attack.name,
                        protocol=protocol,
                        eps=eps,
                        trial=t,
                        seed=trial_seed(seed, t),
                        n=c.n,
                        correct=c.correct,
                        seconds=float(seconds[(attack.name, protocol, t)]),
                        draws=inference_draws,
                        correct_worst=c.worst,
                        correct_vote=c.vote,
                    )
                )
    return rows
