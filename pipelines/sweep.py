"""Ray Tune sweeps of training runs: random spaces, sampling strategies, modes, hyperparameters.

A sweep config is a training config (the schema of `configs/*.yaml`) plus a `sweep:` section
whose `space` names flattened config keys and how to vary them:

    sweep:
      search: grid              # grid | random
      num_samples: 1            # grid: repeats of the grid; random: number of draws
      metric: pgd20_acc         # reported every epoch; ranks trials, drives ASHA
      mode: max
      scheduler: asha           # asha | none
      asha: {grace_period: 1, reduction_factor: 2, max_t: 2}
      max_concurrent_trials: 2  # default: what the cluster's CPUs/GPUs hold
      seed: 0                   # seeds the random search (each trial's train.seed is logged)
      space:
        model.norm: {grid: ["bn,gns:1", "bn,gn:8,gn:16"]}
        train.sampling: {choice: [uniform, shared, "far:0.5"]}
        train.lr: {loguniform: [0.01, 0.2]}

Every key and every listed value is checked against the Config (and the model is built on
the meta device) before Ray starts: a typo costs one line, not a cluster.

How a sweep runs (Ray 2.60). `Tuner(TorchTrainer)` no longer works, so each trial is a function
trainable (`sweep_trial`) that calls `pipelines.trainer.run_training` (the same code path as
`jobs/train.py`) with Tune's report callback on the TorchTrainer: a trial is a full Ray Train
run (several workers if the config says so), and trials run side by side as far as
`max_concurrent_trials` and the cluster allow. The trial driver itself asks Tune for only a
sliver of a CPU (`trial_cpus`); the Train workers hold the real resources.

Tracking. The sweep is one MLflow parent run; each trial's training run is a nested child
(`mlflow.parentRunId`) with the flattened config as params (the swept values and the trial's
seed included) and the per-epoch metrics, so the MLflow UI compares trials side by side. When
the sweep ends, the parent gets `summary/trials.parquet`, `summary/leaderboard.md` and two
plots (the metric against the random-space size, and per sampling strategy).

ASHA and the final evaluation. ASHA sees `asha_epoch`, which the report callback adds to every
epoch report except the last: a trial that reached its last epoch is never stopped while it runs
its final evaluation and logs its model. Stopped trials keep their MLflow run (FINISHED, tag
`rna.early_stopped=true`).

Resume. The sweep's folder is `<ray.storage_path>/<sweep name>` (Tune's experiment folder; the
Train run of each trial sits in `trials/<trial id>`), with `rna_sweep.json` naming the parent
run. Running the same sweep again (or `--resume`) restores Tune's state (`Tuner.restore`):
finished trials are not run again, unfinished and errored trials continue from their last
epoch checkpoint into their own MLflow run.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from rna_core.config import Config, apply_overrides, config_from_dict, flatten, is_plain_folder_name, read_yaml_file, to_dict, unflatten
from rna_core.errors import ConfigError, RnaError

from . import tracking
from .train_loop import EPOCH_METRICS
from .trainer import (
    JOB_FILE_TAG,
    _exists,
    _join,
    _meta_model,
    base_dir,
    check_data,
    check_tracking_store,
    check_writable_folder,
    ensure_ray,
    preflight,
    read_job_file,
    resolve_paths,
    write_job_file,
)

SWEEP_FILE = "rna_sweep.json"
TRIALS_DIR = "trials"
SUMMARY_DIR = "summary"
ASHA_TIME_ATTR = "asha_epoch"
# Test and operations hook: after this many trials completed in this session, the driver sends
# itself SIGINT, exactly what Ctrl+C does (Tune saves its state; the sweep can be resumed).
INTERRUPT_ENV = "RNA_SWEEP_INTERRUPT_AFTER_TRIALS"

SEARCHES = ("grid", "random")
SCHEDULERS = ("asha", "none")
MODES = ("max", "min")
CATEGORICAL = ("grid", "choice")
NUMERIC = ("uniform", "loguniform", "randint")
DOMAIN_KINDS = CATEGORICAL + NUMERIC
# Reported on every epoch (Tune's strict metric check wants the metric in every report).
SWEEP_METRICS = tuple(m for m in EPOCH_METRICS if m != "lr")
EVAL_METRICS = ("clean_acc", "pgd20_acc")  # present only on evaluation epochs
FINAL_COLUMNS = ("final_clean_acc", "final_pgd20_transfer_acc", "final_eot_pgd_acc")
UNSWEEPABLE = ("mlflow.", "ray.storage_path", "ray.address")
FULL_CHECK_LIMIT = 64  # combinations of listed values checked one by one (else each value alone)

Echo = Callable[[str], None]


# ----------------------------------------------------------------------------- the sweep spec


@dataclass(frozen=True)
class Dimension:
    """One swept config key: listed values (`grid`, `choice`) or a range (`uniform`, ...)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def categorical(self) -> bool:
        return self.kind in CATEGORICAL

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(int(low), int(high) + 1)  # ours is inclusive, Tune's upper bound is not

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class AshaSpec:
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None  # default: the longest trial's train.epochs


