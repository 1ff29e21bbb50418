"""RPI+RPT (Double-Win Quant) on the path mechanism: quantizer, layers, switchable BN, training, protocols."""

import copy
import math
from dataclasses import replace
from pathlib import Path as FsPath

import pytest
import torch
import torch.nn.functional as F

import rna_core
from rna_core import (
    CheckpointMismatchError,
    ConfigError,
    Path,
    count_paths,
    create_model,
    get_path,
    random_layers,
    set_path,
)
from rna_core.builders import effective_train_config, model_from_config
from rna_core.checkpoint import load_checkpoint, save_checkpoint
from rna_core.config import AttackConfig, flatten, load_config
from rna_core.data import BatchIterator, make_synthetic
from rna_core.optim import build_optimizer
from rna_core.paths import PathSampler
from rna_core.quant import (
    QuantConv2d,
    QuantLinear,
    RunningRange,
    channel_range,
    quantize,
    quantize_values,
    quantize_weight,
)
from rna_core.rpt import SwitchableBatchNorm, format_precisions, parse_precisions, path_for_precision, precision_of
from rna_core.training import craft_adversarial, evaluate_clean, evaluate_pgd, train_step

CONFIGS = FsPath(__file__).resolve().parent.parent / "configs"


def _rpt(name="small_cnn", precisions="4,8", seed=0):
    torch.manual_seed(seed)
    return create_model(name, method="rpt", norm="bn", precisions=precisions)


# ---------------------------------------------------------------- the quantizer


