"""CIFAR-10/100 through torchvision's own download and file layout.

This is the path users with network access take; offline machines use Parquet files instead
(see :mod:`rna_core.data.parquet`). torchvision already holds the whole split as one NHWC
uint8 array, so conversion is a single permute.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from rna_core.data.tensor_dataset import ImageTensorDataset
from rna_core.errors import ConfigError, DatasetNotFoundError

TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_torchvision_cifar(
    name: Literal["cifar10", "cifar100"], root: str, train: bool, download: bool
) -> ImageTensorDataset:
    """Load a CIFAR split from ``root`` (torchvision layout), downloading only if asked."""
    from torchvision import datasets  # imported here: torchvision is slow to import

    classes_by_name = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if name not in classes_by_name:
        raise ConfigError(f"unknown torchvision dataset {name!r}; use one of {', '.join(classes_by_name)}")
    root = os.path.abspath(os.path.expanduser(root))
    split = "train" if train else "test"
    where = os.path.join(root, TORCHVISION_FOLDERS[name])
    try:
        ds = classes_by_name[name](root=root, train=train, download=download)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            f"{name} {split} split not found in {where}; pass download=True (data.download=true), "
            f"or write Parquet files with `python jobs/prepare_data.py --dataset {name} --out DIR` and set data_dir=DIR"
        ) from e
    except OSError as e:  # download attempted and failed (no network, disk full, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetNotFoundError(
            f"could not download {name} to {root} ({reason}); on an offline machine copy Parquet files "
            f"made by `python jobs/prepare_data.py --dataset {name} --out DIR` and set data_dir=DIR"
        ) from e

    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageTensorDataset(images=images, labels=labels, classes=list(ds.classes), name=f"{name}-{split}")
