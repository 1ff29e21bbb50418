"""A sweep config: a training config plus its `sweep:` section, checked before Ray starts.

Every swept key and every listed value is checked against the training config (and the model is
built on the meta device) before Ray starts: a typo costs one line, not a cluster. Combinations
of listed values are checked one by one while there are at most FULL_CHECK_LIMIT of them (an rpt
precision set with a norm, a batch size with a worker count...), else each value alone. Plain
Python and rna_core: parsing a sweep imports no Ray.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from rna_core.config import Config, apply_overrides, config_from_dict, flatten, read_yaml_file, unflatten
from rna_core.errors import ConfigError, RnaError
from rna_core.evaluation import epoch_measures, epoch_metric_names
from rna_core.sweep_config import NUMERIC, SweepConfig

from ..preflight import check_training_config

UNSWEEPABLE = ("mlflow.", "ray.storage_path", "ray.address")
FULL_CHECK_LIMIT = 64  # combinations of listed values checked one by one (else each value alone)
EXAMPLE = "configs/sweep_smoke.yaml"


def sweep_config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A sweep document (with overrides) as a Config whose `sweep` section is set.

    Overrides reach both parts: `train.epochs=1` changes the training config,
    `sweep.max_concurrent_trials=1` the sweep.
    """
    merged = apply_overrides(dict(data), list(overrides))
    if "sweep" not in merged:
        raise ConfigError(
            "the config has no sweep: section; train a single run with jobs/train.py, or add sweep: {space: ...}"
        )
    if not isinstance(merged["sweep"], Mapping):
        raise ConfigError(f"the sweep: section must be a mapping, got {merged['sweep']!r}")
    return config_from_dict(merged)


def load_sweep_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read `configs/<sweep>.yaml` (a training config plus a sweep: section)."""
    return sweep_config_from_dict(read_yaml_file(path, example=EXAMPLE), overrides)


def base_config(cfg: Config) -> Config:
    """The training config every trial starts from (the sweep section removed)."""
    return replace(cfg, sweep=None)


def sweep_section(cfg: Config) -> SweepConfig:
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep: section; add sweep: {space: ...} (see configs/sweep_smoke.yaml)")
    return cfg.sweep


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The training config of one trial: the base with the trial's values (validated)."""
    return unflatten({**flatten(base_config(base)), **params})


def arm_params(spec: SweepConfig, arm: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's values: its arm's settings (if the sweep has arms), then its space values."""
    return {**(spec.arm(arm).as_dict() if arm else {}), **params}


def plain(value: Any) -> Any:
    """Tune samples numpy scalars; configs, MLflow and Parquet want Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_values(base: Config, params: Mapping[str, Any]) -> None:
    try:
        check_training_config(trial_config(base, params))  # builds the model on the meta device
    except RnaError as exc:
        what = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"sweep.space value {what}: {' '.join(str(exc).split())}") from None


def validate_sweep(cfg: Config) -> None:
    """Every swept key exists and may be swept; every listed value (and range end) builds a valid run."""
    spec, base = sweep_section(cfg), base_config(cfg)
    flat = flatten(base)
    for key in {k for a in spec.arms for k, _ in a.settings}:
        if key not in flat:
            raise ConfigError(
                f"sweep.arms key '{key}' is not a config key{_suggest(key, list(flat))}; "
                "keys are flattened, e.g. train.mode, model.norm"
            )
        if key.startswith(UNSWEEPABLE) or key in UNSWEEPABLE:
            raise ConfigError(
                f"sweep.arms key '{key}' cannot be swept (it places or names the runs); set it in the base config"
            )
    for d in spec.space:
        if d.key not in flat:
            raise ConfigError(
                f"sweep.space key '{d.key}' is not a config key{_suggest(d.key, list(flat))}; "
                "keys are flattened, e.g. train.lr, model.norm"
            )
        if d.key.startswith(UNSWEEPABLE) or d.key in UNSWEEPABLE:
            raise ConfigError(
                f"sweep.space key '{d.key}' cannot be swept (it places or names the runs); set it in the base config"
            )
        if d.kind in NUMERIC and (isinstance(flat[d.key], bool) or not isinstance(flat[d.key], (int, float))):
            raise ConfigError(f"sweep.space.{d.key} is not numeric ({flat[d.key]!r}); use grid or choice")
        if d.kind in ("uniform", "loguniform") and isinstance(flat[d.key], int):
            raise ConfigError(f"sweep.space.{d.key} is an integer; use randint or a list")

    listed = [d for d in spec.space if d.categorical]
    ranged = [d for d in spec.space if not d.categorical]
    arms = [a.as_dict() for a in spec.arms] or [{}]
    for arm in arms:
        if math.prod(len(d.values) for d in listed) * len(arms) <= FULL_CHECK_LIMIT:
            for values in itertools.product(*(d.values for d in listed)):
                _check_values(base, {**arm, **dict(zip((d.key for d in listed), values))})
        else:
            for d in listed:
                for v in d.values:
                    _check_values(base, {**arm, d.key: v})
        for d in ranged:
            for v in d.values:
                _check_values(base, {**arm, d.key: v})
    _check_metric(spec, base)
    if spec.scheduler == "asha" and base.train.epochs < 2 and "train.epochs" not in {d.key for d in spec.space}:
        raise ConfigError(
            "sweep.scheduler asha needs train.epochs >= 2 (it stops trials between epochs); use scheduler: none"
        )


def _check_metric(spec: SweepConfig, base: Config) -> None:
    """The metric must be one every epoch reports, under the same name in every trial."""
    reported = [m for m in epoch_metric_names(base.train) if m != "lr"]  # Tune wants it in every report
    if spec.metric not in reported:
        hint = " (pgd<k>_acc names the PGD steps: train.eval_pgd_steps)" if spec.metric.startswith("pgd") else ""
        raise ConfigError(
            f"sweep.metric '{spec.metric}' is not reported every epoch{hint}; valid: {', '.join(reported)}"
        )
    swept = {d.key for d in spec.space}
    held_out = {m.name for m in epoch_measures(base.train)}
    if spec.metric in held_out:
        if "train.eval_pgd_steps" in swept:
            raise ConfigError(
                f"sweep.metric {spec.metric} is named by train.eval_pgd_steps, which cannot then be swept"
            )
        every = {base.train.eval_every} | {int(v) for d in spec.space if d.key == "train.eval_every" for v in d.values}
        if every != {1}:
            raise ConfigError(
                f"sweep.metric {spec.metric} needs train.eval_every: 1 (it is evaluated only on evaluation epochs)"
            )


def identity(cfg: Config) -> dict[str, Any]:
    """What must not change between a sweep and its resume."""
    flat = {
        k: v
        for k, v in flatten(base_config(cfg)).items()
        if k not in ("ray.address", "mlflow.run_name", "mlflow.if_run_missing")
    }
    spec = {k: v for k, v in flatten(replace(cfg, sweep=sweep_section(cfg))).items() if k.startswith("sweep.")}
    spec = {
        k[len("sweep.") :]: v
        for k, v in spec.items()
        if k not in ("sweep.name", "sweep.max_concurrent_trials", "sweep.trial_cpus")
    }
    return json.loads(json.dumps({"base": flat, "sweep": spec}, sort_keys=True, default=str))


__all__ = [
    "arm_params",
    "base_config",
    "identity",
    "load_sweep_config",
    "plain",
    "sweep_config_from_dict",
    "sweep_section",
    "trial_config",
    "validate_sweep",
]