@dataclass(frozen=True)
class SweepSpec:
    """The `sweep:` section, parsed."""

    space: tuple[Dimension, ...]
    name: str | None = None
    search: str = "grid"
    num_samples: int = 1
    metric: str = "pgd20_acc"
    mode: str = "max"
    scheduler: str = "none"
    asha: AshaSpec = field(default_factory=AshaSpec)
    max_concurrent_trials: int | None = None
    seed: int = 0
    trial_cpus: float = 0.1

    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return grid * self.num_samples

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("space", "asha")}
        out["asha"] = {f.name: getattr(self.asha, f.name) for f in fields(self.asha)}
        out["space"] = {d.key: d.to_dict() for d in self.space}
        return out


@dataclass(frozen=True)
class SweepConfig:
    base: Config
    sweep: SweepSpec


_SPEC_TYPES: dict[str, Any] = {
    "name": str, "search": str, "num_samples": int, "metric": str, "mode": str, "scheduler": str,
    "max_concurrent_trials": int, "seed": int, "trial_cpus": float,
}
_ASHA_TYPES = {"grace_period": int, "reduction_factor": float, "max_t": int}


def _typed(value: Any, typ: type, key: str) -> Any:
    if value is None and key in ("sweep.name", "sweep.max_concurrent_trials", "sweep.asha.max_t"):
        return None
    try:
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        wanted = "an integer" if typ is int else "a number" if typ is float else "a string"
        raise ConfigError(f"{key} expects {wanted}, got {value!r}") from None


def _space_dimensions(node: Any, search: str, prefix: str = "") -> list[Dimension]:
    """Flatten `space` (dotted keys, or nested sections) into dimensions.

    A key given twice (`model.norm` in the YAML, then `--set sweep.space.model.norm=...`, which
    arrives as a nested section) takes the later definition, as overrides do everywhere.
    """
    dims: dict[str, Dimension] = {}
    for d in _space_items(node, search, prefix):
        dims.pop(d.key, None)
        dims[d.key] = d
    return list(dims.values())


def _space_items(node: Any, search: str, prefix: str = "") -> list[Dimension]:
    if not isinstance(node, Mapping) or not node:
        raise ConfigError("sweep.space must map config keys to values, e.g. {model.norm: {grid: [bn, 'bn,gns:1']}}")
    dims: list[Dimension] = []
    for raw_key, value in node.items():
        key = f"{prefix}{raw_key}"
        if isinstance(value, Mapping) and set(value) & set(DOMAIN_KINDS):
            if len(value) != 1:
                raise ConfigError(f"sweep.space.{key} must have exactly one of {', '.join(DOMAIN_KINDS)}, got {sorted(value)}")
            ((kind, values),) = value.items()
            dims.append(_dimension(key, kind, values))
        elif isinstance(value, Mapping):
            dims.extend(_space_items(value, search, f"{key}."))
        elif isinstance(value, (list, tuple)):  # shorthand: a plain list
            dims.append(_dimension(key, "grid" if search == "grid" else "choice", value))
        else:
            raise ConfigError(
                f"sweep.space.{key} is a single value ({value!r}); give {{grid: [...]}}, {{choice: [...]}}, "
                "{uniform|loguniform|randint: [low, high]}, or set fixed values in the base config"
            )
    return dims


