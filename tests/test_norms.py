import pytest
import torch
import torch.nn as nn

from rna_core import BatchGroupNorm, ConfigError, RandomNorm, build_norm, create_model, parse_norm_spec, parse_space
from rna_core.rpt import SwitchableBatchNorm


def test_specs_build_the_layers_they_name():
    assert isinstance(build_norm("bn", 16), nn.BatchNorm2d)
    assert isinstance(build_norm("in", 16), nn.InstanceNorm2d)
    assert build_norm("ln", 16).num_groups == 1
    assert build_norm("gn:4", 16).num_groups == 4
    assert build_norm("gns:4", 16).num_groups == 4  # groups of 4 channels
    assert build_norm("gns:1", 16).num_groups == 16
    bgn = build_norm("bgn:8", 16)
    assert isinstance(bgn, BatchGroupNorm) and bgn.num_groups == 8
    assert build_norm("bgns:2", 16).num_groups == 8


@pytest.mark.parametrize("bad", ["bx", "gn", "gn:0", "gn:x", "bn:3", ""])
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(ConfigError) as err:
        parse_space(bad) if bad == "" else parse_norm_spec(bad)
    assert "\n" not in str(err.value)


def test_group_count_that_does_not_divide_names_layer_channels_and_alternative():
    with pytest.raises(ConfigError) as err:
        build_norm("gn:7", 64, where="layer1.0.bn1")
    msg = str(err.value)
    assert "layer1.0.bn1" in msg and "64" in msg and "7" in msg and "gn:8" in msg
    with pytest.raises(ConfigError) as err:
        build_norm("bgns:3", 16, where="stem")
    assert "stem" in str(err.value) and "16" in str(err.value)


def test_space_rejects_duplicates():
    with pytest.raises(ConfigError, match="lists 'bn' twice"):
        parse_space("bn,gns:1,bn")


def _instance_standardised(x, eps=1e-5):
    # RNA model/norm.py: nn.InstanceNorm2d(C): per example and channel, biased variance, no affine.
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_in_is_the_official_instance_norm_not_gns_1(gen):
    """`in` is nn.InstanceNorm2d(C) as in the RNA code: no affine, no running statistics, in train
    and eval alike; `gns:1` (GroupNorm, one group per channel) keeps its affine parameters."""
    inorm = build_norm("in", 6)
    assert list(inorm.parameters()) == [] and list(inorm.buffers()) == []
    assert not inorm.affine and not inorm.track_running_stats
    x = torch.randn(4, 6, 5, 5, generator=gen) * 3 + 2
    for mode in (inorm.train, inorm.eval):
        mode()
        torch.testing.assert_close(inorm(x), _instance_standardised(x), rtol=1e-5, atol=1e-5)
    gns = build_norm("gns:1", 6)
    with torch.no_grad():
        gns.weight.fill_(2.0)
    assert (gns(x) - inorm(x)).abs().max() > 1.0  # the two are different candidates now
    assert RandomNorm("bn,in,gns:1", 6).num_choices == 3


@pytest.mark.parametrize(
    "space, channels, layer, pair",
    [
        ("ln,gn:1", 16, "GroupNorm with 1 group", ("ln", "gn:1")),
        ("bn,gns:16,ln", 16, "GroupNorm with 1 group", ("gns:16", "ln")),
        ("gn:4,gns:4", 16, "GroupNorm with 4 groups", ("gn:4", "gns:4")),
        ("bn,bgn:2,bgns:8", 16, "BatchGroupNorm with 2 groups", ("bgn:2", "bgns:8")),
    ],
)
def test_identical_candidates_at_a_layer_are_one_line_config_errors(space, channels, layer, pair):
    with pytest.raises(ConfigError) as err:
        RandomNorm(space, channels, where="layer1.0.bn1")
    msg = str(err.value)
    assert "\n" not in msg and "layer1.0.bn1" in msg and f"{channels} channels" in msg and layer in msg, msg
    assert all(f"'{spec}'" in msg for spec in pair) and "drop one" in msg, msg


def test_identical_candidates_are_caught_at_the_first_layer_where_they_coincide():
    # gn:2 and gns:64 are one GroupNorm only at 128 channels: layer2's first block in ResNet-18.
    with pytest.raises(ConfigError, match="at layer 'layer2.0.bn1' \\(128 channels\\)"):
        create_model("resnet18", norm="bn,gn:2,gns:64")
    # Candidates that differ in numerics are distinct (bgn:C is not bn; in is not gns:1 or gn:C).
    for space in ("bn,bgns:1", "in,gns:1,bgns:1", "in,gn:16", "bn,in,ln,gns:1"):
        create_model("small_cnn", norm=space)
    # One kind repeated on purpose: switchable BatchNorm (one BatchNorm per precision) is allowed.
    assert SwitchableBatchNorm(8, (4, 8, 16)).num_choices == 3


