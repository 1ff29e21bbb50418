"""Attacks: our PGD for training (pgd.py) and the evaluation attack registry (registry.py).

Which library runs which registered attack is listed in ``library_attacks.py`` and ``own_attacks.py``.
"""

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
from . import own_attacks, library_attacks  # noqa: E402,F401  (registers the attacks; natural first)

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