def _dimension(key: str, kind: str, values: Any) -> Dimension:
    if kind not in DOMAIN_KINDS:
        raise ConfigError(f"sweep.space.{key}: '{kind}' is not a search domain; valid: {', '.join(DOMAIN_KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"sweep.space.{key}.{kind} must be a non-empty list, got {values!r}")
    values = tuple(values)
    if kind in CATEGORICAL:
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"sweep.space.{key}.{kind} lists a value twice: {list(values)}")
        return Dimension(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"sweep.space.{key}.{kind} must be [low, high] numbers, got {list(values)}")
    low, high = values
    if kind == "randint" and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"sweep.space.{key}.randint bounds must be integers, got {list(values)}")
    if not low < high:
        raise ConfigError(f"sweep.space.{key}.{kind} needs low < high, got {list(values)}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"sweep.space.{key}.loguniform needs low > 0, got {list(values)}")
    return Dimension(key, kind, (int(low), int(high)) if kind == "randint" else (float(low), float(high)))


def parse_sweep_section(section: Any) -> SweepSpec:
    """The `sweep:` mapping as a SweepSpec (structure and types; the keys are checked by validate_sweep)."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"the sweep: section must be a mapping, got {section!r}")
    valid = set(_SPEC_TYPES) | {"space", "asha"}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{unknown[0]}'; valid keys in sweep: {', '.join(sorted(valid))}")
    kwargs: dict[str, Any] = {k: _typed(v, _SPEC_TYPES[k], f"sweep.{k}") for k, v in section.items() if k in _SPEC_TYPES}
    asha = section.get("asha") or {}
    if not isinstance(asha, Mapping) or set(asha) - set(_ASHA_TYPES):
        raise ConfigError(f"sweep.asha takes {', '.join(_ASHA_TYPES)}, got {asha!r}")
    kwargs["asha"] = AshaSpec(**{k: _typed(v, _ASHA_TYPES[k], f"sweep.asha.{k}") for k, v in asha.items()})
    search = str(kwargs.get("search", "grid"))
    if search not in SEARCHES:
        raise ConfigError(f"sweep.search '{search}' is unknown; valid: {', '.join(SEARCHES)}")
    if "space" not in section:
        raise ConfigError("the sweep: section needs a space, e.g. space: {model.norm: {grid: ['bn,gns:1', 'bn,in']}}")
    spec = SweepSpec(space=tuple(_space_dimensions(section["space"], search)), **kwargs)
    _check_spec(spec)
    return spec


def _check_spec(spec: SweepSpec) -> None:
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler '{spec.scheduler}' is unknown; valid: {', '.join(SCHEDULERS)}")
    if spec.mode not in MODES:
        raise ConfigError(f"sweep.mode must be max or min, got '{spec.mode}'")
    if spec.metric not in SWEEP_METRICS:
        raise ConfigError(f"sweep.metric '{spec.metric}' is not reported every epoch; valid: {', '.join(SWEEP_METRICS)}")
    if spec.num_samples < 1:
        raise ConfigError(f"sweep.num_samples must be >= 1, got {spec.num_samples}")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        raise ConfigError(f"sweep.max_concurrent_trials must be >= 1 (or omitted for automatic), got {spec.max_concurrent_trials}")
    if not 0 < spec.trial_cpus <= 64:
        raise ConfigError(f"sweep.trial_cpus must be in (0, 64], got {spec.trial_cpus}")
    if spec.name is not None and not is_plain_folder_name(spec.name):
        raise ConfigError(f"sweep.name '{spec.name}' must be a plain folder name (no '/')")
    a = spec.asha
    if a.grace_period < 1 or a.reduction_factor <= 1 or (a.max_t is not None and a.max_t < a.grace_period):
        raise ConfigError("sweep.asha needs grace_period >= 1, reduction_factor > 1 and max_t >= grace_period")
    if spec.search == "grid":
        sampled = [d for d in spec.space if d.kind != "grid"]
        if sampled:
            raise ConfigError(
                f"sweep.search is grid but sweep.space.{sampled[0].key} is {sampled[0].kind}; "
                "use search: random to sample, or list grid values"
            )


def _read_yaml(path: str) -> dict[str, Any]:
    data = read_yaml_file(path, example="configs/sweep_smoke.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping (model:, data:, train:, ..., sweep:)")
    return data


def sweep_config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> SweepConfig:
    """Split a sweep document into the base training Config and the SweepSpec, with overrides.

    Overrides reach both parts: `train.epochs=1` changes the base, `sweep.max_concurrent_trials=1`
    the sweep.
    """
    merged = apply_overrides(dict(data), list(overrides))
    if "sweep" not in merged:
        raise ConfigError("the config has no sweep: section; train a single run with jobs/train.py, or add sweep: {space: ...}")
    section = merged.pop("sweep")
    return SweepConfig(base=config_from_dict(merged), sweep=parse_sweep_section(section))


def load_sweep_config(path: str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read `configs/<sweep>.yaml` (a training config plus a sweep: section)."""
    return sweep_config_from_dict(_read_yaml(path), overrides)


# ----------------------------------------------------------------------------- validation


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The training config of one trial: the base with the trial's values (validated)."""
    return unflatten({**flatten(base), **params})


def _check_values(base: Config, params: Mapping[str, Any]) -> None:
    try:
        cfg = trial_config(base, params)
        preflight(cfg)  # builds the model on the meta device: groups that do not divide, etc.
    except RnaError as exc:
        what = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"sweep.space value {what}: {' '.join(str(exc).split())}") from None


