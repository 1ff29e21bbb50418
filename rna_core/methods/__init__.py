"""Randomization methods (`model.method`): `rna` (random norms) and `rpt` (random precision).

    from rna_core.methods import get_method
    get_method("rpt").train_config(cfg)     # the TrainConfig train_step runs for RPT

A method is one module here: a :class:`Method` subclass registered with :func:`register_method`.
"""

from . import rna, rpt  # noqa: F401  (register the methods)
from .base import Criterion, Method, get_method, list_methods, method_row_label, register_method

__all__ = ["Criterion", "Method", "get_method", "list_methods", "method_row_label", "register_method"]