def test_quantization_error_falls_as_bits_rise(gen):
    x = torch.randn(4096, generator=gen) * 3 + 1
    errors = []
    for bits in (1, 2, 4, 8, 12, 16):
        q = quantize_values(x, bits)
        step = (x.max() - x.min()) / (2**bits - 1)
        err = (q - x).abs()
        ulps = 8 * torch.finfo(torch.float32).eps * x.abs().max()  # float32 arithmetic slack
        assert err.max() <= step / 2 + ulps, bits  # the nearest level, never further
        assert q.unique().numel() <= 2**bits
        assert q.min() >= x.min() - 1e-5 and q.max() <= x.max() + 1e-5
        errors.append(err.mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * errors[0]
    assert set(quantize_values(x, 1).tolist()) == {x.min().item(), x.max().item()}


def test_quantized_layer_output_error_falls_as_bits_rise(gen):
    conv = QuantConv2d(8, 16, 3, padding=1, precisions=(2, 4, 8, 16))
    x = torch.randn(4, 8, 12, 12, generator=gen)
    with torch.no_grad():
        exact = F.conv2d(x, conv.weight, None, 1, 1)
        errors = []
        for choice in range(conv.num_choices):
            conv.set_choice(choice)
            errors.append(((conv(x) - exact).norm() / exact.norm()).item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[0] > 0.05, errors


def test_constant_tensor_and_half_precision_do_not_break_the_quantizer():
    const = torch.full((3, 5), 0.7)
    for bits in (1, 8, 32):
        assert torch.equal(quantize_values(const, bits), const)
    h = torch.linspace(-2, 2, 1000).half()
    q = quantize_values(h, 16)
    assert q.dtype == torch.float16 and torch.isfinite(q).all()
    with pytest.raises(ValueError):
        quantize_values(const, 0)


def test_straight_through_gradients_reach_weights_and_inputs(gen):
    x = torch.randn(64, generator=gen, requires_grad=True)
    g = torch.randn(64, generator=gen)
    quantize(x, 3).backward(g)
    assert torch.equal(x.grad, g)  # identity: rounding's zero derivative is ignored

    conv = QuantConv2d(3, 4, 3, padding=1, precisions=(4,))
    inp = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    out = conv(inp)
    weights = torch.randn(out.shape, generator=gen)
    (out * weights).sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and inp.grad.abs().sum() > 0
    # STE: the gradients are those of a plain conv evaluated at the quantized weight and input
    # (train mode: the input with the batch's range; the weight per output channel).
    qx = quantize_values(inp.detach(), 4).requires_grad_(True)
    qw = quantize_values(conv.weight.detach(), 4, *channel_range(conv.weight)).requires_grad_(True)
    (F.conv2d(qx, qw, None, 1, 1) * weights).sum().backward()
    torch.testing.assert_close(inp.grad, qx.grad)
    torch.testing.assert_close(conv.weight.grad, qw.grad)

    lin = QuantLinear(6, 3, precisions=(5,))
    v = torch.randn(4, 6, generator=gen, requires_grad=True)
    lin(v).pow(2).sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


# ---------------------------------------------------------------- fidelity to Double-Win Quant's quantizer


def _measure(model, gen, batches=2, n=16):
    """A few train-mode forwards (no update), so every quantized layer has a running input range."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(n, 3, 32, 32, generator=gen))
    return model.eval()


def _forget_ranges(model):
    """The same model with its quantizers never measured: eval falls back to each batch's own range."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, RunningRange):
            m.num_measured.zero_()
    return twin


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
def test_eval_prediction_does_not_depend_on_the_rest_of_the_batch(name, gen):
    model = _measure(_rpt(name=name, precisions="4,8"), gen)
    set_path(model, path_for_precision(model, 4))  # the coarsest precision: range matters most
    x0 = torch.rand(1, 3, 32, 32, generator=gen)
    others = (torch.rand(7, 3, 32, 32, generator=gen) * 2 - 0.5).clamp(0, 1)  # higher contrast
    batch = torch.cat([x0, others])
    first = next(m for m in model.modules() if isinstance(m, QuantConv2d))
    seen = []
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(torch.aminmax(args[0])))
    with torch.no_grad():
        alone, inside = model(x0), model(batch)[:1]
        handle.remove()
        torch.testing.assert_close(alone, inside, atol=1e-5, rtol=0)
        # The same comparison fails for a batch-range quantizer (the earlier one): the first
        # quantized layer sees another input range alone than inside the batch, and neither is
        # the running range eval uses.
        (lo1, hi1), (lo8, hi8) = seen
        assert (hi8 - hi1) > 0.05 or (lo1 - lo8) > 0.05
        running = (first.input_range.running_min, first.input_range.running_max)
        assert abs(running[1] - hi1) > 1e-3 and abs(running[1] - hi8) > 1e-3
        batch_range = _forget_ranges(model)
        gap = (batch_range(x0) - batch_range(batch)[:1]).abs().max()
    assert gap > 1e-3, gap


def test_running_range_updates_in_train_mode_only_first_batch_sets_it(gen):
    conv = QuantConv2d(3, 4, 3, padding=1, precisions=(4, 8))
    rr = conv.input_range
    x1 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 0.5
    x2 = torch.rand(4, 3, 8, 8, generator=gen) * 4 - 1
    with torch.no_grad():
        conv.eval()(x1)  # never measured: eval runs (on the batch range) but measures nothing
        assert rr.num_measured.item() == 0 and rr.running_min.item() == 0 and rr.running_max.item() == 0
        conv.train()(x1)
        assert rr.num_measured.item() == 1  # the first batch sets the range (no mixing with zeros)
        assert rr.running_min.item() == x1.min().item() and rr.running_max.item() == x1.max().item()
        conv.set_choice(1)  # one range for all precisions
        trained = conv(x2)
        assert rr.num_measured.item() == 2  # later batches: 0.1 * running + 0.9 * batch
        # train mode quantizes with the batch's own range, not the running one
        wq = quantize_values(conv.weight, 8, *channel_range(conv.weight))
        torch.testing.assert_close(trained, F.conv2d(quantize_values(x2, 8), wq, None, 1, 1))
        assert not torch.allclose(
            trained, F.conv2d(quantize_values(x2, 8, rr.running_min, rr.running_max), wq, None, 1, 1)
        )
        torch.testing.assert_close(rr.running_min, 0.1 * x1.min() + 0.9 * x2.min())
        torch.testing.assert_close(rr.running_max, 0.1 * x1.max() + 0.9 * x2.max())
        frozen = {k: v.clone() for k, v in conv.state_dict().items()}
        conv.eval()
        out = conv(x1)
        assert all(torch.equal(v, frozen[k]) for k, v in conv.state_dict().items())  # eval moves nothing
        expected = F.conv2d(
            quantize_values(x1, 8, rr.running_min, rr.running_max),
            quantize_values(conv.weight, 8, *channel_range(conv.weight)),
            None,
            1,
            1,
        )
        torch.testing.assert_close(out, expected)
    # A whole model measures in train-mode forwards (training and attack crafting), not in eval.
    model = _rpt(precisions="4,8")
    counters = [m.num_measured for m in model.modules() if isinstance(m, RunningRange)]
    assert len(counters) == 3
    _measure(model, gen, batches=2, n=2)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32, generator=gen))
    assert [c.item() for c in counters] == [2, 2, 2]