def validate_sweep(sc: SweepConfig) -> None:
    """Every swept key exists and may be swept; every listed value (and range end) builds a valid run.

    Combinations of listed values are checked one by one while there are at most
    FULL_CHECK_LIMIT of them (an rpt precision set with a norm, a batch size with a worker
    count...), else each value alone.
    """
    spec, base = sc.sweep, sc.base
    flat = flatten(base)
    for d in spec.space:
        if d.key not in flat:
            raise ConfigError(
                f"sweep.space key '{d.key}' is not a config key{_suggest(d.key, list(flat))}; "
                "keys are flattened, e.g. train.lr, model.norm"
            )
        if d.key.startswith(UNSWEEPABLE) or d.key in UNSWEEPABLE:
            raise ConfigError(f"sweep.space key '{d.key}' cannot be swept (it places or names the runs); set it in the base config")
        if d.kind in NUMERIC and (isinstance(flat[d.key], bool) or not isinstance(flat[d.key], (int, float))):
            raise ConfigError(f"sweep.space.{d.key} is not numeric ({flat[d.key]!r}); use grid or choice")
        if d.kind in ("uniform", "loguniform") and isinstance(flat[d.key], int):
            raise ConfigError(f"sweep.space.{d.key} is an integer; use randint or a list")
    if len({d.key for d in spec.space}) != len(spec.space):
        raise ConfigError("sweep.space names a key twice")

    listed = [d for d in spec.space if d.categorical]
    ranged = [d for d in spec.space if not d.categorical]
    combos = math.prod(len(d.values) for d in listed)
    if combos <= FULL_CHECK_LIMIT:
        for values in itertools.product(*(d.values for d in listed)):
            _check_values(base, dict(zip((d.key for d in listed), values)))
    else:
        for d in listed:
            for v in d.values:
                _check_values(base, {d.key: v})
    for d in ranged:
        for v in d.values:
            _check_values(base, {d.key: v})

    if spec.metric in EVAL_METRICS:
        every = {base.train.eval_every} | {int(v) for d in spec.space if d.key == "train.eval_every" for v in d.values}
        if every != {1}:
            raise ConfigError(f"sweep.metric {spec.metric} needs train.eval_every: 1 (it is evaluated only on evaluation epochs)")
    if spec.scheduler == "asha" and base.train.epochs < 2 and "train.epochs" not in {d.key for d in spec.space}:
        raise ConfigError("sweep.scheduler asha needs train.epochs >= 2 (it stops trials between epochs); use scheduler: none")


# ----------------------------------------------------------------------------- planning


@dataclass
class SweepPlan:
    sc: SweepConfig  # base with absolute paths
    name: str
    sweep_dir: str
    trials_dir: str
    stored: dict[str, Any] | None  # rna_sweep.json of the sweep being resumed


def _identity(sc: SweepConfig) -> dict[str, Any]:
    """What must not change between a sweep and its resume."""
    flat = {k: v for k, v in flatten(sc.base).items() if k not in ("ray.address", "mlflow.run_name")}
    spec = {k: v for k, v in sc.sweep.to_dict().items() if k not in ("name", "max_concurrent_trials", "trial_cpus")}
    return json.loads(json.dumps({"base": flat, "sweep": spec}, sort_keys=True, default=str))


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
            if diff:
                return diff
        return None
    return None if a == b else f"{where} ({a!r} then, {b!r} now)"


def plan_sweep(sc: SweepConfig, config_path: str | None = None, resume: bool = False) -> SweepPlan:
    """Where the sweep lives, and whether it is a resume (explicit, or the folder exists)."""
    base = resolve_paths(sc.base)
    sc = replace(sc, base=base)
    name = sc.sweep.name or (Path(config_path).stem if config_path else "sweep")
    sweep_dir = _join(base.ray.storage_path, name)
    stored = read_job_file(sweep_dir, SWEEP_FILE)
    if stored is None and resume:
        raise ConfigError(f"nothing to resume: {sweep_dir} holds no sweep ({SWEEP_FILE} missing); run without --resume to start it")
    if stored is None and _exists(sweep_dir):
        raise ConfigError(f"{sweep_dir} exists but was not written by jobs/sweep.py; choose another sweep.name")
    if stored is not None:
        diff = _first_difference(stored.get("identity"), _identity(sc))
        if diff:
            raise ConfigError(
                f"cannot resume {sweep_dir}: the sweep changed at {diff}; "
                "resume with the original config, or set sweep.name=<new name> to start another sweep"
            )
    return SweepPlan(sc, name, sweep_dir, _join(sweep_dir, TRIALS_DIR), stored)


# ----------------------------------------------------------------------------- the trial


class SweepReportCallback(TuneReportCallback):
    """Tune's report callback, adding `asha_epoch` to every epoch report but the last (see module doc)."""

    def __init__(self, epochs: int):
        super().__init__()
        self._epochs = int(epochs)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [tag_epoch_report(m, self._epochs) for m in metrics], checkpoint)


