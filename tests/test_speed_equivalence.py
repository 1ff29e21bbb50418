"""Speed changes keep results: bit-identical where promised, within stated tolerance otherwise.

- pgd_linf's precomputed projection bounds, fused step and gradient sum: bit-identical to the
  plain formula (below, as it was written before the speed work).
- The CPU->GPU copy helper: same values.
- channels_last (other convolution kernels): the same step within float rounding; the batch keeps
  the layout through the PGD loop and the norms; small-group GroupNorm in bf16 runs the fused
  channels_last kernel (same values as nn.GroupNorm within bf16 rounding, forward and gradients),
  or a contiguous copy where that kernel is switched off or cannot be built.
- bf16 autocast: actually runs the convolutions in bf16 (attack and update), loss within 5%; the
  same method (same paths, no parameter gradients in the attack, fp32 loss and weights); each
  weight cast to bf16 once per attack, bit-identical to casting it every step.
- `auto`: on exactly where the device has a bf16 fast path; explicit true/false win.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rna_core.attacks.pgd as pgd_module
from rna_core import create_model, get_path, speed
from rna_core.attacks.pgd import pgd_linf
from rna_core.config import AttackConfig, TrainConfig, flatten, load_config, unflatten
from rna_core.errors import ConfigError
from rna_core.optim import build_optimizer
from rna_core.paths import PathSampler, fresh_path_every_forward
from rna_core.speed import AutocastForward, resolve_speed, to_device_async, use_channels_last
from rna_core.training import train_step

EPS, STEP = 8 / 255, 2 / 255
FP32 = {"amp_bf16": "false", "channels_last": "false"}  # explicit: `auto` would pick bf16 on a bf16 CPU


def _cfg(steps: int = 3, **flags) -> TrainConfig:
    return TrainConfig(attack=AttackConfig(steps=steps), **{**FP32, **flags})


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
    out_a, adv_a, state_a, _ = _one_step(copy.deepcopy(base), _cfg(3), x, y)
    model_cl = copy.deepcopy(base)
    out_b, adv_b, state_b, opt_b = _one_step(model_cl, _cfg(3, channels_last="true"), x, y)
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
    cfg = _cfg(2, amp_bf16="true")
    out_fp32, _, _, _ = _one_step(copy.deepcopy(model), _cfg(2), x, y)
    assert dtypes == [torch.float32] * 3
    dtypes.clear()
    out, _, state, _ = _one_step(model, cfg, x, y)
    assert dtypes == [torch.bfloat16] * 3  # 2 attack forwards + the update forward
    assert out.loss_sum.dtype == torch.float32 and torch.isfinite(out.loss_sum)
    assert torch.allclose(out.loss_sum, out_fp32.loss_sum, rtol=0.05)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_autocast_forward_returns_float32_and_reaches_random_layers():
    model = _model()
    wrapped = AutocastForward(model)
    sampler = PathSampler("fixed:1111")
    sampler.apply(wrapped)
    assert str(get_path(model)) == "1111"
    assert wrapped(torch.rand(2, 3, 32, 32)).dtype == torch.float32


def test_speed_flags_are_config_keys_auto_by_default():
    cfg = load_config(None, ["train.channels_last=true", "train.amp_bf16=false"])
    assert (cfg.train.channels_last, cfg.train.amp_bf16) == ("true", "false")
    assert (TrainConfig().channels_last, TrainConfig().amp_bf16) == ("auto", "auto")
    # Python booleans and YAML spellings (old checkpoints' flattened configs hold booleans) normalise.
    assert TrainConfig(channels_last=True, amp_bf16=False).channels_last == "true"
    assert load_config(None, ["train.amp_bf16=no", "train.channels_last=AUTO"]).train.amp_bf16 == "false"
    with pytest.raises(ConfigError, match="train.amp_bf16 must be auto, true or false, got 'sometimes'"):
        load_config(None, ["train.amp_bf16=sometimes"])


def test_auto_follows_the_devices_bf16_fast_path(monkeypatch, tmp_path):
    auto = TrainConfig()
    for features, expected in ((("avx512_bf16",), True), (("amx_bf16", "avx512_bf16"), True), ((), False)):
        speed._resolve_auto.cache_clear()
        monkeypatch.setattr(speed, "cpu_bf16_features", lambda f=features: f)
        flags = resolve_speed(auto, "cpu")
        assert (flags.amp_bf16, flags.channels_last) == (expected, expected), features
        assert flags.params()["resolved.train.amp_bf16"] == str(expected).lower()
        assert ("avx512_bf16" in flags.reason) == expected
        # explicit values win over auto either way
        explicit = resolve_speed(TrainConfig(amp_bf16="false", channels_last="true"), "cpu")
        assert (explicit.amp_bf16, explicit.channels_last, explicit.reason) == (False, True, "set explicitly")
        mixed = resolve_speed(TrainConfig(amp_bf16="true"), "cpu")  # channels_last still auto
        assert (mixed.amp_bf16, mixed.channels_last) == (True, expected)
    speed._resolve_auto.cache_clear()
    if not torch.cuda.is_available():
        assert resolve_speed(auto, "cuda") == speed.SpeedFlags(False, False, "cuda: no bf16 fast path (off)")
    assert resolve_speed(auto, "meta").amp_bf16 is False
    # /proc/cpuinfo's flags line, the fallback when torch's probe is missing
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert speed._cpuinfo_flags(str(info)) & set(speed.CPU_BF16_FLAGS) == {"avx512_bf16"}
    assert speed._cpuinfo_flags(str(tmp_path / "missing")) == set()


def test_cpu_bf16_features_agree_with_proc_cpuinfo():
    flags = speed._cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    expected = tuple(f for f in speed.CPU_BF16_FLAGS if f in flags) if torch.backends.mkldnn.is_available() else ()
    assert speed.cpu_bf16_features() == expected


def _counting_param_grads(model):
    counts = {}
    for name, p in model.named_parameters():
        counts[name] = 0
        p.register_post_accumulate_grad_hook(lambda _p, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def _recording_sampler(seed: int) -> tuple[PathSampler, list[str]]:
    sampler, drawn = PathSampler("uniform", seed=seed), []
    apply = sampler.apply

    def spy(target, relative_to=None):
        path = apply(target, relative_to=relative_to)
        drawn.append(str(path))
        return path

    sampler.apply = spy  # type: ignore[method-assign]
    return sampler, drawn


@pytest.mark.parametrize("flags", [FP32, {"amp_bf16": "true", "channels_last": "true"}])
def test_bf16_step_is_the_same_method(flags):
    """Same attack and update paths as fp32, parameter gradients from the update pass only (the
    attack asks for input gradients), fp32 weights and loss."""
    x, y = _batch(8)
    fp32_model, model = _model(), _model()
    paths = []
    for m, cfg in ((fp32_model, _cfg(3)), (model, _cfg(3, **flags))):
        counts = _counting_param_grads(m)
        sampler, drawn = _recording_sampler(5)
        out = train_step(m, x, y, build_optimizer(m, cfg), cfg, sampler)
        paths.append(drawn)
        assert max(counts.values()) == 1, "a parameter gradient was accumulated outside the update pass"
        assert out.loss_sum.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in m.parameters())
    assert paths[0] == paths[1] and len(paths[0]) == 2  # attack path, then the update path


def _bf16_casts_of(shapes):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func is torch.ops.aten._to_copy.default
                and kwargs.get("dtype") == torch.bfloat16
                and tuple(args[0].shape) in shapes
            ):
                Count.n += 1
            return func(*args, **kwargs)

    return Count()


def test_weights_are_cast_to_bf16_once_per_attack_with_the_same_result(monkeypatch):
    x, y = _batch(8)
    results = []
    for cache in (True, False):
        model = _model()
        shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)}
        if not cache:
            monkeypatch.setattr(pgd_module, "runs_in_bf16", lambda m: False)
        cfg = _cfg(5, amp_bf16="true", channels_last="true")
        with _bf16_casts_of(shapes) as counter:
            out, adv, state, _ = _one_step(model, cfg, x, y)
        results.append((counter.n, out.loss_sum, adv, state))
    (cached_casts, loss_a, adv_a, state_a), (plain_casts, loss_b, adv_b, state_b) = results
    convs = len([m for m in _model().modules() if isinstance(m, nn.Conv2d)])
    assert cached_casts == 2 * convs  # once for the 5 attack steps, once for the update
    assert plain_casts == 6 * convs  # once per forward
    assert torch.equal(loss_a, loss_b) and torch.equal(adv_a, adv_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_batch_keeps_channels_last_through_the_attack_and_the_norms():
    x, y = _batch(8)
    model = _model("gns:1,bn")
    layouts = {"model_in": [], "conv_in": [], "gn_in": [], "gn_out": []}
    cl = torch.channels_last
    model.register_forward_pre_hook(lambda m, a: layouts["model_in"].append(a[0].is_contiguous(memory_format=cl)))
    cfg = _cfg(3, amp_bf16="true", channels_last="true")
    use_channels_last(model)  # installs the layout hooks first, so the hooks below see their result
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda m, a: layouts["conv_in"].append(a[0].is_contiguous(memory_format=cl)))
        if isinstance(m, nn.GroupNorm):
            assert isinstance(m, speed.ChannelsLastGroupNorm)
            m.register_forward_pre_hook(lambda m, a: layouts["gn_in"].append(a[0].is_contiguous(memory_format=cl)))
            m.register_forward_hook(lambda m, a, o: layouts["gn_out"].append(o.is_contiguous(memory_format=cl)))
    sampler = PathSampler("fixed:0000", seed=0)  # every layer on gns:1, the small-group GroupNorm
    train_step(model, x, y, build_optimizer(model, cfg), cfg, sampler)
    assert speed.fused_group_norm_active()  # the fused kernel was built and used, not the copy
    assert layouts["model_in"] == [True] * 4  # 3 PGD steps and the update: x_adv stays channels_last
    assert all(layouts["conv_in"]) and len(layouts["conv_in"]) == 16
    assert layouts["gn_in"] == [True] * 16 and layouts["gn_out"] == [True] * 16  # no layout copy around it
    # fp32 keeps nn.GroupNorm's own channels_last kernel (it is not slower enough to pay for a copy)
    calls = []
    real = speed._fused_group_norm
    speed._fused_group_norm = lambda m, x: calls.append(1) or real(m, x)
    try:
        cfg32 = _cfg(1, channels_last="true")
        train_step(model, x, y, build_optimizer(model, cfg32), cfg32, sampler)
    finally:
        speed._fused_group_norm = real
    assert calls == []


def _group_norm_pass(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x_req = x.detach().requires_grad_(True)
    out = layer(x_req)
    norm = layer[0] if isinstance(layer, nn.Sequential) else layer
    gx, gw, gb = torch.autograd.grad(out, [x_req, norm.weight, norm.bias], grad)
    return out, gx, gw, gb


@pytest.mark.parametrize("channels,groups", [(16, 16), (12, 4)])  # gns:1 (fused) and gns:3 (copy route)
def test_small_group_norm_matches_group_norm_forward_and_gradients(channels, groups):
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(6, channels, 8, 8, generator=g) * 3 + 1
    grad32 = torch.randn(6, channels, 8, 8, generator=g)
    ref = nn.GroupNorm(groups, channels).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        ref.bias.copy_(torch.randn(channels, generator=g))
    fused = use_channels_last(nn.Sequential(copy.deepcopy(ref).float()))  # as a model's layer gets it
    assert isinstance(fused[0], speed.ChannelsLastGroupNorm)
    x = x32.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = grad32.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    want = _group_norm_pass(ref, x.double(), grad.double())
    got = _group_norm_pass(fused, x, grad)
    assert speed.fused_group_norm_active()
    assert got[0].dtype == torch.bfloat16 and got[0].is_contiguous(memory_format=torch.channels_last)
    if groups == channels:  # fused: the input gradient keeps the layout too
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):  # bf16 output rounding: 2^-8 relative
        assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max(), (a.double() - b).abs().max()
    # and the copy route gives the same within the same rounding
    speed.set_fused_group_norm(False)
    try:
        copied = _group_norm_pass(fused, x, grad)
    finally:
        speed.set_fused_group_norm(True)
    for a, b in zip(copied, want):
        assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max()
    # two kernels really ran (their outputs agree to the bit here: both keep fp32 statistics)
    fused_here = type(got[0].grad_fn).__name__ == "_FusedChannelNormBackward"
    assert fused_here == (groups == channels)  # fused for one channel per group only
    assert type(copied[0].grad_fn).__name__ != "_FusedChannelNormBackward"


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_fused_group_norm_that_cannot_be_built_falls_back_with_one_warning(monkeypatch, failing):
    real = speed._compiled

    def compiled(fn):
        if fn.__name__ == f"_channel_norm_{failing}":

            def fail(*args):
                raise RuntimeError("no C++ compiler here")

            return fail
        return real(fn)

    monkeypatch.setattr(speed, "_compiled", compiled)
    monkeypatch.setitem(speed._fused_state, "failure", None)
    layer = use_channels_last(nn.Sequential(nn.GroupNorm(8, 8)))
    x = (torch.randn(2, 8, 4, 4) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    ref = nn.GroupNorm(8, 8).double()
    want = _group_norm_pass(ref, x.double(), grad.double())
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        got = _group_norm_pass(layer, x, grad)
    assert not speed.fused_group_norm_active()
    for a, b in zip(got, want):  # the result is still right (copy route, or the backward uncompiled)
        assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max()
    assert speed._fused_state["failure"].startswith("RuntimeError: no C++ compiler here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off for good: no second build, no second warning
        again = _group_norm_pass(layer, x, grad)
    assert type(again[0].grad_fn).__name__ != "_FusedChannelNormBackward"


def test_fused_group_norm_switch_reads_the_environment():
    import subprocess
    import sys

    code = "from rna_core import speed; print(speed.fused_group_norm_active())"
    env = {**__import__("os").environ, "RNA_FUSED_GROUPNORM": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env["RNA_FUSED_GROUPNORM"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_compile_is_not_a_flag_but_old_stored_configs_still_load():
    """`train.compile` was accepted and never applied (docs/benchmarks.md: it cannot pay with random
    paths); it is refused in new configs and dropped from the flattened configs older runs stored."""
    with pytest.raises(ConfigError, match="unknown config key 'train.compile'"):
        load_config(None, ["train.compile=true"])
    stored = {**flatten(load_config(None, ["train.lr=0.05"])), "train.compile": False}
    assert unflatten(stored).train.lr == 0.05
