"""Seeds of evaluation units, derived from a base seed by hashing the unit's key.

A sequential run and a fan-out that splits the same batches over workers (in any order, in any
grouping) compute identical results, because a unit's randomness depends only on its key, never
on which process ran it or what ran before it.
"""

from __future__ import annotations

import hashlib

_MASK = 2**63 - 1


def unit_seed(base_seed: int, *key_parts: object) -> int:
    """A 63-bit seed from `base_seed` and a key, stable across processes and Python versions."""
    text = repr((int(base_seed), *(str(p) for p in key_parts)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK


def trial_seed(base_seed: int, trial: int) -> int:
    """Seed of trial `trial`: base + trial, so a row's seed alone reproduces it as trial 0."""
    return int(base_seed) + int(trial)


def batch_seed(trial_seed_: int, batch_index: int) -> int:
    """Seed of one batch in one trial; the same for every attack and protocol on that batch.

    On purpose: every attack and protocol on a batch then sees the same attack path and scoring
    path, so the columns of a table are paired comparisons (differences are the attacks', not
    the path draws').
    """
    return unit_seed(trial_seed_, "batch", batch_index)
