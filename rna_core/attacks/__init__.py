"""Attacks: our PGD for training (pgd.py); the evaluation attack registry lives beside it."""

from .pgd import input_gradient, pgd_linf, random_start

__all__ = ["input_gradient", "pgd_linf", "random_start"]
