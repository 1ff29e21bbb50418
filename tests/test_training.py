import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rna_core
from rna_core import create_model, get_path
from rna_core.attacks.pgd import pgd_linf
from rna_core.config import AttackConfig, TrainConfig
from rna_core.data import BatchIterator, make_synthetic
from rna_core.optim import build_optimizer, build_scheduler, lr_factor
from rna_core.paths import PathSampler
from rna_core.training import craft_adversarial, evaluate_clean, evaluate_pgd, train_epoch, train_step

EPS = 8 / 255


def _model(norm="bn,gns:1", seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", norm=norm)


def test_pgd_stays_in_ball_and_box_and_raises_loss(gen):
    model = _model().eval()
    x = torch.rand(16, 3, 32, 32, generator=gen)
    x[:, :, :4] = 0.0  # pixels at the box edge must stay inside [0, 1]
    y = torch.randint(0, 10, (16,), generator=gen)
    x_adv = pgd_linf(model, x, y, eps=EPS, step_size=2 / 255, steps=10, generator=gen)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (torch.rand(x.shape, generator=gen) * 2 - 1).sign() * EPS
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        random = F.cross_entropy(model((x + noise).clamp(0, 1)), y)
        adv = F.cross_entropy(model(x_adv), y)
    assert adv > clean + 0.005 and adv > random + 0.005, (clean, random, adv)


def test_pgd_computes_no_parameter_gradients(gen):
    model = _model().train()
    x = torch.rand(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    pgd_linf(model, x, y, eps=EPS, step_size=2 / 255, steps=3, generator=gen)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_is_reproducible_with_a_seeded_generator():
    model = _model().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    a = pgd_linf(model, x, y, EPS, 2 / 255, 3, generator=torch.Generator().manual_seed(5))
    b = pgd_linf(model, x, y, EPS, 2 / 255, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def _adv_loss(model, x, y, seed):
    model.eval()
    sampler = PathSampler("uniform", seed=seed)
    sampler.apply(model)
    x_adv = craft_adversarial(model, x, y, AttackConfig(steps=5), sampler.generator)
    with torch.no_grad():
        return F.cross_entropy(model(x_adv), y).item()


def test_blackbox_steps_lower_adversarial_loss():
    data = make_synthetic(256, seed=0)
    model = _model()
    cfg = TrainConfig(epochs=1, lr=0.05, attack=AttackConfig(steps=3), schedule="constant")
    x_eval, y_eval = data.images[:128].float() / 255, data.labels[:128]
    before = _adv_loss(model, x_eval, y_eval, seed=11)
    opt = build_optimizer(model, cfg)
    sampler = PathSampler("uniform", seed=0)
    history = []
    for epoch in range(5):
        stats = train_epoch(model, BatchIterator(data, 32, shuffle=True, seed=0, epoch=epoch), opt, cfg, sampler)
        history.append(stats["train_loss"])  # adversarial loss on the update path
    after = _adv_loss(model, x_eval, y_eval, seed=11)
    assert math.isfinite(stats["train_loss"]) and stats["images"] == 256
    assert history[-1] < history[0] - 0.4, history
    assert after < before - 0.15, (before, after)


def test_blackbox_draws_independent_attack_and_update_paths(gen):
    model = _model()
    cfg = TrainConfig(mode="blackbox", attack=AttackConfig(steps=1))
    opt = build_optimizer(model, cfg)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3])
    sampler = PathSampler("far:1.0", seed=0)
    seen = []
    orig_apply = sampler.apply

    def spy(m, relative_to=None):
        p = orig_apply(m, relative_to)
        seen.append(p)
        return p

    sampler.apply = spy  # type: ignore[method-assign]
    train_step(model, x, y, opt, cfg, sampler)
    assert len(seen) == 2 and seen[0].differences(seen[1]) == 4  # far:1.0 = complement
    assert get_path(model) == seen[1]
    seen.clear()
    train_step(model, x, y, opt, replace(cfg, mode="whitebox"), sampler)
    assert len(seen) == 1 and get_path(model) == seen[0]


@pytest.mark.parametrize("mode", ["whitebox", "eot", "natural"])
def test_other_modes_take_a_step(mode, gen):
    model = _model()
    cfg = TrainConfig(mode=mode, eot_iter=2, attack=AttackConfig(steps=2))
    opt = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    sampler = PathSampler("uniform", seed=0)
    out = train_step(
        model, torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen), opt, cfg, sampler
    )
    assert out.n == 8 and torch.isfinite(out.loss_sum)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    expected_draws = {"whitebox": 1, "natural": 1, "eot": 2 * 2 + 1}[mode]
    assert sampler.draws == expected_draws


