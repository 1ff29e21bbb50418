import pytest
import torch

from rna_core import CheckpointMismatchError, ConfigError, create_model
from rna_core.checkpoint import checkpoint_config, load_checkpoint, read_checkpoint, save_checkpoint
from rna_core.config import Config, ModelConfig, TrainConfig
from rna_core.optim import build_optimizer, build_scheduler


def _setup(norm="bn,gns:1", name="small_cnn"):
    torch.manual_seed(0)
    model = create_model(name, norm=norm)
    cfg = Config(model=ModelConfig(name=name, norm=norm), train=TrainConfig(epochs=4))
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    return model, cfg, opt, sched


def test_round_trip_restores_everything(tmp_path):
    model, cfg, opt, sched = _setup()
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(3)
    path = save_checkpoint(
        tmp_path / "ck.pt", model, opt, sched, epoch=2, config=cfg, rng_state={"paths": gen.get_state()}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    model2, _, opt2, sched2 = _setup()
    payload = load_checkpoint(path, model2, opt2, sched2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == sched.last_epoch == 1
    assert payload["epoch"] == 2 and checkpoint_config(payload) == cfg
    restored = torch.Generator()
    restored.set_state(payload["rng_state"]["paths"])
    assert torch.equal(torch.rand(3, generator=restored), torch.rand(3, generator=gen))
    torch.load(path, weights_only=True)  # safe loading works on our files


@pytest.mark.parametrize("other", [dict(norm="bn,in"), dict(norm="bn"), dict(name="resnet18")])
def test_mismatching_model_is_refused(tmp_path, other):
    model, cfg, opt, sched = _setup()
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=1, config=cfg)
    wrong, *_ = _setup(**other)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, wrong)
    assert "does not match" in str(err.value) and "\n" not in str(err.value)
    assert "build the model the checkpoint was trained with" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_checkpoint(junk)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a checkpoint of this project"):
        read_checkpoint(tmp_path / "other.pt")


def _lrs_after(cfg: TrainConfig, model, optimizer, scheduler, epochs: int) -> list[float]:
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("change", ["none", "epochs", "lr"])
def test_a_resumed_run_follows_the_new_config_not_the_saved_optimizer(tmp_path, change):
    """`--resume --set train.lr=0.05` used to keep lr 0.1, and `--set train.epochs=8` after a
    4-epoch run ran its first resumed epoch at the old schedule's last lr (10x too low)."""
    from rna_core.optim import apply_config_on_resume, lr_factor

    old = TrainConfig(epochs=4, lr=0.1)
    new = {"none": old, "epochs": TrainConfig(epochs=8, lr=0.1), "lr": TrainConfig(epochs=4, lr=0.05, momentum=0.5)}[
        change
    ]
    model = create_model("small_cnn", norm="bn")
    opt = build_optimizer(model, old)
    sched = build_scheduler(opt, old)
    _lrs_after(old, model, opt, sched, 2)
    save_checkpoint(tmp_path / "c.pt", model, opt, sched, epoch=2, config=Config(train=old))

    resumed = create_model("small_cnn", norm="bn")
    opt2 = build_optimizer(resumed, new)
    sched2 = build_scheduler(opt2, new)
    load_checkpoint(tmp_path / "c.pt", resumed, opt2, sched2)
    apply_config_on_resume(opt2, sched2, new, 2)
    got = _lrs_after(new, resumed, opt2, sched2, new.epochs - 2)
    want = [new.lr * lr_factor(new, e) for e in range(2, new.epochs)]
    assert got == pytest.approx(want, rel=1e-12)
    assert opt2.param_groups[0]["momentum"] == new.momentum
    if change == "none":  # an unchanged resume is exactly the uninterrupted schedule
        assert got == [0.1 * lr_factor(old, e) for e in range(2, 4)]


# Identities exactly as the code before issue 13 wrote them (recorded from commit ad3741b), for
# models whose layers changed: the WRN/PreAct final norm became plain BatchNorm, the PreAct
# projection shortcut reads the raw block input, `in` became nn.InstanceNorm2d, `bgn`/`bgns` took
# the official numerics. Each must be refused by name, before any weight is copied.
OLD_IDENTITIES_OF_CHANGED_MODELS = [
    (
        {"model": "wrn16_2", "num_classes": 10, "method": "rna", "norm": "bn,gns:1"},
        "final_norm: checkpoint None vs model 'bn'",
    ),
    (
        {"model": "wrn16_2", "num_classes": 10, "method": "rna", "norm": "gn:8"},
        "final_norm: checkpoint None vs model 'bn'",
    ),
    (
        {"model": "preact_resnet18", "num_classes": 10, "method": "rna", "norm": "bn,gns:1"},
        "shortcut: checkpoint None vs model 'block_input'",
    ),
    (
        {
            "model": "preact_resnet18",
            "num_classes": 10,
            "method": "rpt",
            "norm": "bn",
            "precisions": "4,8",
            "quantizer": "dwq",
        },
        "shortcut: checkpoint None vs model 'block_input'",
    ),
    (
        {"model": "small_cnn", "num_classes": 10, "method": "rna", "norm": "bn,in"},
        "norm_versions: checkpoint None vs model 'in=2'",
    ),
    (
        {"model": "small_cnn", "num_classes": 10, "method": "rna", "norm": "bn,bgn:8"},
        "norm_versions: checkpoint None vs model 'bgn=2'",
    ),
    (
        {"model": "small_cnn", "num_classes": 10, "method": "rna", "norm": "bgns:4"},
        "norm_versions: checkpoint None vs model 'bgns=2'",
    ),
]
# Models that did not change keep their identity: their checkpoints still load.
OLD_IDENTITIES_OF_UNCHANGED_MODELS = [
    {"model": "small_cnn", "num_classes": 10, "method": "rna", "norm": "bn,gns:1"},
    {"model": "resnet18", "num_classes": 10, "method": "rna", "norm": "bn,gns:1"},
    {"model": "wrn16_2", "num_classes": 10, "method": "rpt", "norm": "bn", "precisions": "4,8", "quantizer": "dwq"},
]


def _model_for(identity):
    options = {"precisions": identity["precisions"]} if identity["method"] == "rpt" else {}
    torch.manual_seed(0)
    return create_model(
        identity["model"],
        num_classes=identity["num_classes"],
        norm=identity["norm"],
        method=identity["method"],
        **options,
    )


def _with_identity(tmp_path, model, identity):
    path = save_checkpoint(tmp_path / "new.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["identity"] = identity
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    return old


@pytest.mark.parametrize(
    "identity, needle", OLD_IDENTITIES_OF_CHANGED_MODELS, ids=lambda v: v["norm"] if isinstance(v, dict) else None
)
def test_checkpoints_of_changed_models_are_refused_by_name(tmp_path, identity, needle):
    written = _model_for(identity)
    old = _with_identity(tmp_path, written, identity)
    target = _model_for(identity)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(old, target)
    msg = str(err.value)
    assert (
        needle in msg
        and "\n" not in msg
        and msg.endswith(
            "written before this code changed the model, so its weights do not fit today's layers; retrain it"
        )
    ), msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("identity", OLD_IDENTITIES_OF_UNCHANGED_MODELS, ids=lambda v: f"{v['model']}-{v['method']}")
def test_checkpoints_of_unchanged_models_still_load(tmp_path, identity):
    written = _model_for(identity)
    assert written.rna_spec == identity
    old = _with_identity(tmp_path, written, identity)
    target = _model_for(identity)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    load_checkpoint(old, target)
    assert all(torch.equal(a, b) for a, b in zip(written.state_dict().values(), target.state_dict().values()))
