"""The evaluation attack registry: attacks by name, each with its settings and threat model.

An attack object is callable, ``attack(model, x, y, generator) -> x_adv``, works in [0, 1] pixel
space (every model standardises its own input) and knows its threat model (``norm`` and ``eps``
in [0, 1] units, ``eps`` None for unbounded attacks such as DeepFool and CW-L2), so protocols and
tests can check it. Attacks never decide which path a randomized model runs: the protocol does
(see ``rna_core.evaluation.protocols``).

Every call is reproducible from ``generator``: one seed is drawn from it; our own attacks use a
generator seeded with it, and library attacks (which draw from the global torch RNG) run inside
``torch.random.fork_rng`` with the global RNG seeded with it, so global random state is untouched.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from ..errors import ConfigError

NORMS = ("linf", "l2", "none")
# L2 radius of the unperturbed rule's APGD-CE for unbounded L2 attacks (CW-L2, DeepFool): the
# standard CIFAR L2 budget (AutoAttack, RobustBench), in [0, 1] pixel units. Setting `fill_eps`.
DEFAULT_L2_FILL_EPS = 0.5


@dataclass(frozen=True)
class ThreatModel:
    """What an attack may do to an input: ``norm`` ball of radius ``eps`` ([0, 1] units), inside [0, 1]."""

    norm: str
    eps: float | None

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example distance in this threat model's norm (L-inf for `none`, for reporting)."""
        delta = (x_adv - x).flatten(1)
        if self.norm == "l2":
            return delta.norm(p=2, dim=1)
        return delta.abs().amax(dim=1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-example boolean: inside [0, 1] and (for bounded norms) within eps + tol of x."""
        flat = x_adv.flatten(1)
        in_box = (flat >= -tol).all(1) & (flat <= 1 + tol).all(1)
        if self.norm == "none" or self.eps is None:
            return in_box
        return in_box & (self.distance(x_adv, x) <= self.eps + tol)


def draw_seed(generator: torch.Generator | None) -> int:
    """A 63-bit seed from `generator` (seed 0 when None, so a call is still reproducible)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global torch RNG (CPU and `device`) seeded; restore it afterwards.

    torchattacks and pyautoattack draw random starts from the global RNG (pyautoattack even calls
    ``torch.manual_seed`` itself); forking keeps those draws reproducible and our state untouched.
    """
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze the model's parameters for the block: attacks need d loss / d input only.

    Some library attacks call ``loss.backward()`` (torchattacks CW, DeepFool), which would otherwise
    accumulate ``.grad`` on every parameter; freezing also skips that work.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


# An example counts as handed back unperturbed when it moved by at most this much in the attack's
# norm: float rounding (CW-L2's tanh round trip of the clean input moves it by ~1e-7), not an attack.
UNPERTURBED_TOL = 1e-5
# APGD-CE of the unperturbed rule: pyautoattack's own settings for it in AutoAttack (100 iterations,
# one restart, rho 0.75), returning each example's highest-loss point.
FILL_ITERATIONS = 100


class Attack:
    """Base class of registered attacks. Subclasses implement :meth:`run`.

    Class attributes: ``norm`` (threat model), ``library`` (who runs it: ``torchattacks``,
    ``pyautoattack`` or ``rna_core``), ``native_eot`` (the attack itself averages gradients over
    repeated forwards, so under the ``eot`` protocol each repeat is simply given a fresh path),
    ``stops_when_fooled`` (the attack already stops per example once misclassified, as DeepFool does),
    ``perturbs`` (False only for ``natural``, which is clean accuracy by definition).

    The unperturbed rule (README, "The method in this code"): an attack run by the ``transfer`` or
    ``eot`` protocol (:meth:`scored_on_another_path`) never hands back an example unperturbed. Where
    its own output leaves an example within ``UNPERTURBED_TOL`` of the clean input (AutoAttack skips
    examples its forward already misclassifies and returns those it cannot fool; CW-L2 returns those
    it never fooled; DeepFool those misclassified from the start), that example gets APGD-CE's
    highest-loss point instead, in the attack's threat model (L-inf at its eps; an unbounded L2
    attack at L2 radius ``fill_eps``), on the same model with the same EOT setting. The judgement
    "already fooled" or "cannot be fooled" was made on the attack path; another path scores.
    """

    norm: ClassVar[str] = "linf"
    library: ClassVar[str] = "rna_core"
    native_eot: ClassVar[bool] = False
    stops_when_fooled: ClassVar[bool] = False
    perturbs: ClassVar[bool] = True

    def __init__(self, name: str, settings: dict[str, Any]):
        self.name = name
        self.settings = dict(settings)
        self.fill_unperturbed = False

    @property
    def eps(self) -> float | None:
        """Radius of the threat model in [0, 1] units, None for unbounded attacks."""
        if self.norm == "none":
            return None
        eps = self.settings.get("eps")
        return None if eps is None else float(eps)

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Adversarial examples for (x, y) on `model`'s current path; x in [0, 1].

        The model runs in eval mode during the attack (as torchattacks does) and gets its mode back.
        """
        own, filled = self.outputs(model, x, y, generator, fill=self.fill_unperturbed)
        return own if filled is None else filled

    def outputs(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        fill: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the attack's own output, with `fill` the same under the unperturbed rule, else None) of one run.

        Both come from one attack: the protocols that score the same attack output two ways
        (``fixed-path`` and ``transfer-raw`` the own output, ``transfer`` the filled one) share it,
        and each gets exactly what a call of this attack alone, or of its ``scored_on_another_path``
        variant, returns with the same generator.
        """
        seed = draw_seed(generator)
        own_gen = torch.Generator().manual_seed(seed)
        x = x.detach()
        was_training = model.training
        model.eval()
        filled = None
        try:
            with input_gradients_only(model), seeded_global_rng(seed, x.device):
                x_adv = self.run(model, x, y, own_gen).detach().to(x.dtype)
                if fill and self.perturbs:
                    fill_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=own_gen).item())
                    with seeded_global_rng(fill_seed, x.device):
                        filled = self.attack_the_unperturbed(model, x, y, x_adv, fill_seed).detach().to(x.dtype)
        finally:
            model.train(was_training)
        return x_adv, filled

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def scored_on_another_path(self) -> Attack:
        """This attack as the ``transfer`` and ``eot`` protocols run it: under the unperturbed rule.

        An example handed back unperturbed would be scored clean on a path the attack never saw
        (its verdict "already fooled" or "cannot fool" was taken on the attack path), so there it
        gets APGD-CE's highest-loss point instead (see the class docstring). ``transfer-raw``,
        ``fixed-path`` and ``early-stop`` run the attack as it is.
        """
        if not self.perturbs:
            return self
        variant = copy.copy(self)
        variant.fill_unperturbed = True
        return variant

    def unperturbed(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example boolean: moved by at most UNPERTURBED_TOL in the attack's norm."""
        return self.threat.distance(x_adv, x) <= UNPERTURBED_TOL

    def fill_budget(self) -> tuple[str, float]:
        """(pyautoattack norm, radius) of the APGD-CE that replaces unperturbed examples."""
        if self.norm == "l2":
            eps = self.settings.get("eps") if self.eps is not None else self.settings.get("fill_eps")
            return "L2", float(eps if eps is not None else DEFAULT_L2_FILL_EPS)
        return "Linf", float(self.settings.get("eps") or 0.0)

    def attack_the_unperturbed(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """APGD-CE's highest-loss point for every example `x_adv` leaves unperturbed. Runs: pyautoattack."""
        left = self.unperturbed(x_adv, x)
        norm, eps = self.fill_budget()
        if not bool(left.any()) or eps <= 0:
            return x_adv
        from pyautoattack.autopgd_base import APGDAttack

        eot_iter = int(self.settings.get("eot_iter", 1)) if self.native_eot else 1
        apgd = APGDAttack(
            model,
            n_iter=FILL_ITERATIONS,
            norm=norm,
            n_restarts=1,
            eps=eps,
            seed=seed,
            loss="ce",
            eot_iter=eot_iter,
            rho=0.75,
            device=x.device,
        )
        x_adv = x_adv.clone()
        x_adv[left] = apgd.perturb(x[left], y[left], best_loss=True).to(x_adv.dtype)
        return x_adv

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}[{self.name}]({args})"


@dataclass(frozen=True)
class AttackSpec:
    """A registered name: the class that runs it and its default settings."""

    name: str
    cls: type[Attack]
    defaults: dict[str, Any]

    @property
    def library(self) -> str:
        return self.cls.library

    @property
    def norm(self) -> str:
        return self.cls.norm


_REGISTRY: dict[str, AttackSpec] = {}
A = TypeVar("A", bound=type[Attack])


def register_attack(name: str, **defaults: Any) -> Callable[[A], A]:
    """Register an :class:`Attack` subclass under `name` with default settings (a class may hold several names)."""

    def deco(cls: A) -> A:
        if cls.norm not in NORMS:
            raise ValueError(f"attack {name}: norm must be one of {NORMS}, got {cls.norm!r}")
        _REGISTRY[name] = AttackSpec(name, cls, dict(defaults))
        return cls

    return deco


def list_attacks() -> list[str]:
    """Registered attack names, in registration order (natural first, then the paper's columns)."""
    return list(_REGISTRY)


def attack_spec(name: str) -> AttackSpec:
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown attack '{name}'; valid attacks: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


_INT_SETTINGS = {"steps", "eot_iter", "restarts"}


def _check_setting(name: str, key: str, value: Any, default: Any = None) -> Any:
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if numeric_default and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"attack '{name}': setting {key}={value!r} must be a number (default {default})")
    if isinstance(value, bool) or value is None:
        return value
    if not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        raise ConfigError(f"attack '{name}': setting {key}={value} must be a finite number")
    if value < 0:
        raise ConfigError(f"attack '{name}': setting {key}={value} must be >= 0")
    if key in _INT_SETTINGS:
        if int(value) != value or value < 1:
            raise ConfigError(f"attack '{name}': setting {key}={value} must be a positive integer")
        return int(value)
    if key in ("eps", "step_size") and value > 1:
        raise ConfigError(
            f"attack '{name}': {key}={value:g} is above 1 in [0, 1] pixel units (8/255 = 0.0314); in configs and "
            f"--attack-set it is in pixels/255, so at most 255"
        )
    return value


def get_attack(name: str, **overrides: Any) -> Attack:
    """The attack registered as `name` with its defaults (the paper's) updated by `overrides`."""
    spec = attack_spec(name)
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise ConfigError(f"attack '{spec.name}' has no setting {', '.join(unknown)}; its settings: {valid}")
    settings = {**spec.defaults, **{k: _check_setting(spec.name, k, v, spec.defaults[k]) for k, v in overrides.items()}}
    return spec.cls(spec.name, settings)


def resolve_attack(attack: str | Attack) -> Attack:
    """An attack object from a name or an attack object."""
    return attack if isinstance(attack, Attack) else get_attack(attack)