def test_eval_clamps_inputs_outside_the_running_range(gen):
    conv = QuantConv2d(2, 2, 1, precisions=(3,))
    lin = QuantLinear(2, 2, bias=False, precisions=(3,))
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))  # per channel 0..1: exact at any precision
        lin.weight.copy_(torch.eye(2))
        x = torch.rand(2, 2, 4, 4, generator=gen)
        x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the measured range is exactly [0, 1]
        conv.train()(x)
        lin.train()(x.permute(0, 2, 3, 1).reshape(-1, 2))
    conv.eval(), lin.eval()
    probe = torch.tensor([-3.0, -0.01, 0.0, 0.2, 0.55, 0.99, 1.0, 5.0]).view(1, 2, 2, 2).requires_grad_(True)
    levels = torch.tensor([0, 0, 0, 1, 4, 7, 7, 7], dtype=torch.float32).view(1, 2, 2, 2) / 7  # 3 bits over [0, 1]
    out = conv(probe)
    torch.testing.assert_close(out, levels)
    torch.testing.assert_close(lin(probe.detach().view(4, 2)), levels.view(4, 2))
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    torch.testing.assert_close(probe.grad, g)  # straight-through, clamped values included
    torch.testing.assert_close(quantize_values(probe, 3, torch.tensor(0.0), torch.tensor(1.0)), levels)


def test_weights_are_quantized_per_output_channel():
    conv = QuantConv2d(1, 2, 4, precisions=(4,))
    with torch.no_grad():
        conv.weight[0] = torch.linspace(-1e-3, 1e-3, 16).view(1, 4, 4)  # a channel of tiny weights
        conv.weight[1] = torch.linspace(-1.0, 1.0, 16).view(1, 4, 4)
    per_channel = quantize_weight(conv.weight, 4).detach()
    # 16 evenly spaced weights are exactly the 16 levels of their own channel's range...
    torch.testing.assert_close(per_channel, conv.weight.detach(), atol=1e-9, rtol=1e-5)
    assert per_channel[0].unique().numel() == 16
    # ...while one range for the whole tensor (step 2/15) collapses the tiny channel to <= 2 values.
    assert quantize_values(conv.weight, 4)[0].unique().numel() <= 2
    # The layer computes with the per-channel weights: one-hot inputs read them back.
    onehots = torch.eye(16).view(16, 1, 4, 4)  # inputs in {0, 1}: exact at any precision
    with torch.no_grad():
        read = conv.train()(onehots).view(16, 2).t()
    torch.testing.assert_close(read, per_channel.view(2, 16), atol=1e-9, rtol=1e-5)


# random layers with every conv and the head quantized (before) and with the original's
# full-precision stem, shortcuts and head (now), and the full-precision convs and shortcut count.
RPT_LAYERS = {"small_cnn": (9, 7, 0), "resnet18": (41, 36, 3), "preact_resnet18": (38, 33, 3), "wrn16_2": (30, 25, 3)}


@pytest.mark.parametrize("name", sorted(RPT_LAYERS))
def test_stem_shortcuts_and_head_are_full_precision(name):
    before, now, shortcuts = RPT_LAYERS[name]
    model = _rpt(name=name, precisions="4,8")
    reference = create_model(name, method="rna", norm="bn")  # same structure, plain layers
    ref_convs = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Conv2d)]
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    roles = {}
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, QuantConv2d)):
            role = "stem" if n in ("conv1", "convs.0") else "shortcut" if "shortcut" in n else "body"
            roles[n] = role
            assert isinstance(m, QuantConv2d) == (role == "body"), (n, type(m))
            assert (type(m) is torch.nn.Conv2d) == (role != "body"), (n, type(m))
    assert sorted(roles) == sorted(ref_convs)
    assert list(roles.values()).count("stem") == 1 and list(roles.values()).count("shortcut") == shortcuts
    assert type(model.linear) is torch.nn.Linear
    layers = random_layers(model)
    assert len(layers) == now == len(ref_convs) - 1 - shortcuts + norms
    assert before == len(ref_convs) + norms + 1 and now == before - 1 - shortcuts - 1
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in layers)
    assert count_paths(model) == 2


