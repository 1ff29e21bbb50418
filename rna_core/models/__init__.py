"""Models: a registry (`create_model`) and the CIFAR networks, all built through one layer factory."""

from . import preact_resnet, resnet, small_cnn, wide_resnet  # noqa: F401  (register the models)
from .layers import LayerFactory, Standardize
from .registry import create_model, list_methods, list_models, register_method, register_model

__all__ = ["LayerFactory", "Standardize", "create_model", "list_methods", "list_models", "register_method", "register_model"]