def _official_gbn(x, groups, weight, bias, eps, stats=None):
    """RNA model/norm.py GroupBatchNorm2d.forward, written out: unbiased variance over the batch and
    the channels of a group (Tensor.var), also when normalising in training."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    if stats is None:
        count = n * (c // groups) * h * w
        mean = xg.sum(dim=(0, 2, 3, 4)) / count
        var = ((xg - mean.view(1, -1, 1, 1, 1)) ** 2).sum(dim=(0, 2, 3, 4)) / (count - 1)
    else:
        mean, var = stats
    out = (xg - mean.view(1, -1, 1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1, 1) + eps)
    return out.reshape(n, c, h, w) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), mean, var


def test_batch_group_norm_has_the_official_numerics_train_and_eval(gen):
    layer = BatchGroupNorm(8, 4)
    assert layer.momentum == 0.1
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, generator=gen))
        layer.bias.copy_(torch.randn(8, generator=gen))
    layer.train()
    run_mean, run_var = torch.zeros(4), torch.ones(4)  # the official initial buffers
    for n in (5, 3):  # two steps: the running update is a recurrence
        x = torch.randn(n, 8, 3, 3, generator=gen) * 2 + 1
        expected, mean, var = _official_gbn(x, 4, layer.weight, layer.bias, 1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        # running = 0.1 * running + 0.9 * batch; the variance with a further N / (N - 1)
        run_mean = 0.1 * run_mean + 0.9 * mean
        run_var = 0.1 * run_var + 0.9 * (n / (n - 1)) * var
        torch.testing.assert_close(layer.running_mean, run_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, run_var, rtol=1e-5, atol=1e-6)
    layer.eval()
    y = torch.randn(2, 8, 3, 3, generator=gen)
    expected_eval, *_ = _official_gbn(y, 4, layer.weight, layer.bias, 1e-5, (run_mean, run_var))
    torch.testing.assert_close(layer(y), expected_eval, rtol=1e-5, atol=1e-5)
    # eval output of one example does not depend on the rest of the batch
    torch.testing.assert_close(layer(y[:1]), layer(y)[:1])


def test_batch_group_norm_gradients_flow_through_the_batch_statistics(gen):
    layer = BatchGroupNorm(4, 2).train()
    x = torch.randn(3, 4, 2, 2, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 2, 2, generator=gen)
    (gx,) = torch.autograd.grad((layer(x) * w).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    expected, *_ = _official_gbn(x2, 2, layer.weight.detach(), layer.bias.detach(), 1e-5)
    (gx2,) = torch.autograd.grad((expected * w).sum(), x2)
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-5)


def test_batch_group_norm_edge_cases(gen):
    layer = BatchGroupNorm(4, 2).train()
    with pytest.raises(ValueError, match="at least 2 examples"):
        layer(torch.randn(1, 4, 3, 3, generator=gen))
    x = torch.randn(4, 4, 3, 3, generator=gen)
    ref = BatchGroupNorm(4, 2).train()(x)
    out = layer(x.to(torch.bfloat16))  # statistics in float32, output in the input's dtype
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)


def test_random_norm_isolates_gradients_and_buffers(gen):
    rn = RandomNorm("bn,gns:1,bgn:2", 4)
    rn.train()
    rn.set_choice(0)
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    x = torch.randn(6, 4, 5, 5, generator=gen, requires_grad=True)
    rn(x).pow(2).sum().backward()
    bn, gns, bgn = rn.candidates
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert gns.weight.grad is None and bgn.weight.grad is None
    after = rn.state_dict()
    assert not torch.equal(after["candidates.0.running_mean"], before["candidates.0.running_mean"])
    assert torch.equal(after["candidates.2.running_mean"], before["candidates.2.running_mean"])
    assert torch.equal(after["candidates.2.running_var"], before["candidates.2.running_var"])
    # switching applies exactly the chosen candidate
    rn.eval()
    rn.set_choice(1)
    torch.testing.assert_close(rn(x), gns(x))
    with pytest.raises(IndexError):
        rn.set_choice(3)