def test_checkpoint_of_the_earlier_quantizer_is_refused(tmp_path, gen):
    model = _measure(_rpt(precisions="4,8"), gen, batches=1, n=2)
    ckpt = save_checkpoint(tmp_path / "rpt.pt", model)
    load_checkpoint(ckpt, _rpt(precisions="4,8", seed=1))  # the current identity loads
    # A checkpoint written before: no quantizer key in its identity, no running-range buffers.
    payload = torch.load(ckpt, weights_only=True)
    assert payload["identity"]["quantizer"] == "dwq"
    del payload["identity"]["quantizer"]
    payload["model"] = {k: v for k, v in payload["model"].items() if ".input_range." not in k}
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(CheckpointMismatchError, match="quantizer: checkpoint None vs model 'dwq'"):
        load_checkpoint(old, _rpt(precisions="4,8"))


# ---------------------------------------------------------------- layers on the path mechanism


def test_one_precision_choice_for_the_whole_network():
    model = _rpt(precisions="4-16")
    layers = random_layers(model)
    assert len(layers) == 3 + 4  # 3 body convs, 4 switchable BNs, all tied (stem and head: full precision)
    assert {layer.tie for layer in layers} == {"precision"}
    assert count_paths(model) == 13
    gen = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(40):
        path = rna_core.sample_path(model, "uniform", gen)
        assert len(set(path.choices)) == 1
        seen.add(precision_of(model, path))
    assert len(seen) > 5 and seen <= set(range(4, 17))
    path = path_for_precision(model, 8)
    set_path(model, str(path))  # the compact string form round-trips
    assert precision_of(model) == 8 and all(layer.bits == 8 for layer in layers)
    with pytest.raises(ConfigError, match="tied"):
        set_path(model, Path((0,) * 6 + (1,)))
    with pytest.raises(ConfigError, match="not in the model's precisions"):
        path_for_precision(model, 3)
    with pytest.raises(ConfigError, match="no quantized layers"):
        precision_of(create_model("small_cnn", norm="bn,gns:1"))


def test_each_precision_batchnorm_keeps_its_own_running_statistics(gen):
    model = _rpt(precisions="4,8,16").train()
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    assert len(bns) == 4 and all(bn.num_choices == 3 for bn in bns)
    x = torch.rand(8, 3, 32, 32, generator=gen) * 0.5 + 0.5
    snapshots = []
    for bits in (4, 16):
        set_path(model, path_for_precision(model, bits))
        before = [[c.running_mean.clone() for c in bn.candidates] for bn in bns]
        with torch.no_grad():
            model(x)
        for bn, old in zip(bns, before):
            moved = [not torch.equal(c.running_mean, o) for c, o in zip(bn.candidates, old)]
            assert moved == [p == bits for p in bn.precisions], (bits, moved)
        snapshots.append([bn.candidates[bn.precisions.index(bits)].running_mean.clone() for bn in bns])
    assert torch.equal(bns[0].candidates[1].running_mean, torch.zeros_like(bns[0].candidates[1].running_mean))
    assert not torch.equal(snapshots[0][-1], snapshots[1][-1])  # 4-bit and 16-bit statistics differ


def test_fixed_precision_path_is_deterministic_and_precisions_differ(gen):
    model = _rpt(name="preact_resnet18", precisions="4-16").eval()
    x = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        set_path(model, path_for_precision(model, 4))
        a1, a2 = model(x), model(x)
        set_path(model, path_for_precision(model, 16))
        b = model(x)
    assert a1.shape == (2, 10)
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "wrn34_10"])
def test_paper_models_build_with_rpt(name):
    model = create_model(name, method="rpt", norm="bn", precisions="4,8")
    layers = random_layers(model)
    convs = sum(isinstance(m, QuantConv2d) for m in layers)
    assert convs > 11 and not any(isinstance(m, QuantLinear) for m in model.modules())
    plain = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert len(plain) == 1 + 3 + 1  # stem, 3 shortcut projections, head: full precision
    assert count_paths(model) == 2
    # PreActResNet-18 also names its shortcut wiring (Double-Win Quant's: the raw block input).
    wiring = {"shortcut": "block_input"} if name == "preact_resnet18" else {}
    assert model.rna_spec == {
        "model": name,
        "num_classes": 10,
        "method": "rpt",
        "norm": "bn",
        "precisions": "4,8",
        "quantizer": "dwq",
        **wiring,
    }


