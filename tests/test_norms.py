import pytest
import torch
import torch.nn as nn

from rna_core import BatchGroupNorm, ConfigError, RandomNorm, build_norm, parse_norm_spec, parse_space


def test_specs_build_the_layers_they_name():
    assert isinstance(build_norm("bn", 16), nn.BatchNorm2d)
    inorm = build_norm("in", 16)
    assert isinstance(inorm, nn.GroupNorm) and inorm.num_groups == 16 and inorm.affine
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
    with pytest.raises(ConfigError):
        parse_space("bn,gns:1,bn")


def _hand_bgn(x, groups, weight, bias, eps, mean=None, var=None):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    if mean is None:
        mean = xg.mean(dim=(0, 2, 3, 4))
        var = ((xg - mean.view(1, -1, 1, 1, 1)) ** 2).mean(dim=(0, 2, 3, 4))
    out = (xg - mean.view(1, -1, 1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1, 1) + eps)
    return out.reshape(n, c, h, w) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_batch_group_norm_matches_hand_computation_train_and_eval(gen):
    layer = BatchGroupNorm(8, 4, momentum=0.1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, generator=gen))
        layer.bias.copy_(torch.randn(8, generator=gen))
    x = torch.randn(5, 8, 3, 3, generator=gen) * 2 + 1
    layer.train()
    out = layer(x)
    expected = _hand_bgn(x, 4, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # running statistics: momentum update with the unbiased variance over batch and group channels
    xg = x.reshape(5, 4, 2, 3, 3)
    m = xg.mean(dim=(0, 2, 3, 4))
    count = 5 * 2 * 3 * 3
    unbiased = ((xg - m.view(1, -1, 1, 1, 1)) ** 2).sum(dim=(0, 2, 3, 4)) / (count - 1)
    torch.testing.assert_close(layer.running_mean, 0.1 * m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * unbiased, rtol=1e-5, atol=1e-6)
    layer.eval()
    y = torch.randn(2, 8, 3, 3, generator=gen)
    expected_eval = _hand_bgn(y, 4, layer.weight, layer.bias, layer.eps, layer.running_mean, layer.running_var)
    torch.testing.assert_close(layer(y), expected_eval, rtol=1e-4, atol=1e-4)
    # eval output of one example does not depend on the rest of the batch
    torch.testing.assert_close(layer(y[:1]), layer(y)[:1])


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