def test_schedules():
    cfg = TrainConfig(epochs=200)
    assert lr_factor(cfg, 0) == 1 and lr_factor(cfg, 99) == 1
    assert lr_factor(cfg, 100) == pytest.approx(0.1) and lr_factor(cfg, 150) == pytest.approx(0.01)
    cos = replace(cfg, schedule="cosine")
    assert lr_factor(cos, 0) == 1 and lr_factor(cos, 100) == pytest.approx(0.5) and lr_factor(cos, 199) < 0.01
    model = _model()
    opt = build_optimizer(model, replace(cfg, epochs=4))
    sched = build_scheduler(opt, replace(cfg, epochs=4))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_evaluation_helpers_count_examples():
    data = make_synthetic(64, seed=1)
    model = _model()
    sampler = PathSampler("uniform", seed=0)
    correct, n = evaluate_clean(model, BatchIterator(data, 32, shuffle=False, seed=0), sampler)
    assert n == 64 and 0 <= correct <= 64
    rob, n2 = evaluate_pgd(model, BatchIterator(data, 32, shuffle=False, seed=0), sampler, steps=2)
    assert n2 == 64 and rob <= 64


def test_short_runs_start_at_the_base_lr():
    assert lr_factor(TrainConfig(epochs=1), 0) == 1
    two = TrainConfig(epochs=2)
    assert [lr_factor(two, e) for e in (0, 1)] == pytest.approx([1, 0.1])


class ScriptedSampler(PathSampler):
    """Hands out a fixed sequence of paths (attack, update, attack, update, ...)."""

    def __init__(self, paths):
        super().__init__("uniform", seed=0)
        self.script = [rna_core.Path.parse(p) for p in paths]

    def sample(self, model, relative_to=None):
        self.draws += 1
        return self.script.pop(0)


def _inactive_candidate_run(policy: str):
    """Two blackbox steps: attack path all-gns ("1111"), update path all-bn ("0000")."""
    model = _model()
    with torch.no_grad():  # non-trivial affine values, so decay is visible on weights and biases
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.05, attack=AttackConfig(steps=2), inactive_candidates=policy)
    opt = build_optimizer(model, cfg)
    gns = {n: p for n, p in model.named_parameters() if ".candidates.1." in n}
    bn = {n: p for n, p in model.named_parameters() if ".candidates.0." in n}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sampler = ScriptedSampler(["1111", "0000", "1111", "0000"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(
            model, torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen), opt, cfg, sampler
        )
    return model, opt, cfg, gns, bn, start


def test_inactive_candidates_decay_and_carry_momentum_every_step_as_the_official_loop():
    """The official loops (RNA / Double-Win Quant train.py on torch 1.7/1.8) craft with loss.backward()
    and clear with an in-place opt.zero_grad(): a candidate off the update path keeps a zero .grad, so
    torch.optim.SGD (weight decay wd, momentum m, lr) does to it, over two steps:
        d1 = 0 + wd * p0;  buf1 = d1;              p1 = p0 - lr * buf1
        d2 = 0 + wd * p1;  buf2 = m * buf1 + d2;   p2 = p1 - lr * buf2
    """
    model, opt, cfg, gns, bn, start = _inactive_candidate_run("decay")
    lr, wd, m = cfg.lr, cfg.weight_decay, cfg.momentum
    assert len(gns) == 8  # 4 GroupNorm candidates (weight, bias), on the attack path only
    for name, p in gns.items():
        p0 = start[name]
        buf1 = wd * p0
        p1 = p0 - lr * buf1
        buf2 = m * buf1 + wd * p1
        p2 = p1 - lr * buf2
        torch.testing.assert_close(p.detach(), p2, rtol=0, atol=1e-7, msg=name)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf2, rtol=0, atol=1e-7, msg=name)
        assert not torch.equal(p.detach(), p0)
    for name, p in bn.items():  # the update path's candidates moved by their gradients as well
        assert not torch.allclose(p.detach(), start[name] * (1 - lr * wd) ** 2, atol=1e-6), name


def test_inactive_candidates_skip_leaves_them_untouched():
    model, opt, cfg, gns, bn, start = _inactive_candidate_run("skip")
    for name, p in gns.items():
        assert torch.equal(p.detach(), start[name]), name
        assert "momentum_buffer" not in opt.state.get(p, {})
    assert all(not torch.equal(p.detach(), start[n]) for n, p in bn.items())