# ---------------------------------------------------------------- configuration


def test_precision_sets_parse_and_bad_ones_are_config_errors():
    assert parse_precisions("4-16") == tuple(range(4, 17))
    assert parse_precisions("16,4,8") == (4, 8, 16)
    assert parse_precisions("4-6,16") == (4, 5, 6, 16)
    assert parse_precisions((8, 4)) == (4, 8) and parse_precisions(8) == (8,)
    assert format_precisions(range(4, 17)) == "4-16" and format_precisions((4, 5, 8)) == "4,5,8"
    for bad in ("0-8", "4-33", "8-4", "4,4", "", "four", "4.5", True, -2):
        with pytest.raises(ConfigError):
            parse_precisions(bad)
    with pytest.raises(ConfigError, match="model.norm must be 'bn'"):
        create_model("small_cnn", method="rpt", norm="bn,gns:1")
    with pytest.raises(ConfigError, match="only the options"):
        create_model("small_cnn", method="rpt", norm="bn", bits=4)
    with pytest.raises(ConfigError, match="takes no options"):
        create_model("small_cnn", method="rna", norm="bn", precisions="4-8")
    with pytest.raises(ConfigError, match="rpt_draws"):
        load_config(None, ["model.method=rpt", "model.norm=bn", "model.rpt_draws=sometimes"])
    with pytest.raises(ConfigError, match="33 bits"):
        load_config(None, ["model.method=rpt", "model.norm=bn", "model.precisions=4-33"])
    with pytest.raises(ConfigError, match="must be 'bn'"):
        load_config(None, ["model.method=rpt"])  # the default norm is RNA's space


def test_model_and_train_mode_from_config():
    cfg = load_config(None, ["model.name=small_cnn", "model.method=rpt", "model.norm=bn", "model.precisions=4,6"])
    model = model_from_config(cfg)
    assert model.rna_spec["precisions"] == "4,6" and count_paths(model) == 2
    assert effective_train_config(cfg).mode == "whitebox"  # per_iteration: attack path = update path
    both = load_config(
        None, ["model.name=small_cnn", "model.method=rpt", "model.norm=bn", "model.rpt_draws=attack_and_update"]
    )
    assert effective_train_config(both).mode == "blackbox"
    assert effective_train_config(replace(both, train=replace(both.train, mode="eot"))).mode == "eot"
    with pytest.raises(ConfigError, match="contradict"):
        effective_train_config(replace(both, train=replace(both.train, mode="whitebox")))
    rna = load_config(None, ["model.name=small_cnn"])
    assert effective_train_config(rna) is rna.train
    assert model_from_config(rna).rna_spec["method"] == "rna"


def test_comparison_presets_differ_only_in_the_method():
    rna = load_config(str(CONFIGS / "compare_rna_preact_resnet18.yaml"))
    rpt = load_config(str(CONFIGS / "compare_rpt_preact_resnet18.yaml"))
    for cfg in (rna, rpt):
        assert cfg.model.name == "preact_resnet18" and cfg.data.dataset == "cifar10"
        assert cfg.train.epochs == 160 and cfg.data.batch_size == 128 and cfg.train.lr == 0.1
        assert (cfg.train.attack.eps, cfg.train.attack.step_size, cfg.train.attack.steps) == (8.0, 2.0, 7)
        assert cfg.train.milestones == (0.5, 0.75) and cfg.train.schedule == "multistep"
    assert (rna.model.method, rna.model.norm) == ("rna", "bn,gns:1")
    assert (rpt.model.method, rpt.model.norm, rpt.model.precisions) == ("rpt", "bn", "4-16")
    a, b = flatten(rna), flatten(rpt)
    assert {k for k in a if a[k] != b[k]} == {"model.method", "model.norm", "mlflow.run_name"}
    assert effective_train_config(rna).mode == "blackbox" and effective_train_config(rpt).mode == "whitebox"
    assert count_paths(model_from_config(rpt)) == 13


