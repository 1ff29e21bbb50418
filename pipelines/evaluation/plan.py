"""An evaluation's plan: the options resolved against the model, the test rows, the units.

The options are the config's `eval:` section (rna_core.eval_config): `jobs/evaluate.py` maps its
flags onto it, so this module only fills in what comes from the model's own config (batch size,
path strategy) and lists the units. Nothing is started or written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rna_core.attacks.registry import Attack
from rna_core.config import EvalConfig
from rna_core.data import ImageTensorDataset, held_out_rows
from rna_core.errors import ConfigError
from rna_core.evaluation import method_label
from rna_core.external import check_outputs
from rna_core.paths import check_strategy

from ..run_folder import base_dir
from .source import ModelSource
from .store import RESULTS_DIR, Unit, check_output_folder

# Version of the scoring rules a unit's counts depend on beyond its settings (2: the unperturbed
# rule for every attack under transfer and eot; 3: worst-of-R and vote-of-R counts, and neither
# that rule nor EOT averaging for a deterministic model). Units stored under another version are
# other units, so an earlier evaluation's counts are never mixed with this code's.
SCORING_RULES = 3


@dataclass
class EvalPlan:
    source: ModelSource
    options: EvalConfig  # with batch_size and strategy filled in
    attacks: list[Attack]
    dataset: ImageTensorDataset
    data_digest: str
    fingerprint: str
    out_dir: Path
    units: list[Unit]
    row_meta: dict[str, str]  # model, method, dataset (run_id is known once MLflow is open)

    @property
    def groups(self) -> list[tuple[str, str, int]]:
        return [
            (a.name, p, t) for t in range(self.options.trials) for a in self.attacks for p in self.options.protocols
        ]


def precision_tag(precision: str) -> str:
    """What a result row's method carries when the model's forward ran in `precision` (not fp32)."""
    return f" [{precision} forward]"


def short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()[:n]


def settings_hash(attack: Attack) -> str:
    """Short hash of an attack's full settings: a unit run with other settings is another unit."""
    return short_hash({"name": attack.name, "settings": attack.settings, "rules": SCORING_RULES}, 8)


def data_digest(ds: ImageTensorDataset) -> str:
    return ds.content_digest()  # also the digest of the evaluation run's MLflow dataset input


def resolve_options(source: ModelSource, options: EvalConfig | None = None) -> EvalConfig:
    """The `eval:` section with what comes from the model's config filled in, checked.

    A user's model draws its own randomness: a path strategy is refused, and stays None.
    """
    cfg = source.cfg
    o = options or cfg.eval or EvalConfig()
    if source.external is not None and o.strategy is not None:
        raise ConfigError(
            f"--strategy draws paths of rna_core models; {source.external.name} draws its own randomness "
            "(resample(generator), see rna_core/randomness.py): drop --strategy"
        )
    o = replace(
        o,
        batch_size=o.batch_size if o.batch_size is not None else cfg.data.eval_batch_size,
        strategy=None if source.external is not None else (o.strategy or cfg.train.sampling),
    )
    o.validate()
    return o


def plan_evaluation(source: ModelSource, options: EvalConfig | None = None) -> EvalPlan:
    """Resolve the options (default: the source config's `eval:` section), load the test rows and
    list the units (no Ray, nothing written)."""
    cfg = source.cfg
    o = resolve_options(source, options)
    structure = source.structure()
    if o.strategy is not None:
        check_strategy(structure, o.strategy)  # e.g. a fixed: path of the wrong length, before any data or cluster
    attacks = o.attack_objects()

    dataset = held_out_rows(cfg.data, o.limit)
    if len(dataset) == 0:
        raise ConfigError(f"the {cfg.data.dataset} test set is empty; check data.data_dir")
    if source.external is not None:  # logits of this dataset's classes for images in [0, 1], before Ray starts
        check_outputs(structure, dataset.images[:2].to(torch.float32) / 255, len(dataset.classes), source.external.name)
    digest = data_digest(dataset)
    fingerprint = short_hash(
        {
            "weights": source.weights_digest,
            "data": digest,
            "n": len(dataset),
            "batch_size": o.batch_size,
            "seed": o.seed,
            "eot_iter": o.eot_iter,
            "strategy": o.strategy,
            "inference_draws": o.inference_draws,
            **({"external": source.external.to_dict()} if source.external is not None else {}),
            # only when not fp32, so that fp32 evaluations keep the folders they always had
            **({"forward_precision": o.forward_precision} if o.forward_precision != "fp32" else {}),
        },
        10,
    )
    out_dir = (
        Path(o.out_dir).expanduser().resolve()
        if o.out_dir
        else base_dir() / RESULTS_DIR / f"{source.label}-{fingerprint}"
    )
    check_output_folder(out_dir, fingerprint)

    per_shard = -(-o.shard_size // o.batch_size) * o.batch_size
    bounds = [(s, min(s + per_shard, len(dataset))) for s in range(0, len(dataset), per_shard)]
    units = [
        Unit(a.name, settings_hash(a), p, t, first, stop)
        for t in range(o.trials)
        for a in attacks
        for p in o.protocols
        for first, stop in bounds
    ]
    if source.external is not None:  # a user's model: its factory names it
        model_name, method = source.external.name, source.external.label
    else:
        spec = getattr(structure, "rna_spec", {}) or {}
        model_name, method = str(spec.get("model", cfg.model.name)), method_label(spec or {"method": cfg.model.method})
    if source.selection is not None:  # a selected epoch's weights: its own table row, never blended with the last's
        method += f" [{source.checkpoint_label}, epoch {source.selected_epoch}]"
    if o.forward_precision != "fp32":  # its own table row, never blended with fp32 rows
        method += precision_tag(o.forward_precision)
    meta = {"model": model_name, "method": method, "dataset": dataset.name}
    return EvalPlan(source, o, attacks, dataset, digest, fingerprint, out_dir, units, meta)


__all__ = [
    "EvalPlan",
    "SCORING_RULES",
    "data_digest",
    "plan_evaluation",
    "resolve_options",
    "settings_hash",
    "short_hash",
]
