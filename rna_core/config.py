"""One tree of frozen dataclasses for every job, loaded from YAML with `--set key=value` overrides.

The tree flattens to `{"train.lr": 0.1, ...}` for `mlflow.log_params` and rebuilds from that dict
(which is what Ray passes to workers). Every value is coerced and validated here, on the driver,
so a bad config fails with one clear line before any cluster work starts. Besides the training
sections the tree has two optional ones, `sweep:` (rna_core/sweep_config.py, read by jobs/sweep.py)
and `eval:` (rna_core/eval_config.py, the flags of jobs/evaluate.py); a training config has neither.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path as FsPath
from typing import Any

import yaml

from .errors import ConfigError
from .eval_config import EvalConfig
from .evaluation.naming import pgd_metric
from .methods import get_method
from .models import list_models
from .paths import parse_strategy
from .speed import speed_choice
from .sweep_config import SweepConfig

TRAIN_MODES = ("blackbox", "whitebox", "eot", "natural")
SCHEDULES = ("multistep", "cosine", "constant")
# SGD on parameters that got no gradient in a step (inactive candidates): `decay` gives them a zero
# gradient, so weight decay and momentum move them every step as in the official loops; `skip`
# leaves them untouched (SGD skips a parameter whose grad is None).
INACTIVE_CANDIDATES = ("decay", "skip")
# Paths of one DDP step: `shared`, one attack path and one update path for the whole global batch
# (as the official DataParallel code); `per_rank`, each rank draws its own.
RANK_PATHS = ("shared", "per_rank")


@dataclass(frozen=True)
class ModelConfig:
    """Which network, which randomization method and which random space."""

    name: str = "resnet18"
    method: str = "rna"  # rna: random norms; rpt: random precision (RPI+RPT)
    norm: str = "bn,gns:1"  # a single spec or a comma-separated random space
    precisions: str = "4-16"  # rpt only: bit widths, a range "4-16" or a list "4,8,16"
    rpt_draws: str = "per_iteration"  # rpt only: one precision per iteration, or "attack_and_update"

    def validate(self) -> None:
        if self.name not in list_models():
            raise ConfigError(f"model.name '{self.name}' is unknown; valid: {', '.join(list_models())}")
        get_method(self.method).validate(self)  # the method owns its fields (rna_core/methods/)


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is batched."""

    dataset: str = "cifar10"  # cifar10 | cifar100 | synthetic
    data_dir: str | None = None  # folder (or URI) with train.parquet/test.parquet, or torchvision root
    download: bool = False
    synthetic_size: int = 512
    batch_size: int = 128
    eval_batch_size: int = 256
    augment: bool = True
    train_limit: int = 0  # 0 = the whole training set (what is left after val_size)
    eval_limit: int = 1000  # size of the held-out slice of the test set evaluated during and after training
    val_size: int = 0  # training rows held out for model selection (never trained on); 0 = off

    def validate(self) -> None:
        if self.dataset not in ("cifar10", "cifar100", "synthetic"):
            raise ConfigError(f"data.dataset '{self.dataset}' is unknown; valid: cifar10, cifar100, synthetic")
        for name in ("batch_size", "eval_batch_size", "synthetic_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.train_limit < 0 or self.eval_limit < 0:
            raise ConfigError("data.train_limit and data.eval_limit must be >= 0 (0 = all)")
        if self.val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0 (0 = no validation split), got {self.val_size}")
        if self.dataset == "synthetic" and self.val_size >= self.synthetic_size:
            raise ConfigError(
                f"data.val_size ({self.val_size}) must be smaller than the training set "
                f"(data.synthetic_size {self.synthetic_size}), so that rows are left to train on"
            )


@dataclass(frozen=True)
class AttackConfig:
    """PGD settings of adversarial training; eps and step_size in pixels/255."""

    eps: float = 8.0
    step_size: float = 2.0
    steps: int = 10
    random_start: bool = True

    def validate(self) -> None:
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ConfigError("train.attack.eps, step_size and steps must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe by default: SGD 0.1, momentum 0.9, wd 5e-4, 200 epochs, /10 at 50% and 75%."""

    epochs: int = 200
    mode: str = "blackbox"  # blackbox | whitebox | eot | natural
    sampling: str = "uniform"  # uniform | shared | fixed:<path> | far:<fraction>
    eot_iter: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval_pgd_steps: int = 20
    eval_every: int = 1  # epochs between per-epoch evaluations (clean_acc, pgd<eval_pgd_steps>_acc)
    inactive_candidates: str = "decay"  # decay (official) | skip: SGD on parameters unused in a step
    rank_paths: str = "shared"  # shared (official, one path per step for all ranks) | per_rank
    # Also keep the epoch with the best per-epoch robust accuracy on the held-out *test* slice (the
    # papers' way; biased upward). Labelled test-selected wherever its numbers appear.
    select_on_test: bool = False
    # Speed (rna_core/speed.py, docs/benchmarks.md). auto: on where the device has bf16 fast paths
    # (CUDA sm_80+, CPUs with AMX-BF16 or AVX-512 BF16); they change results within rounding, so
    # bit-exact comparisons set false. Jobs log the resolved values (resolved.train.*).
    channels_last: str = "auto"  # auto | true | false: channels_last memory format for the model and batches
    amp_bf16: str = "auto"  # auto | true | false: bf16 autocast for the forwards (attack and update)
    # Deterministic kernels on GPU (rna_core/determinism.py): torch's deterministic algorithms, cuDNN
    # without autotuning, a fixed cuBLAS workspace. The bit-exact guarantees (README) need it on GPU.
    deterministic: bool = False

    def __post_init__(self) -> None:
        # True/False (Python, YAML, old checkpoints' flattened configs) mean "true"/"false".
        for name in ("channels_last", "amp_bf16"):
            try:
                object.__setattr__(self, name, speed_choice(getattr(self, name)))
            except ConfigError:
                pass  # validate() reports it, with the key

    def validate(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ConfigError(f"train.mode '{self.mode}' is unknown; valid: {', '.join(TRAIN_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule '{self.schedule}' is unknown; valid: {', '.join(SCHEDULES)}")
        parse_strategy(self.sampling)
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.eot_iter <= 0:
            raise ConfigError(f"train.eot_iter must be positive, got {self.eot_iter}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError("train.milestones are fractions of the run in (0, 1), e.g. [0.5, 0.75]")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma (the lr factor at each milestone) must be in (0, 1], got {self.gamma}")
        if self.inactive_candidates not in INACTIVE_CANDIDATES:
            raise ConfigError(
                f"train.inactive_candidates '{self.inactive_candidates}' is unknown; valid: "
                f"{', '.join(INACTIVE_CANDIDATES)}"
            )
        if self.rank_paths not in RANK_PATHS:
            raise ConfigError(f"train.rank_paths '{self.rank_paths}' is unknown; valid: {', '.join(RANK_PATHS)}")
        if self.eval_pgd_steps < 1 or self.eval_every < 1:
            raise ConfigError(
                f"train.eval_pgd_steps and train.eval_every must be >= 1, got {self.eval_pgd_steps} and "
                f"{self.eval_every}"
            )
        for name in ("channels_last", "amp_bf16"):
            speed_choice(getattr(self, name), f"train.{name}")
        self.attack.validate()


@dataclass(frozen=True)
class ScalingConfig:
    """How the job runs on Ray."""

    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    storage_path: str = "./ray_results"
    max_failures: int = 0
    address: str | None = None  # Ray address; None = connect to a running cluster or start a local one
    checkpoints_to_keep: int = 2  # newest epoch checkpoints kept in storage_path (each holds optimizer state)

    def validate(self) -> None:
        if self.num_workers <= 0:
            raise ConfigError(f"ray.num_workers must be positive, got {self.num_workers}")
        if str(self.use_gpu).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"ray.use_gpu must be auto, true or false, got {self.use_gpu}")
        if self.checkpoints_to_keep < 1:
            raise ConfigError(f"ray.checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_failures < 0:
            raise ConfigError(
                f"ray.cpus_per_worker must be > 0, ray.gpus_per_worker and ray.max_failures >= 0; "
                f"got {self.cpus_per_worker}, {self.gpus_per_worker}, {self.max_failures}"
            )


IF_RUN_MISSING = ("error", "new")


def is_plain_folder_name(name: str) -> bool:
    """A run or sweep name becomes a folder under ray.storage_path: no separators, no '.'/'..'."""
    return bool(name.strip()) and "/" not in name and "\\" not in name and not name.startswith(".")


# MLflow's rules for alias names (mlflow/utils/validation.py), checked here so that a bad alias fails
# before training, not after it: word characters and '-', not `latest` (MLflow reserves it:
# models:/<name>/latest already means the newest version) and not `v<digits>` (version aliases).
MODEL_ALIAS_RE = re.compile(r"^[\w\-]+$")
RESERVED_ALIAS_RE = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: experiment and run names, model registration, system metrics (the tracking URI comes
    from MLFLOW_TRACKING_URI)."""

    experiment: str = "rna"
    run_name: str | None = None
    # Register the trained model (the last epoch) under this name in the Model Registry, a new
    # version per run, and point `model_alias` at it; None: logged with the run, not registered.
    registered_model: str | None = None
    model_alias: str = "newest"
    system_metrics: bool = True  # CPU, memory, disk, network (GPU when present) of every node, as system/*
    system_metrics_interval: float = 10.0  # seconds between samples
    # When a job file names an MLflow run that its store no longer holds (the store was deleted or
    # replaced): "error" refuses in one line; "new" logs into a new run (the old metrics are gone).
    if_run_missing: str = "error"

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("mlflow.experiment must not be empty")
        if self.if_run_missing not in IF_RUN_MISSING:
            raise ConfigError(
                f"mlflow.if_run_missing '{self.if_run_missing}' is unknown; valid: {', '.join(IF_RUN_MISSING)}"
            )
        name = self.run_name
        if name is not None and not is_plain_folder_name(name):
            raise ConfigError(f"mlflow.run_name '{name}' must be a plain folder name (no '/', not starting with '.')")
        model = self.registered_model
        if model is not None and (not model.strip() or any(c in model for c in "/:%")):
            raise ConfigError(f"mlflow.registered_model '{model}' must be a non-empty name without '/', ':' or '%'")
        alias = self.model_alias
        if not MODEL_ALIAS_RE.match(alias) or RESERVED_ALIAS_RE.match(alias):
            raise ConfigError(
                f"mlflow.model_alias '{alias}' is not usable: MLflow takes letters, digits, '_' and '-', and "
                "reserves 'latest' and 'v<number>'; choose e.g. newest or champion"
            )
        if self.system_metrics_interval <= 0:
            raise ConfigError(f"mlflow.system_metrics_interval must be > 0 seconds, got {self.system_metrics_interval}")


@dataclass(frozen=True)
class Config:
    """The whole configuration of a job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: ScalingConfig = field(default_factory=ScalingConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig | None = None  # jobs/sweep.py: what varies (rna_core/sweep_config.py)
    eval: EvalConfig | None = None  # jobs/evaluate.py: attacks, protocols, fan-out (rna_core/eval_config.py)

    def __post_init__(self) -> None:
        if self.sweep is not None and self.sweep.metric is None:  # rank trials by the per-epoch PGD accuracy
            object.__setattr__(self, "sweep", replace(self.sweep, metric=pgd_metric(self.train.eval_pgd_steps)))

    def validate(self) -> Config:
        for f in fields(self):
            section = getattr(self, f.name)
            if section is not None:
                section.validate()
        if self.sweep is not None and self.sweep.name is not None and not is_plain_folder_name(self.sweep.name):
            raise ConfigError(f"sweep.name '{self.sweep.name}' must be a plain folder name (no '/')")
        return self

    def num_classes(self) -> int:
        return 100 if self.data.dataset == "cifar100" else 10


# ---------------------------------------------------------------- building from dicts and text


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return tuple(_coerce(v, inner, key) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
    if typ is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
        if not math.isfinite(number):  # nan passes every < and > check below and trains nothing
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        if value is None or str(value).strip() == "":
            raise ConfigError(f"config key '{key}' needs a value (it is empty)")
        return str(value)
    return value


def _section_type(typ: Any) -> type | None:
    """The dataclass of a section field (`TrainConfig`, or `SweepConfig | None`), else None."""
    if is_dataclass(typ):
        return typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(typ) if is_dataclass(a)]
        return inner[0] if inner else None
    return None


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys in {where}: {', '.join(sorted(by_name))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        typ, parse = hints[name], by_name[name].metadata.get("parse")
        section = _section_type(typ)
        if parse is not None:  # a field with its own form (a sweep space, attack settings)
            kwargs[name] = parse(value, f"{prefix}{name}")
        elif section is not None:
            kwargs[name] = _build(section, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{prefix}{name}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML)."""
    return _build(Config, data or {}, "").validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), suitable for YAML; absent sections are left out."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and _section_type(_field_types(type(cfg))[f.name]):
            continue
        if "flat" in f.metadata:
            out[f.name] = json.loads(f.metadata["flat"](value))
        elif is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"train.lr": 0.1, "train.attack.eps": 8.0, ...}`; tuples become comma-joined strings.

    Absent sections (`sweep`, `eval` of a training config) are left out; a field with its own
    form (a sweep space, attack settings) is its JSON text.
    """
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if value is None and _section_type(_field_types(type(obj))[f.name]):
                continue
            if "flat" in f.metadata:
                flat[f"{prefix}{f.name}"] = f.metadata["flat"](value)
            elif is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, tuple):
                flat[f"{prefix}{f.name}"] = ",".join(map(str, value))
            else:
                flat[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{key}' conflicts with '{p}', which is not a section")
            node = child
        node[parts[-1]] = value
    return nested


# Keys this tree does not have that flattened configs stored with runs and checkpoints may carry;
# they are dropped when such a config is read (torch.compile: see docs/benchmarks.md).
RETIRED_KEYS = ("train.compile",)


def unflatten(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`flatten`'s dict (also one stored by an older version)."""
    return config_from_dict(_nest({k: v for k, v in flat.items() if k not in RETIRED_KEYS}))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ("train.lr", 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not key=value; write e.g. --set train.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `key=value` overrides into a nested dict (before validation)."""
    merged = _nest({})
    merged.update({k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()})
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = merged
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{p}' is a value, not a section")
            else:
                child = node[p] = dict(child)
            node = child
        node[parts[-1]] = value
    return merged


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when path is None), apply overrides, validate."""
    data = read_yaml_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def read_yaml_file(path: str, example: str = "configs/smoke.yaml") -> dict[str, Any]:
    """The sections of a preset file; a missing file, bad syntax or a non-mapping is one clear ConfigError."""
    p = FsPath(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; presets live in configs/ (e.g. {example})")
    try:
        data = yaml.safe_load(p.read_text(errors="replace")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' does not hold a config (a YAML mapping of sections model:, data:, train:, ...); "
            f"pass a preset such as {example}"
        )
    return data


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_changes(cfg: Config, **sections: Any) -> Config:
    """Return a copy with some sections replaced (`with_changes(cfg, train=replace(cfg.train, lr=1))`)."""
    return replace(cfg, **sections).validate()


__all__ = [
    "INACTIVE_CANDIDATES",
    "RANK_PATHS",
    "AttackConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ScalingConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_yaml",
    "flatten",
    "is_plain_folder_name",
    "load_config",
    "read_yaml_file",
    "parse_override",
    "to_dict",
    "unflatten",
    "with_changes",
]
