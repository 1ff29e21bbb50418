"""The fixed row subsets every run and job agree on: training rows, validation split, held-out slice.

Fixed seeds (not a run's seed) pick them, so every run of a config trains on the same rows and is
scored on the same test rows, and the evaluation job's `--limit N` takes the same N test rows as
a training run's `data.eval_limit: N`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .datasets import load_dataset
from .tensor_dataset import ImageTensorDataset

DATA_SEED = 0  # the synthetic task (class patterns) is fixed; train.seed varies the training only
SUBSET_SEED = 0x5E1EC7  # which rows train_limit / eval_limit keep: fixed, so every run sees the same slice
VAL_SEED = 0x7A11D  # which training rows data.val_size holds out: fixed, the same in every run and job


def fixed_subset(dataset: ImageTensorDataset, limit: int) -> ImageTensorDataset:
    """`limit` rows picked by a fixed seed (the same in every run and job), kept in file order.

    Not simply the first rows: dataset files may be sorted by class (the offline CIFAR Parquet
    copies are), and the first 1000 rows would then be one class. 0 (or more rows than there
    are) means the whole dataset.
    """
    if not limit or limit >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return dataset.subset(perm[:limit].sort().values)


def validation_rows(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows) of a training file of `n` rows, both in file order.

    A fixed permutation (VAL_SEED) picks the `val_size` validation rows, so they are spread over
    the classes of a class-sorted file, the same in every run, and disjoint from the rest.
    """
    if not 0 <= val_size < n:
        raise ConfigError(f"data.val_size ({val_size}) must be smaller than the training set ({n} images); lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[:val_size].sort().values, perm[val_size:].sort().values


def _load(data_cfg: Any, split: str) -> ImageTensorDataset:
    d = data_cfg
    return load_dataset(
        d.dataset, split, data_dir=d.data_dir, download=False, synthetic_size=d.synthetic_size, seed=DATA_SEED
    )


def training_splits(cfg: Any) -> tuple[ImageTensorDataset, ImageTensorDataset | None]:
    """(rows to train on, validation split or None) of a Config's training file: never overlapping.

    `data.val_size` rows are held out first (validation_rows); `data.train_limit` then keeps a
    fixed subset of the rest.
    """
    d = cfg.data
    full = _load(d, "train")
    if d.val_size <= 0:
        return fixed_subset(full, d.train_limit), None
    val_idx, train_idx = validation_rows(len(full), d.val_size)
    return fixed_subset(full.subset(train_idx), d.train_limit), full.subset(val_idx)


def held_out_rows(data_cfg: Any, limit: int) -> ImageTensorDataset:
    """`limit` rows of the test file (0: all), the same rows for a given limit in every run and job."""
    return fixed_subset(_load(data_cfg, "test"), limit)


def load_split(cfg: Any, split: str) -> ImageTensorDataset:
    """Training rows (see training_splits) or the held-out slice (`data.eval_limit` test rows)."""
    if split == "train":
        return training_splits(cfg)[0]
    return held_out_rows(cfg.data, cfg.data.eval_limit)


__all__ = [
    "DATA_SEED",
    "SUBSET_SEED",
    "VAL_SEED",
    "fixed_subset",
    "load_split",
    "held_out_rows",
    "training_splits",
    "validation_rows",
]