def tag_epoch_report(metrics: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """The epoch report as Tune should see it (ASHA's time attribute only before the last epoch)."""
    out = dict(metrics)
    epoch = out.get("epoch")
    if isinstance(epoch, (int, float)) and epoch < epochs:
        out[ASHA_TIME_ATTR] = int(epoch)
    return out


def _plain(value: Any) -> Any:
    """Tune samples numpy scalars; configs, MLflow and Parquet want Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def describe_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def sweep_trial(config: dict[str, Any]) -> None:
    """One Tune trial: a full training run (pipelines.trainer.run_training) as a child MLflow run."""
    from ray import tune

    from .trainer import run_training

    params = {k: _plain(v) for k, v in config["params"].items()}
    meta = config["sweep"]
    trial_id = tune.get_context().get_trial_id()
    flat = {**config["base"], **params, "mlflow.run_name": trial_id, "ray.storage_path": meta["trials_dir"]}
    cfg = unflatten(flat)
    tags = {
        "rna.entry_point": "jobs/sweep.py",
        "rna.sweep": meta["name"],
        "rna.sweep_dir": meta["sweep_dir"],
        "rna.trial_id": trial_id,
        "rna.trial_seed": cfg.train.seed,
        "rna.trial_params": describe_params(params)[:5000],
    }
    finished = _finished_run_metrics(_join(meta["trials_dir"], trial_id))
    if finished is not None:
        # Its training run had ended when the sweep was interrupted, before Tune recorded it:
        # report what the run logged instead of evaluating again.
        tune.report({**finished, "trial_seed": float(cfg.train.seed)})
        return
    out = run_training(
        cfg,
        echo=lambda line: print(f"[{trial_id}] {line}", flush=True),
        parent_run=tracking.RunRef.from_dict(meta["parent"]),
        run_tags=tags,
        trainer_callbacks=[SweepReportCallback(cfg.train.epochs)],
        end_run_on_failure=False,  # stopped by Tune or failed: the driver ends it (_reconcile_children)
    )
    last_epoch = dict(out.last_epoch_metrics)
    if not last_epoch:  # resumed after its last epoch (interrupted during the final evaluation):
        logged = tracking.client_for(out.mlflow.tracking_uri).get_run(out.mlflow.run_id).data.metrics
        last_epoch = {k: logged[k] for k in (*EPOCH_METRICS, "epoch") if k in logged}  # the run's latest values
    tune.report({
        **last_epoch,
        **out.final_metrics,
        "epochs_done": float(out.epochs_done),
        "trial_seed": float(cfg.train.seed),
        "mlflow_run_id": out.mlflow.run_id,
    })


def _finished_run_metrics(run_dir: str) -> dict[str, Any] | None:
    """The final report of a trial whose training run already FINISHED (else None)."""
    job = read_job_file(run_dir)
    if not job or not job.get("mlflow"):
        return None
    ref = tracking.RunRef.from_dict(job["mlflow"])
    run = tracking.client_for(ref.tracking_uri).get_run(ref.run_id)
    if run.info.status != "FINISHED" or "final_clean_acc" not in run.data.metrics:
        return None
    m = run.data.metrics
    return {**m, "epochs_done": float(m.get("epoch", 0.0)), "mlflow_run_id": ref.run_id}


class InterruptAfterTrials(Callback):
    """Ctrl+C after INTERRUPT_ENV trials completed in this session (the variable is read when a trial
    completes, not when the callback is built: a restored sweep gets its callbacks back from Tune's
    saved state and must not be interrupted again unless asked)."""

    def __init__(self) -> None:
        self.completed = 0
        self.fired = False

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        limit = os.environ.get(INTERRUPT_ENV, "").strip()
        if limit and not self.fired and self.completed >= int(limit):
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: save the state, stop the trials


# ----------------------------------------------------------------------------- the driver


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: str
    parent: tracking.RunRef
    experiment: str
    rows: list[dict[str, Any]]
    interrupted: bool
    resumed: bool
    summary_dir: str | None = None
    leaderboard: str = ""
    num_errors: int = 0


def default_max_concurrent(sc: SweepConfig, use_gpu: bool) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least one."""
    import ray

    res = ray.cluster_resources()
    r = sc.base.ray
    per_trial_cpu = r.num_workers * r.cpus_per_worker + sc.sweep.trial_cpus
    fits = int(res.get("CPU", 1) // per_trial_cpu) if per_trial_cpu > 0 else 1
    if use_gpu and r.gpus_per_worker > 0:
        fits = min(fits, int(res.get("GPU", 0) // (r.num_workers * r.gpus_per_worker)))
    return max(1, fits)


def _param_space(plan: SweepPlan, parent: tracking.RunRef) -> dict[str, Any]:
    return {
        "params": {d.key: d.to_tune() for d in plan.sc.sweep.space},
        "base": flatten(plan.sc.base),
        "sweep": {
            "name": plan.name,
            "sweep_dir": plan.sweep_dir,
            "trials_dir": plan.trials_dir,
            "parent": parent.to_dict(),
        },
    }


def build_scheduler(spec: SweepSpec, base: Config):
    """ASHA over `asha_epoch` (absent in a trial's last epoch report), or None.

    The metric and mode reach it from TuneConfig (Tune's `set_search_properties`).
    """
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = max([base.train.epochs] + [int(v) for d in spec.space if d.key == "train.epochs" for v in d.values])
    return ASHAScheduler(
        time_attr=ASHA_TIME_ATTR, max_t=spec.asha.max_t or epochs,
        grace_period=spec.asha.grace_period, reduction_factor=spec.asha.reduction_factor, stop_last_trials=False,
    )


def _build_tuner(plan: SweepPlan, parent: tracking.RunRef, use_gpu: bool, echo: Echo):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = plan.sc.sweep
    trainable = tune.with_resources(sweep_trial, {"cpu": spec.trial_cpus})
    if plan.stored is not None and tune.Tuner.can_restore(plan.sweep_dir):
        echo(f"resuming sweep {plan.name} from {plan.sweep_dir} (finished trials are kept, the rest continue)")
        return tune.Tuner.restore(plan.sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True), True
    concurrent = spec.max_concurrent_trials or default_max_concurrent(plan.sc, use_gpu)
    scheduler = build_scheduler(spec, plan.sc.base)
    storage, name = plan.sweep_dir.rsplit("/", 1)
    tuner = tune.Tuner(
        trainable,
        param_space=_param_space(plan, parent),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            scheduler=scheduler,
            # our own generator (seeded: the random search is reproducible), limited to `concurrent`
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[InterruptAfterTrials()],
            failure_config=tune.FailureConfig(max_failures=0),  # worker failures are retried by Ray Train
            verbose=1,
        ),
    )
    echo(f"sweep {plan.name}: {spec.num_trials()} trial(s), "
         f"{spec.search} search, scheduler {spec.scheduler}, up to {concurrent} at once; folder {plan.sweep_dir}")
    return tuner, False


def _open_parent(plan: SweepPlan, config_text: str, echo: Echo) -> tuple[Any, tracking.RunRef]:
    if plan.stored is not None:
        ref = tracking.RunRef.from_dict(plan.stored["mlflow"])
        client = tracking.client_for(ref.tracking_uri)
        tracking.reopen_run(client, ref.run_id, {})
        echo(f"resuming MLflow parent run {ref.run_id}")
        return client, ref

    cfg, spec = plan.sc.base, plan.sc.sweep
    uri = tracking.resolve_tracking_uri(base_dir())
    client = tracking.client_for(uri)
    exp_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment, tracking.artifact_root_for(uri))
    sweep_params = {f"sweep.{k}": (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in spec.to_dict().items()}
    swept = {d.key for d in spec.space}  # the base value of a swept key would mislead in the UI
    params = {**{k: ("<swept>" if k in swept else v) for k, v in flatten(cfg).items()}, **sweep_params,
              "git_commit": tracking.git_commit()}
    tags = {
        "rna.entry_point": "jobs/sweep.py", "rna.sweep_dir": plan.sweep_dir, "rna.sweep": plan.name,
        "rna.git_dirty": str(tracking.git_dirty()),
    }
    owner = {"rna.sweep_dir": plan.sweep_dir, JOB_FILE_TAG: "pending"}  # "written" once SWEEP_FILE names it
    run_id, adopted = tracking.start_or_adopt_run(client, exp_id, plan.name, params, tags, owner)
    if adopted:
        echo(f"reusing MLflow parent run {run_id} of an earlier attempt stopped before {SWEEP_FILE} was written")
    ref = tracking.RunRef(uri, exp_id, run_id)
    _log_text(client, run_id, "sweep.yaml", config_text)
    return client, ref


def _log_text(client: Any, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="rna-sweep-") as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        client.log_artifact(run_id, str(p), artifact_path)


def child_runs(client: Any, parent: tracking.RunRef) -> list[Any]:
    """The trial runs nested under the sweep's parent run."""
    return client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10000
    )


def saved_trial_statuses(sweep_dir: str) -> dict[str, str]:
    """trial id -> Tune status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) as Tune saved it.

    Read from the experiment state on disk, not from the ResultGrid: after an interrupt Tune
    saves the state first and then stops the running trials, which marks them TERMINATED in
    memory; the saved state (what `Tuner.restore` continues from) still says RUNNING.
    """
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(sweep_dir).trials}


def _status(tune_status: str, metrics: Mapping[str, Any]) -> str:
    if tune_status == "ERROR":
        return "error"
    if tune_status != "TERMINATED":
        return "incomplete"
    return "completed" if "epochs_done" in metrics else "early_stopped"


def _reconcile_children(client: Any, parent: tracking.RunRef, statuses: Mapping[str, str]) -> dict[str, str]:
    """End child runs that Tune stopped from outside (ASHA, errors, an interrupt); trial id -> run id.

    A trial Tune terminated (completed, or stopped early by ASHA) ends FINISHED even if something
    else ended its run first; a run that ended FINISHED on its own stays FINISHED (Tune may not
    have recorded the trial's last report before an interrupt: the resume reports it, see
    `_finished_run_metrics`).
    """
    end_as = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED", "incomplete": "KILLED"}
    runs: dict[str, str] = {}
    for run in child_runs(client, parent):
        trial_id = run.data.tags.get("rna.trial_id", "")
        runs[trial_id] = run.info.run_id
        status = statuses.get(trial_id, "incomplete")
        tracking.set_tags(client, run.info.run_id,
                          {"rna.trial_status": status, "rna.early_stopped": str(status == "early_stopped").lower()})
        if run.info.status == "RUNNING" or (end_as[status] == "FINISHED" and run.info.status != "FINISHED"):
            tracking.end_run(client, run.info.run_id, end_as[status])
    return runs


def _space_size(norm: str) -> int:
    from rna_core.norms import parse_space

    return len(parse_space(norm))


def trial_rows(
    grid: Any, spec: SweepSpec, base: Config, statuses: Mapping[str, str], run_ids: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One row per trial: its swept values, seed, random-space size, status and metrics, ranked."""
    from rna_core import count_paths

    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = str(m.get("trial_id") or Path(str(result.path)).name)
        params = {k: _plain(v) for k, v in ((result.config or {}).get("params") or {}).items()}
        cfg = trial_config(base, params)
        row: dict[str, Any] = {"trial_id": trial_id, "mlflow_run_id": run_ids.get(trial_id, "")}
        row.update({d.key: params.get(d.key) for d in spec.space})
        status = statuses.get(trial_id, "error" if result.error else "incomplete")
        best = None
        df = result.metrics_dataframe
        if df is not None and spec.metric in getattr(df, "columns", []):
            series = df[spec.metric].dropna()
            if len(series):
                best = float(series.max() if spec.mode == "max" else series.min())
        row.update({
            "status": status,
            "norm": cfg.model.norm,
            "space_size": _space_size(cfg.model.norm),
            "num_paths": float(count_paths(_meta_model(cfg))),
            "sampling": cfg.train.sampling,
            "train_mode": cfg.train.mode,
            "seed": cfg.train.seed,
            "epochs_done": int(m.get("epochs_done", m.get("epoch", 0)) or 0),
            spec.metric: _num(m.get(spec.metric)),
            f"best_{spec.metric}": best,
            **{c: _num(m.get(c)) for c in FINAL_COLUMNS},
            "seconds": _num(m.get("time_total_s")),
        })
        rows.append(row)
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0), r["trial_id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _column(values: list[Any]) -> list[Any]:
    """Parquet wants one type per column: numbers stay numbers, anything mixed becomes text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return values
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return [None if v is None else float(v) for v in values]
    if present and all(isinstance(v, bool) for v in present):
        return values
    return [None if v is None else str(v) for v in values]


def write_trials_table(rows: list[dict[str, Any]], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(rows[0]) if rows else ["trial_id"]
    table = pa.table({k: _column([r.get(k) for r in rows]) for k in keys})
    pq.write_table(table, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def render_leaderboard(rows: list[dict[str, Any]], spec: SweepSpec, name: str, parent_run_id: str) -> str:
    """The Markdown leaderboard logged on the parent run."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error", "incomplete")}
    keys = [d.key for d in spec.space]
    cols = ["rank", "trial_id", *keys, "seed", "space_size", spec.metric, f"best_{spec.metric}", *FINAL_COLUMNS,
            "epochs_done", "status", "mlflow_run_id"]
    lines = [
        f"# Sweep `{name}`: leaderboard",
        "",
        f"Ranked by `{spec.metric}` ({spec.mode}; its last reported epoch"
        f"{', on the held-out slice' if spec.metric in EVAL_METRICS else ''}). "
        f"{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early by ASHA, "
        f"{counts['error']} failed, {counts['incomplete']} incomplete. Search: {spec.search}, "
        f"scheduler: {spec.scheduler}, MLflow parent run `{parent_run_id}`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "`final_*`: the held-out slice after the last epoch (PGD-20 transfer; EOT-PGD); "
              "`space_size`: candidate normalizations per layer."]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict[str, Any]], metric: str, out_dir: str) -> list[str]:
    """Two PNGs: the metric against the random-space size (one series per strategy), and per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get(metric) is not None]
    strategies = sorted({r["sampling"] for r in scored}) or ["-"]
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(strategies):
        pts = [r for r in scored if r["sampling"] == s]
        xs = [r["space_size"] + (i - (len(strategies) - 1) / 2) * 0.06 for r in pts]
        dots = ax.scatter(xs, [r[metric] for r in pts], label=s, alpha=0.8)
        sizes = sorted({r["space_size"] for r in pts})
        means = [sum(r[metric] for r in pts if r["space_size"] == k) / sum(r["space_size"] == k for r in pts) for k in sizes]
        ax.plot(sizes, means, alpha=0.6, color=dots.get_facecolor()[0])  # the strategy's mean per size
    ax.set_xlabel("random-space size (candidate norms per layer)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs random-space size")
    ax.set_xticks(sorted({r["space_size"] for r in scored}) or [1])
    ax.legend(title="sampling")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(Path(out_dir) / "robust_acc_vs_space_size.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(strategies):
        vals = [r[metric] for r in scored if r["sampling"] == s]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5 if vals else 0.0
        ax.bar(i, mean, yerr=std, alpha=0.5, capsize=4)
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_xlabel("sampling strategy")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per sampling strategy (mean, std, trials)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    files.append(str(Path(out_dir) / "robust_acc_by_strategy.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def _write_summary(client: Any, plan: SweepPlan, parent: tracking.RunRef, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Write the summary into `<sweep dir>/summary` (local folders) and log it on the parent run."""
    spec = plan.sc.sweep
    board = render_leaderboard(rows, spec, plan.name, parent.run_id)
    with tempfile.TemporaryDirectory(prefix="rna-sweep-summary-") as tmp:
        write_trials_table(rows, str(Path(tmp) / "trials.parquet"))
        (Path(tmp) / "leaderboard.md").write_text(board)
        plot_summary(rows, spec.metric, tmp)
        client.log_artifacts(parent.run_id, tmp, SUMMARY_DIR)
        summary_dir = _join(plan.sweep_dir, SUMMARY_DIR)
        if "://" not in summary_dir:
            Path(summary_dir).mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                Path(summary_dir, f.name).write_bytes(f.read_bytes())
    scored = [r for r in rows if r.get(spec.metric) is not None]
    metrics = {
        "num_trials": len(rows),
        "num_completed": sum(r["status"] == "completed" for r in rows),
        "num_early_stopped": sum(r["status"] == "early_stopped" for r in rows),
        "num_errors": sum(r["status"] == "error" for r in rows),
    }
    if scored:
        metrics[f"best_{spec.metric}"] = scored[0][spec.metric]
        best = scored[0]
        tracking.set_tags(client, parent.run_id, {"rna.best_trial": best["trial_id"], "rna.best_run_id": best["mlflow_run_id"]})
    tracking.log_metrics(client, parent.run_id, metrics, step=0)
    return summary_dir, board


def run_sweep(
    sc: SweepConfig,
    *,
    config_path: str | None = None,
    config_text: str | None = None,
    resume: bool = False,
    echo: Echo = print,
) -> SweepOutcome:
    """Run (or resume) a sweep; returns where everything is. Validation happens before Ray starts."""
    validate_sweep(sc)
    plan = plan_sweep(sc, config_path, resume)
    check_data(plan.sc.base, echo)
    check_writable_folder(plan.sc.base.ray.storage_path, "ray.storage_path")
    if not plan.stored:
        check_tracking_store(tracking.resolve_tracking_uri(base_dir()))
    text = config_text or yaml.safe_dump({**to_dict(plan.sc.base), "sweep": plan.sc.sweep.to_dict()}, sort_keys=False)

    client, parent = _open_parent(plan, text, echo)
    status = "FAILED"
    statuses: dict[str, str] = {}
    try:
        write_job_file(
            plan.sweep_dir,
            {
                "format": 1,
                "name": plan.name,
                "identity": _identity(plan.sc),
                "mlflow": parent.to_dict(),
                "experiment": plan.sc.base.mlflow.experiment,
                "created": (plan.stored or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            name=SWEEP_FILE,
        )
        tracking.set_tags(client, parent.run_id, {JOB_FILE_TAG: "written"})
        ensure_ray(plan.sc.base, echo)
        from .trainer import resolve_use_gpu

        tuner, restored = _build_tuner(plan, parent, resolve_use_gpu(plan.sc.base), echo)
        grid = tuner.fit()
        last = {str((r.metrics or {}).get("trial_id")): (r.metrics or {}) for r in grid}
        statuses = {tid: _status(st, last.get(tid, {})) for tid, st in saved_trial_statuses(plan.sweep_dir).items()}
        run_ids = _reconcile_children(client, parent, statuses)
        rows = trial_rows(grid, plan.sc.sweep, plan.sc.base, statuses, run_ids)
        interrupted = any(s == "incomplete" for s in statuses.values())
        outcome = SweepOutcome(plan.name, plan.sweep_dir, parent, plan.sc.base.mlflow.experiment, rows,
                               interrupted, restored or plan.stored is not None)
        if interrupted:
            status = "KILLED"
            done = sum(s != "incomplete" for s in statuses.values())
            echo(f"sweep {plan.name} interrupted with {done} of {len(statuses)} trials done; Tune saved its state "
                 f"in {plan.sweep_dir}: run the same sweep again (or with --resume) to continue")
            return outcome
        outcome.summary_dir, outcome.leaderboard = _write_summary(client, plan, parent, rows)
        outcome.num_errors = sum(r["status"] == "error" for r in rows)
        status = "FAILED" if outcome.num_errors else "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        _reconcile_children(client, parent, statuses)
        raise
    except Exception:  # the driver failed: no child run may stay RUNNING
        try:
            _reconcile_children(client, parent, statuses)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise
    finally:
        tracking.end_run(client, parent.run_id, status)


__all__ = [
    "ASHA_TIME_ATTR",
    "Dimension",
    "INTERRUPT_ENV",
    "InterruptAfterTrials",
    "SWEEP_FILE",
    "SweepConfig",
    "SweepOutcome",
    "SweepPlan",
    "SweepReportCallback",
    "SweepSpec",
    "build_scheduler",
    "child_runs",
    "load_sweep_config",
    "parse_sweep_section",
    "plan_sweep",
    "plot_summary",
    "render_leaderboard",
    "run_sweep",
    "sweep_config_from_dict",
    "sweep_trial",
    "tag_epoch_report",
    "trial_config",
    "trial_rows",
    "validate_sweep",
    "write_trials_table",
]
