"""Attacks: our PGD for training (pgd.py) and the evaluation attack registry (registry.py).

Which library runs which registered attack is listed in ``library_attacks.py`` and ``own_attacks.py``.
"""

# Registration order is the registry's order (natural first, then the paper's columns): keep it.
from . import own_attacks  # noqa: F401

# isort: split
from . import library_attacks  # noqa: F401
from .pgd import input_gradient, pgd_linf, random_start
from .registry import (
    Attack,
    AttackSpec,
    ThreatModel,
    attack_spec,
    get_attack,
    list_attacks,
    register_attack,
    resolve_attack,
)

__all__ = [
    "Attack",
    "AttackSpec",
    "ThreatModel",
    "attack_spec",
    "get_attack",
    "input_gradient",
    "list_attacks",
    "pgd_linf",
    "random_start",
    "register_attack",
    "resolve_attack",
]
