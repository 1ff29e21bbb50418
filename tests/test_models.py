import math
from pathlib import Path as FsPath

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import rna_core
from rna_core import ConfigError, Path, count_paths, create_model, list_models, random_layers, set_path
from rna_core.quant import QuantConv2d
from rna_core.rpt import SwitchableBatchNorm

ROOT = FsPath(__file__).resolve().parents[1]

# Random norm layers per model. RNA model/wide_resnet.py: 2 per block (15 blocks in WRN-34-10, 6 in
# WRN-16-2); the norm before pooling is a plain nn.BatchNorm2d (30, not 31). PreActResNet-18: 2 per
# block (8 blocks) and the same plain final norm. ResNet-18 (model/resnet.py): 2 per block, one per
# projection shortcut (3), one after the stem.
NORM_LAYERS = {"resnet18": 20, "preact_resnet18": 16, "wrn34_10": 30, "wrn16_2": 12, "small_cnn": 4}
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


# ---------------------------------------------------------------- the final norm of WRN / PreAct


@pytest.mark.parametrize("name", ["wrn34_10", "wrn16_2", "preact_resnet18"])
@pytest.mark.parametrize("norm", ["bn,gns:1", "gn:8", "bn"])
def test_final_norm_is_plain_batchnorm_for_rna_and_switchable_for_rpt(name, norm):
    """RNA model/wide_resnet.py builds the norm before pooling with nn.BatchNorm2d, whatever the
    norm type; Double-Win Quant switches it per precision (USBatchNorm2d)."""
    model = create_model(name, norm=norm)
    assert type(model.bn) is nn.BatchNorm2d
    assert all(layer is not model.bn for layer in random_layers(model))
    rpt = create_model(name, method="rpt", norm="bn", precisions="4,8")
    assert isinstance(rpt.bn, SwitchableBatchNorm) and any(layer is rpt.bn for layer in random_layers(rpt))


# ---------------------------------------------------------------- shortcut wiring


def _shortcut_inputs(model, x):
    """For every block with a projection shortcut: (block input, block's relu(bn1(x)), shortcut input)."""
    seen = []
    for block in model.modules():
        if getattr(block, "shortcut", None) is None or not hasattr(block, "bn1"):
            continue
        record = {}
        h1 = block.register_forward_pre_hook(lambda m, a, r=record: r.__setitem__("x", a[0]))
        h2 = block.bn1.register_forward_hook(lambda m, a, out, r=record: r.__setitem__("pre", F.relu(out)))
        h3 = block.shortcut.register_forward_pre_hook(lambda m, a, r=record: r.__setitem__("skip", a[0]))
        seen.append((record, (h1, h2, h3)))
    with torch.no_grad():
        model(x)
    for _, hooks in seen:
        for h in hooks:
            h.remove()
    return [r for r, _ in seen]


@pytest.mark.parametrize("method", ["rna", "rpt"])
def test_preact_projection_shortcut_takes_the_raw_block_input(method, gen):
    """Double-Win Quant CIFAR/model/preact_resnet.py: `shortcut = self.shortcut(x)`, x the block's input."""
    options = {"precisions": "4,8"} if method == "rpt" else {}
    model = create_model("preact_resnet18", method=method, norm="bn", **options).eval()
    records = _shortcut_inputs(model, torch.rand(2, 3, 32, 32, generator=gen))
    assert len(records) == 3
    for r in records:
        assert torch.equal(r["skip"], r["x"]) and not torch.allclose(r["skip"], r["pre"])


def test_wide_resnet_projection_shortcut_takes_the_preactivated_input(gen):
    """RNA model/wide_resnet.py: when in != out, `x = relu(bn1(x))` and `convShortcut(x)`."""
    model = create_model("wrn16_2", norm="bn").eval()
    records = _shortcut_inputs(model, torch.rand(2, 3, 32, 32, generator=gen))
    assert len(records) == 3
    for r in records:
        torch.testing.assert_close(r["skip"], r["pre"])
        assert not torch.allclose(r["skip"], r["x"])


# ---------------------------------------------------------------- initialisation


def _std_and_kurtosis(t):
    t = t.detach().double().flatten()
    centred = t - t.mean()
    var = (centred**2).mean()
    return var.sqrt().item(), ((centred**4).mean() / var**2).item()