def test_checkpoints_round_trip_and_refuse_another_precision_set(tmp_path, gen):
    model = _rpt(precisions="4,8").train()
    set_path(model, path_for_precision(model, 8))
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32, generator=gen))  # move the 8-bit BN statistics
    ckpt = save_checkpoint(tmp_path / "rpt.pt", model)
    twin = _rpt(precisions="4,8", seed=1)
    load_checkpoint(ckpt, twin)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    model.eval(), twin.eval()
    for bits in (4, 8):
        set_path(model, path_for_precision(model, bits))
        set_path(twin, path_for_precision(twin, bits))
        with torch.no_grad():
            assert torch.equal(model(x), twin(x))
    with pytest.raises(CheckpointMismatchError, match="precisions"):
        load_checkpoint(ckpt, _rpt(precisions="4-8"))


# ---------------------------------------------------------------- training and evaluation


def _precision_spy(model):
    """Record the precision of every forward of `model`."""
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(precision_of(m)))
    return seen, handle


@pytest.mark.parametrize("draws", ["per_iteration", "attack_and_update"])
def test_rpt_draws_decide_whether_attack_and_update_share_a_precision(draws, gen):
    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.method=rpt",
            "model.norm=bn",
            "model.precisions=4-16",
            f"model.rpt_draws={draws}",
            "train.attack.steps=2",
        ],
    )
    model = model_from_config(cfg)
    train = effective_train_config(cfg)
    opt = build_optimizer(model, train)
    sampler = PathSampler(train.sampling, seed=0)
    seen, handle = _precision_spy(model)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3])
    mismatched = 0
    for _ in range(8):
        seen.clear()
        train_step(model, x, y, opt, train, sampler)
        assert len(seen) == 3 and seen[0] == seen[1]  # the attack runs at one precision
        mismatched += seen[-1] != seen[0]
    handle.remove()
    if draws == "per_iteration":
        assert mismatched == 0 and sampler.draws == 8
    else:
        assert mismatched >= 4 and sampler.draws == 16


def _adv_loss_per_precision(model, x, y, bits_list, seed):
    """Mean PGD-5 loss over the precisions, on a copy in train mode (batch statistics, as in RPT)."""
    probe = copy.deepcopy(model).train()
    losses = []
    for bits in bits_list:
        set_path(probe, path_for_precision(probe, bits))
        x_adv = craft_adversarial(probe, x, y, AttackConfig(steps=5), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            losses.append(F.cross_entropy(probe(x_adv), y).item())
    return sum(losses) / len(losses)


def test_rpt_steps_on_synthetic_data_lower_the_adversarial_loss():
    data = make_synthetic(192, seed=0)
    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.method=rpt",
            "model.norm=bn",
            "model.precisions=4-8",
            "train.lr=0.05",
            "train.schedule=constant",
            "train.attack.steps=3",
        ],
    )
    model = model_from_config(cfg)
    train = effective_train_config(cfg)
    x_eval, y_eval = data.images[:96].float() / 255, data.labels[:96]
    before = _adv_loss_per_precision(model, x_eval, y_eval, (4, 8), seed=7)
    opt = build_optimizer(model, train)
    sampler = PathSampler(train.sampling, seed=0)
    losses, precisions = [], set()
    for epoch in range(4):
        for x, y in BatchIterator(data, 32, shuffle=True, seed=0, epoch=epoch):
            out = train_step(model, x, y, opt, train, sampler)
            losses.append(out.loss_sum.item() / out.n)
            precisions.add(precision_of(model))
    after = _adv_loss_per_precision(model, x_eval, y_eval, (4, 8), seed=7)
    assert len(precisions) >= 3  # RPT really trained at several precisions
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert after < before - 0.2, (before, after)


