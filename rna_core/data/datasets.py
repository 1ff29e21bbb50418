"""One entry point from a dataset name to an in-memory dataset.

Resolution order: ``synthetic`` is generated; for CIFAR a ``{split}.parquet`` in ``data_dir``
(local folder or object-store URI) wins, since that is how offline machines and clusters get
data; otherwise torchvision's own files under ``data_dir`` (downloaded only if asked).
"""

from __future__ import annotations

import os

from rna_core.data.parquet import dataset_exists, read_parquet_dataset
from rna_core.data.synthetic import make_synthetic
from rna_core.data.tensor_dataset import ImageTensorDataset
from rna_core.data.torchvision_data import load_torchvision_cifar
from rna_core.errors import ConfigError, DatasetNotFoundError

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
SPLITS = ("train", "test")
DEFAULT_DATA_DIR = "./data"


def dataset_names() -> list[str]:
    return list(_NUM_CLASSES)


def num_classes_of(name: str) -> int:
    """Number of classes of a named dataset (models are built before data is loaded)."""
    if name not in _NUM_CLASSES:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(_NUM_CLASSES)}")
    return _NUM_CLASSES[name]


def _join(base: str, leaf: str) -> str:
    """Join for both local paths and URIs (``os.path.join`` would mangle ``s3://`` on Windows)."""
    return f"{base.rstrip('/')}/{leaf}" if "://" in base else os.path.join(base, leaf)


def load_dataset(
    name: str,
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    synthetic_size: int = 512,
    seed: int = 0,
) -> ImageTensorDataset:
    """Load ``split`` ("train" or "test") of ``name`` ("cifar10", "cifar100" or "synthetic")."""
    num_classes = num_classes_of(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")

    if name == "synthetic":
        n = synthetic_size if split == "train" else max(64, synthetic_size // 4)
        return make_synthetic(n, num_classes=num_classes, seed=seed, split=split)

    root = data_dir or DEFAULT_DATA_DIR
    parquet_uri = _join(root, f"{split}.parquet")
    if dataset_exists(parquet_uri):
        ds = read_parquet_dataset(parquet_uri, name=f"{name}-{split}")
        if len(ds.classes) != num_classes:
            raise ConfigError(
                f"{parquet_uri} has {len(ds.classes)} classes but {name} has {num_classes}; "
                f"point data_dir at a {name} folder or change the dataset name"
            )
        return ds
    if "://" in root:
        raise DatasetNotFoundError(
            f"no {split}.parquet under {root}; upload the files written by "
            f"`python jobs/prepare_data.py --dataset {name} --out DIR` there"
        )
    try:
        return load_torchvision_cifar(name, root=root, train=split == "train", download=download)
    except DatasetNotFoundError as e:
        if download:
            raise
        raise DatasetNotFoundError(
            f"{name} {split}: neither {split}.parquet nor torchvision files in {os.path.abspath(root)}; "
            f"set data.download=true, or run `python jobs/prepare_data.py --dataset {name} --out DIR` "
            "and set data_dir=DIR"
        ) from e
