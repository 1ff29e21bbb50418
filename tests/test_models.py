import pytest
import torch

import rna_core
from rna_core import ConfigError, Path, count_paths, create_model, list_models, random_layers, set_path

NORM_LAYERS = {"resnet18": 20, "preact_resnet18": 17, "wrn34_10": 31, "wrn16_2": 13, "small_cnn": 4}
SPACES = ["bn", "bn,gns:1", "bn,in,bgn:8"]


@pytest.mark.parametrize("name", sorted(NORM_LAYERS))
@pytest.mark.parametrize("space", SPACES)
def test_model_shapes_paths_and_path_dependence(name, space):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, norm=space).eval()
    k = len(space.split(","))
    layers = NORM_LAYERS[name]
    assert len(random_layers(model)) == (layers if k > 1 else 0)
    assert count_paths(model) == (k**layers if k > 1 else 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        if k == 1:
            assert model(x).shape == (2, 7)
            return
        set_path(model, Path((0,) * layers))
        a = model(x)
        set_path(model, Path((1,) * layers))
        b = model(x)
    assert a.shape == (2, 7)
    assert (a - b).abs().max() > 1e-4


def test_registry_lists_paper_models_and_rejects_unknown():
    assert {"resnet18", "wrn34_10", "preact_resnet18"} <= set(list_models())
    with pytest.raises(ConfigError, match="valid models"):
        create_model("resnet19")
    with pytest.raises(ConfigError):
        create_model("resnet18", norm="gn:7")


def test_input_standardisation_is_the_first_layer():
    model = create_model("resnet18", norm="bn", dataset="cifar100", num_classes=100)
    first = next(iter(model.children()))
    assert isinstance(first, rna_core.models.Standardize)
    torch.testing.assert_close(first.mean.flatten(), torch.tensor(rna_core.models.layers.CIFAR100_MEAN))
    assert model.rna_spec == {"model": "resnet18", "num_classes": 100, "method": "rna", "norm": "bn"}