def test_protocols_run_on_an_rpt_model(gen):
    data = make_synthetic(64, seed=2)
    model = _rpt(precisions="4-16").eval()
    batches = BatchIterator(data, 32, shuffle=False, seed=0)
    sampler = PathSampler("uniform", seed=0)
    clean, n = evaluate_clean(model, batches, sampler)
    assert n == 64 and 0 <= clean <= 64

    seen, handle = _precision_spy(model)
    sampler = PathSampler("uniform", seed=1)
    rob, n = evaluate_pgd(model, batches, sampler, protocol="transfer", steps=2)
    assert n == 64 and 0 <= rob <= 64 and sampler.draws == 2 * 2  # attack + inference draw per batch
    # transfer: each batch's 2 attack forwards share one precision; inference draws afresh.
    assert seen[0] == seen[1] and seen[3] == seen[4]

    seen.clear()
    sampler = PathSampler("uniform", seed=2)
    rob_eot, n = evaluate_pgd(model, batches, sampler, protocol="eot", steps=2, eot_iter=3)
    handle.remove()
    assert n == 64 and 0 <= rob_eot <= 64
    assert sampler.draws == 2 * (1 + 2 * 3 + 1)  # every EOT forward draws a fresh precision
    assert len(set(seen)) >= 4  # so the attack averages over several precisions

    # reproducible from the seed: the same draws give the same count
    assert evaluate_pgd(model, batches, PathSampler("uniform", seed=1), protocol="transfer", steps=2) == (rob, 64)


def test_evaluation_package_runs_its_protocols_on_an_rpt_model():
    from rna_core.evaluation import evaluate_model, run_protocol

    data = make_synthetic(32, seed=3)
    model = _rpt(precisions="4-16").eval()
    x, y = data.images[:16].float() / 255, data.labels[:16]
    seen, handle = _precision_spy(model)
    out = run_protocol(model, x, y, "fgsm", "eot", seed=0, eot_iter=3)
    handle.remove()
    assert out.n == 16 and 0 <= out.correct <= 16
    assert precision_of(model, out.attack_path) in range(4, 17) and get_path(model) == out.score_path
    assert out.path_draws >= 1 + 3 + 1 and len(set(seen)) >= 2  # EOT averaged over several precisions
    assert (out.x_adv - x).abs().max() <= 8 / 255 + 1e-6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = evaluate_model(
        model, data, attacks=["fgsm"], protocols=["transfer", "eot"], batch_size=16, eot_iter=2, progress=False
    )
    again = evaluate_model(
        model, data, attacks=["fgsm"], protocols=["transfer", "eot"], batch_size=16, eot_iter=2, progress=False
    )
    assert {(r.attack, r.protocol) for r in rows} == {
        ("natural", "transfer"),
        ("natural", "eot"),
        ("fgsm", "transfer"),
        ("fgsm", "eot"),
    }
    assert all(r.method == "rpt(4-16)" and r.n == 32 for r in rows)  # the precision set names the row
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert not moved, f"evaluation changed BatchNorm statistics (a forward ran in train mode): {moved[:2]}"
    assert [r.correct for r in rows] == [r.correct for r in again]  # reproducible on the precision draws


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_quantized_layers_compute_in_float32_under_bf16_autocast(layer):
    """bf16 has 8 significant bits: 9-16-bit levels cast to it would all compute the same thing."""
    torch.manual_seed(0)
    if layer == "conv":
        q = QuantConv2d(4, 6, 3, padding=1, precisions=(12, 16))
        x = torch.rand(2, 4, 8, 8)
    else:
        q = QuantLinear(32, 5, precisions=(12, 16))
        x = torch.rand(3, 32)
    with torch.no_grad():
        q(x)  # train mode: measures the input range
    q.eval()
    outs = {}
    for choice in (0, 1):
        q.choice = choice
        ref = q(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = q(x.bfloat16() if layer == "conv" else x)
        assert out.dtype == torch.float32
        if layer == "conv":  # a bf16 input is exact in float32: the same levels, the same result
            ref = q(x.bfloat16().float())
        assert torch.equal(out, ref)
        outs[choice] = out
    assert not torch.equal(outs[0], outs[1])  # 12 and 16 bits still differ under autocast


def test_an_rpt_model_under_bf16_autocast_keeps_its_quantized_layers_in_float32():
    model = create_model("small_cnn", method="rpt", precisions="15,16")
    dtypes = []
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(torch.rand(4, 3, 32, 32))
    assert dtypes and set(dtypes) == {torch.float32}
    assert logits.dtype == torch.bfloat16  # the full-precision head still autocasts