def _conv_law_ok(weight):
    """N(0, 2 / (k*k*out)) (Kaiming-normal fan_out, or WRN's normal_(0, sqrt(2/n)), n = k*k*out)."""
    out, _, kh, kw = weight.shape
    std, kurt = _std_and_kurtosis(weight)
    want = math.sqrt(2.0 / (kh * kw * out))
    return (
        abs(std / want - 1) < 0.06
        and abs(kurt - 3.0) < 0.6
        and abs(weight.mean().item()) < 4 * want / math.sqrt(weight.numel())
    )


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, QuantConv2d))]


INIT_CASES = [
    ("resnet18", "rna"),
    ("resnet18", "rpt"),
    ("preact_resnet18", "rna"),
    ("preact_resnet18", "rpt"),
    ("wrn16_2", "rna"),
    ("wrn16_2", "rpt"),
    ("wrn34_10", "rna"),
]


@pytest.mark.parametrize("name, method", INIT_CASES)
def test_initialisation_follows_the_official_code(name, method):
    """RNA resnet.py / Double-Win Quant preact_resnet.py init_params: Kaiming-normal (fan_out) convs,
    linear N(0, 0.001^2), zero biases. RNA (and Double-Win Quant) wide_resnet.py: convs
    N(0, 2/(k*k*out)), linear bias zero, linear weight PyTorch's default U(-1/sqrt(in), 1/sqrt(in)).
    Norms: weight 1, bias 0."""
    torch.manual_seed(0)
    options = {"precisions": "4,8"} if method == "rpt" else {}
    model = create_model(name, method=method, norm="bn,gns:1" if method == "rna" else "bn", **options)
    convs = _convs(model)
    assert len(convs) >= 16 and any(isinstance(c, QuantConv2d) for c in convs) == (method == "rpt")
    for conv in convs:
        if conv.weight.numel() >= 1000:  # enough draws for the std and kurtosis to mean something
            assert _conv_law_ok(conv.weight), (name, conv, _std_and_kurtosis(conv.weight))
    head = model.linear
    assert torch.equal(head.bias, torch.zeros_like(head.bias))
    if name.startswith("wrn"):
        bound = 1 / math.sqrt(head.in_features)
        std, kurt = _std_and_kurtosis(head.weight)
        assert head.weight.abs().max() <= bound and abs(std * math.sqrt(3) / bound - 1) < 0.08 and kurt < 2.2
    else:
        std, kurt = _std_and_kurtosis(head.weight)
        assert abs(std / 0.001 - 1) < 0.06 and abs(kurt - 3.0) < 0.6
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, rna_core.BatchGroupNorm)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_initialisation_is_reproducible_from_the_seed():
    def weights(seed):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in create_model("preact_resnet18", norm="bn,gns:1").parameters()]

    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- presets: no doubled candidates


def _layer_signature(module):
    """What a norm layer computes, read off the built module (not from our spec parser)."""
    if isinstance(module, nn.GroupNorm):
        return ("GroupNorm", module.num_groups, module.affine)
    if isinstance(module, nn.InstanceNorm2d):
        return ("InstanceNorm2d", module.affine, module.track_running_stats)
    if isinstance(module, nn.BatchNorm2d):
        return ("BatchNorm2d",)
    if isinstance(module, rna_core.BatchGroupNorm):
        return ("BatchGroupNorm", module.num_groups)
    raise AssertionError(f"unexpected norm {module!r}")


def _swept_spaces():
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(preset.read_text())
        name = data["model"]["name"]
        if data["model"].get("method", "rna") != "rna":
            continue
        norms = [data["model"]["norm"]]
        grid = (data.get("sweep") or {}).get("space", {}).get("model.norm")
        if grid:
            norms += grid["grid"] if isinstance(grid, dict) else grid
        yield preset.name, name, norms


@pytest.mark.parametrize("preset, name, norms", list(_swept_spaces()), ids=lambda v: v if isinstance(v, str) else None)
def test_presets_list_distinct_spaces_of_distinct_candidates(preset, name, norms):
    """Every space a preset trains builds, no layer holds two candidates that compute the same thing,
    and no two swept spaces build the same model (`bn,in` was `bn,gns:1` when `in` was a GroupNorm)."""
    models = {}
    for norm in norms:
        with torch.device("meta"):
            model = create_model(name, norm=norm)
        per_layer = []
        for layer in random_layers(model):
            sigs = [_layer_signature(c) for c in layer.candidates]
            assert len(set(sigs)) == len(sigs), (preset, norm, sigs)
            per_layer.append(tuple(sorted(map(str, sigs))))
        models.setdefault(tuple(per_layer) or str(norm), []).append(norm)
    doubled = [v for v in models.values() if len(v) > 1 and len(set(v)) > 1]
    assert not doubled, (preset, doubled)
