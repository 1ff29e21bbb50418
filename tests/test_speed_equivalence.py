"""Speed changes keep results: bit-identical where promised, within stated tolerance otherwise.

- pgd_linf's precomputed projection bounds, fused step and gradient sum: bit-identical to the
  plain formula (below, as it was written before the speed work).
- The CPU->GPU copy helper: same values.
- channels_last (other convolution kernels): the same step within float rounding.
- bf16 autocast: actually runs the convolutions in bf16 (attack and update), loss within 5%.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rna_core import create_model, get_path
from rna_core.attacks.pgd import pgd_linf
from rna_core.config import AttackConfig, TrainConfig, flatten, load_config, unflatten
from rna_core.errors import ConfigError
from rna_core.optim import build_optimizer
from rna_core.paths import PathSampler, fresh_path_every_forward
from rna_core.speed import AutocastForward, to_device_async, use_channels_last
from rna_core.training import train_step

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine a second OpenMP thread that loses its core stalls
    every op. (Results do not depend on it: each comparison runs both sides in this process.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plain_pgd(model, x, y, eps, step_size, steps, generator, grad_repeats=1, active_mask_fn=None, random_start=True):
    """The straightforward PGD formula (projection on the ball, then the box, every step)."""
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        x_adv = (x + (noise * 2 - 1) * eps).clamp_(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = torch.zeros_like(x)
        for _ in range(grad_repeats):
            x_req = x_adv.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y), [x_req])
            grad += g
        step = step_size * grad.sign()
        if active_mask_fn is not None:
            step = step * active_mask_fn(x_adv).to(x.dtype).view(-1, 1, 1, 1)
        x_adv = torch.min(torch.max(x_adv + step, x - eps), x + eps).clamp_(0, 1).detach()
    return x_adv


def _model(norm="bn,gns:1", seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", norm=norm)


def _batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[:, :, :3] = 0.0  # pixels on the box edge exercise the [0, 1] clamp
    x[:, :, -3:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_is_bit_identical_to_the_plain_formula(random_start):
    model = _model().eval()
    x, y = _batch()
    ours = pgd_linf(model, x, y, EPS, STEP, 5, random_start, torch.Generator().manual_seed(9))
    plain = plain_pgd(model, x, y, EPS, STEP, 5, torch.Generator().manual_seed(9), random_start=random_start)
    assert torch.equal(ours, plain)
    assert (ours - x).abs().max() > EPS / 2  # the attack moved: equality is not vacuous


def test_pgd_with_mask_and_eot_is_bit_identical_to_the_plain_formula():
    model = _model().train()  # train mode: BN statistics move with every forward, in both runs
    x, y = _batch()
    mask_fn = lambda x_adv: torch.arange(x_adv.shape[0]) % 2 == 0  # noqa: E731
    results = []
    for fn in (pgd_linf, plain_pgd):
        m = copy.deepcopy(model)
        sampler = PathSampler("uniform", seed=4)
        with fresh_path_every_forward(m, sampler):
            if fn is pgd_linf:
                out = pgd_linf(
                    m,
                    x,
                    y,
                    EPS,
                    STEP,
                    2,
                    True,
                    torch.Generator().manual_seed(2),
                    grad_repeats=2,
                    active_mask_fn=mask_fn,
                )
            else:
                out = plain_pgd(
                    m, x, y, EPS, STEP, 2, torch.Generator().manual_seed(2), grad_repeats=2, active_mask_fn=mask_fn
                )
        results.append((out, m.state_dict(), sampler.draws))
    (a, sa, da), (b, sb, db) = results
    assert torch.equal(a, b) and da == db == 4
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_to_device_async_keeps_values_and_skips_same_device():
    t = torch.arange(6.0)
    assert to_device_async(t, torch.device("cpu")) is t
    if torch.cuda.is_available():  # pragma: no cover - only on GPU machines
        moved = to_device_async(t, torch.device("cuda"))
        assert torch.equal(moved.cpu(), t)


def _one_step(model, cfg, x, y, seed=0):
    opt = build_optimizer(model, cfg)
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    out = train_step(model, x, y, opt, cfg, PathSampler("uniform", seed=seed))
    handle.remove()
    return out, inputs[-1], model.state_dict(), opt


def test_channels_last_gives_the_same_step_within_rounding():
    x, y = _batch(16)
    base = _model()
    cfg = TrainConfig(attack=AttackConfig(steps=3))
    out_a, adv_a, state_a, _ = _one_step(copy.deepcopy(base), cfg, x, y)
    model_cl = copy.deepcopy(base)
    out_b, adv_b, state_b, opt_b = _one_step(
        model_cl, TrainConfig(attack=AttackConfig(steps=3), channels_last=True), x, y
    )
    conv = next(m for m in model_cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(p is conv.weight for g in opt_b.param_groups for p in g["params"])  # optimizer still holds it
    # A gradient sign may flip at a rounding boundary; only a tiny fraction of pixels may differ.
    assert ((adv_a - adv_b).abs() > 1e-6).float().mean() < 0.01
    assert torch.allclose(out_a.loss_sum, out_b.loss_sum, rtol=1e-3)
    for k in state_a:
        assert torch.allclose(state_a[k].float(), state_b[k].float(), rtol=1e-3, atol=1e-4), k


def test_use_channels_last_is_idempotent():
    model = _model()
    assert use_channels_last(model) is model and use_channels_last(model) is model
    assert model._rna_channels_last


def test_bf16_autocast_runs_convs_in_bf16_in_attack_and_update():
    x, y = _batch(8)
    model = _model()
    dtypes: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    cfg = TrainConfig(attack=AttackConfig(steps=2), amp_bf16=True)
    out_bf16, _, _, _ = _one_step(copy.deepcopy(model), TrainConfig(attack=AttackConfig(steps=2)), x, y)
    dtypes.clear()
    out, _, state, _ = _one_step(model, cfg, x, y)
    assert dtypes == [torch.bfloat16] * 3  # 2 attack forwards + the update forward
    assert out.loss_sum.dtype == torch.float32 and torch.isfinite(out.loss_sum)
    assert torch.allclose(out.loss_sum, out_bf16.loss_sum, rtol=0.05)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_autocast_forward_returns_float32_and_reaches_random_layers():
    model = _model()
    wrapped = AutocastForward(model)
    sampler = PathSampler("fixed:1111")
    sampler.apply(wrapped)
    assert str(get_path(model)) == "1111"
    assert wrapped(torch.rand(2, 3, 32, 32)).dtype == torch.float32


def test_speed_flags_are_config_keys():
    cfg = load_config(None, ["train.channels_last=true", "train.amp_bf16=true"])
    assert cfg.train.channels_last and cfg.train.amp_bf16
    assert not TrainConfig().channels_last and not TrainConfig().amp_bf16


def test_compile_is_not_a_flag_but_old_stored_configs_still_load():
    """`train.compile` was accepted and never applied (docs/benchmarks.md: it cannot pay with random
    paths); it is refused in new configs and dropped from the flattened configs older runs stored."""
    with pytest.raises(ConfigError, match="unknown config key 'train.compile'"):
        load_config(None, ["train.compile=true"])
    stored = {**flatten(load_config(None, ["train.lr=0.05"])), "train.compile": False}
    assert unflatten(stored).train.lr == 0.05
