"""Models: a registry of CIFAR networks, all built through one layer factory (see rna_core.builders)."""

from . import preact_resnet, resnet, small_cnn, wide_resnet  # noqa: F401  (register the models)
from .layers import LayerFactory, Standardize
from .registry import dataset_stats, list_models, model_builder, register_model

__all__ = ["LayerFactory", "Standardize", "dataset_stats", "list_models", "model_builder", "register_model"]
