"""Datasets as in-memory uint8 tensors: CIFAR (torchvision or Parquet), synthetic data, batching."""

from rna_core.data.augment import crop_flip, random_crop_flip
from rna_core.data.datasets import dataset_names, load_dataset, num_classes_of
from rna_core.data.loader import BatchIterator
from rna_core.data.parquet import read_parquet_dataset, write_parquet_dataset
from rna_core.data.subsets import fixed_subset, held_out_rows, load_split, training_splits, validation_rows
from rna_core.data.synthetic import make_synthetic
from rna_core.data.tensor_dataset import ImageTensorDataset
from rna_core.data.torchvision_data import load_torchvision_cifar

__all__ = [
    "BatchIterator",
    "ImageTensorDataset",
    "crop_flip",
    "dataset_names",
    "fixed_subset",
    "load_dataset",
    "load_split",
    "load_torchvision_cifar",
    "make_synthetic",
    "num_classes_of",
    "random_crop_flip",
    "read_parquet_dataset",
    "held_out_rows",
    "training_splits",
    "validation_rows",
    "write_parquet_dataset",
]
