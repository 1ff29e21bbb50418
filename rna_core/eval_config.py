"""The `eval:` section of the config tree: what the evaluation job attacks, how, and how it spreads.

`jobs/evaluate.py` maps each of its flags onto a key here (`--trials 3` is `eval.trials=3`), so
flags, `--set eval.<key>=...` and a YAML `eval:` section go through the same coercion and checks,
and the defaults live only here. Attack settings are written as configs write them: eps and step
sizes in pixels/255 (`eval.attack_settings.fgsm.eps=4`); :meth:`EvalConfig.attack` converts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .attacks.registry import Attack, attack_spec, get_attack
from .errors import ConfigError
from .evaluation.protocols import DEFAULT_EOT_ITER, DEFAULT_INFERENCE_DRAWS, check_protocol
from .evaluation.tables import PAPER_COLUMNS
from .speed import FORWARD_PRECISIONS
from .units import settings_to_unit

DEFAULT_ATTACKS: tuple[str, ...] = tuple(a for _, a in PAPER_COLUMNS) + ("eot_pgd", "autoattack_rand")
DEFAULT_PROTOCOLS: tuple[str, ...] = ("transfer", "eot")


def parse_attack_settings(value: Any, key: str = "eval.attack_settings") -> dict[str, dict[str, Any]]:
    """{attack: {setting: value}} from a mapping (YAML, nested overrides) or its JSON text (flattened)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ConfigError(
                f"{key} must map attacks to settings, e.g. {{pgd20: {{steps: 10}}}}; got {value!r}"
            ) from None
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(f"{key} must map attacks to settings, e.g. {{pgd20: {{steps: 10}}}}; got {value!r}")
    return {str(a).strip().lower(): dict(s) for a, s in value.items()}


def settings_text(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """The flattened form of `attack_settings` (JSON); :func:`parse_attack_settings` reads it back."""
    return json.dumps({a: dict(s) for a, s in settings.items()}, sort_keys=True)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how to spread it; None means "from the model's own config"."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    trials: int = 1
    limit: int = 0  # test images (a fixed subset spread over classes, as data.eval_limit); 0 = all
    batch_size: int | None = None  # None: data.eval_batch_size
    seed: int = 0
    eot_iter: int = DEFAULT_EOT_ITER
    inference_draws: int = DEFAULT_INFERENCE_DRAWS  # R of worst-of-R and vote-of-R (scoring draws per example)
    strategy: str | None = None  # path strategy of the protocols; None: train.sampling (our models only)
    # The model's forward in attacks and scoring: fp32 (default) | bf16 (autocast, channels_last;
    # metric names tagged _bf16). fp32 by default: see docs/benchmarks.md, `eval_precision`.
    forward_precision: str = "fp32"
    shard_size: int = 1024  # examples per unit, rounded up to whole batches
    # {attack: {setting: value}}; eps and step_size in pixels/255, as everywhere in configs
    attack_settings: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, metadata={"parse": parse_attack_settings, "flat": settings_text}
    )
    include_natural: bool = True  # clean accuracy, scored like every attack (the tables' first column)
    path_analysis: int = 256  # examples for accuracy-vs-distance and the transfer matrix; 0 = skip
    path_attack: str = "pgd20"
    cpus_per_task: float = 1.0
    # GPU share of a task, used only when the cluster has GPUs; None: sized from the model's measured
    # memory at the evaluation batch for GPUs of `gpu_memory_gib` (rna_core.memory)
    gpus_per_task: float | None = None
    gpu_memory_gib: float = 22.5  # what each GPU holds: a "24 GB" card (L4, A10G) by default
    max_in_flight: int | None = None  # None: twice the tasks the cluster can run at once
    max_retries: int = 2
    out_dir: str | None = None  # None: eval_results/<model>-<fingerprint> under the base folder
    progress_every: float = 10.0  # seconds between progress lines

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", tuple(a.strip().lower() for a in self.attacks if a.strip()))
        object.__setattr__(self, "protocols", tuple(p.strip() for p in self.protocols if p.strip()))
        object.__setattr__(self, "attack_settings", parse_attack_settings(self.attack_settings))

    def attack(self, name: str) -> Attack:
        """The attack `name` with this section's settings for it, in [0, 1] units."""
        return get_attack(name, **settings_to_unit(self.attack_settings.get(name, {})))

    def attack_objects(self) -> list[Attack]:
        """The attacks to run, natural first unless excluded."""
        names = list(self.attacks)
        if self.include_natural and "natural" not in names:
            names.insert(0, "natural")
        return [self.attack(n) for n in names]

    def validate(self) -> None:
        checks = (
            ("eval.trials", self.trials, 1),
            ("eval.shard_size", self.shard_size, 1),
            ("eval.eot_iter", self.eot_iter, 1),
            ("eval.inference_draws", self.inference_draws, 1),
            ("eval.limit", self.limit, 0),
            ("eval.path_analysis", self.path_analysis, 0),
            ("eval.max_retries", self.max_retries, 0),
        )
        for key, value, low in checks:
            if value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"eval.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.cpus_per_task <= 0 or (self.gpus_per_task is not None and not 0 <= self.gpus_per_task <= 1):
            raise ConfigError("eval.cpus_per_task must be > 0 and eval.gpus_per_task in [0, 1] (unset: sized)")
        if self.gpu_memory_gib <= 0:
            raise ConfigError(f"eval.gpu_memory_gib must be > 0 (GiB of each GPU), got {self.gpu_memory_gib}")
        if self.progress_every <= 0:
            raise ConfigError(f"eval.progress_every must be > 0 seconds, got {self.progress_every}")
        if not self.attacks:
            raise ConfigError("no attacks given; e.g. --attacks fgsm,pgd20")
        for n in list(self.attacks) + list(self.attack_settings):
            attack_spec(n)  # unknown names: one line listing the valid ones
        unused = sorted(set(self.attack_settings) - set(self.attacks) - {"natural"})
        if unused:
            raise ConfigError(
                f"settings given for attack(s) {', '.join(unused)} that are not evaluated; add them to --attacks"
            )
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"attack names must be unique, got {', '.join(self.attacks)}")
        self.attack_objects()  # unknown or bad settings: one line naming the setting
        if not self.protocols:
            raise ConfigError("no protocols given; e.g. --protocols transfer,eot")
        for p in self.protocols:
            check_protocol(p)
        if len(set(self.protocols)) != len(self.protocols):
            raise ConfigError(f"protocols must be unique, got {', '.join(self.protocols)}")
        if self.path_analysis:
            attack_spec(self.path_attack)
        if self.forward_precision not in FORWARD_PRECISIONS:
            raise ConfigError(
                f"eval.forward_precision '{self.forward_precision}' is unknown; valid: {', '.join(FORWARD_PRECISIONS)}"
            )


__all__ = ["DEFAULT_ATTACKS", "DEFAULT_PROTOCOLS", "EvalConfig", "parse_attack_settings", "settings_text"]
