"""rna_core: Random Normalization Aggregation (and RPI+RPT) in pure PyTorch.

No Ray, no MLflow: everything here runs in a notebook or on a bare GPU machine.

    import rna_core
    model = rna_core.create_model("resnet18", num_classes=10, norm="bn,gns:1")
    rna_core.count_paths(model)            # 2**20
    path = rna_core.sample_path(model, "uniform", generator=torch.Generator().manual_seed(0))
    rna_core.set_path(model, path)
"""

from .builders import create_model
from .errors import CheckpointMismatchError, ConfigError, DatasetNotFoundError, RnaError
from .methods import Method, list_methods, register_method
from .models import list_models, register_model
from .norms import BatchGroupNorm, NormSpec, available_norms, build_norm, parse_norm_spec, parse_space, register_norm
from .paths import (
    Path,
    PathSampler,
    available_strategies,
    count_paths,
    fresh_path_every_forward,
    get_path,
    random_layers,
    register_strategy,
    sample_path,
    set_path,
)
from .random_layer import RandomLayer, RandomNorm
from .rpt import path_for_precision, precision_of

__all__ = [
    "BatchGroupNorm",
    "CheckpointMismatchError",
    "ConfigError",
    "DatasetNotFoundError",
    "Method",
    "NormSpec",
    "Path",
    "PathSampler",
    "RandomLayer",
    "RandomNorm",
    "RnaError",
    "available_norms",
    "available_strategies",
    "build_norm",
    "count_paths",
    "create_model",
    "fresh_path_every_forward",
    "get_path",
    "list_methods",
    "list_models",
    "parse_norm_spec",
    "parse_space",
    "path_for_precision",
    "precision_of",
    "random_layers",
    "register_method",
    "register_model",
    "register_norm",
    "register_strategy",
    "sample_path",
    "set_path",
]
