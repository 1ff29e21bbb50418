from pathlib import Path

import pytest
import yaml

from rna_core import ConfigError
from rna_core.config import Config, flatten, load_config, to_dict, unflatten

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = Config().validate()
    assert cfg.model.name == "resnet18" and cfg.model.norm == "bn,gns:1"
    t = cfg.train
    assert (t.epochs, t.lr, t.momentum, t.weight_decay, t.mode) == (200, 0.1, 0.9, 5e-4, "blackbox")
    assert (t.attack.eps, t.attack.step_size, t.attack.steps) == (8.0, 2.0, 10)
    assert t.milestones == (0.5, 0.75) and cfg.data.batch_size == 128


def test_flatten_round_trip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump(
            {"model": {"name": "small_cnn", "norm": "bn,in"}, "train": {"epochs": 3, "attack": {"steps": 2}}}
        )
    )
    cfg = load_config(
        str(p), ["train.lr=0.05", "train.milestones=[0.3,0.6]", "data.data_dir=null", "train.sampling=far:0.5"]
    )
    assert cfg.model.name == "small_cnn" and cfg.train.epochs == 3 and cfg.train.attack.steps == 2
    assert cfg.train.lr == 0.05 and cfg.train.milestones == (0.3, 0.6) and cfg.train.sampling == "far:0.5"
    flat = flatten(cfg)
    assert flat["train.attack.steps"] == 2 and flat["train.milestones"] == "0.3,0.6"
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in flat.values())
    assert unflatten(flat) == cfg
    # values as strings (how MLflow hands params back) also rebuild the same config
    assert unflatten({k: ("None" if v is None else str(v)) for k, v in flat.items()}) == cfg
    assert load_config(None) == Config()
    assert to_dict(cfg)["train"]["milestones"] == [0.3, 0.6]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train.epochs=abc", "train.epochs"),
        ("train.mode=sometimes", "train.mode"),
        ("model.norm=gn:0", "gn:0"),
        ("train.sampling=far:2", "far"),
        ("data.dataset=mnist", "data.dataset"),
        ("model.name=vgg", "model.name"),
        ("ray.num_workers=0", "ray.num_workers"),
        ("trainlr", "key=value"),
        ("train.lr=nan", "expects a finite number"),  # nan passes every < check; it trained nothing
        ("train.attack.eps=.inf", "expects a finite number"),
        ("train.momentum=-1", "train.momentum"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.gamma=0", "train.gamma"),
        ("train.eval_pgd_steps=-1", "train.eval_pgd_steps"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
        ("ray.gpus_per_worker=-1", "ray.gpus_per_worker"),
        ("mlflow.experiment=", "needs a value"),  # used to become the experiment 'None'
        ("model.norm=", "needs a value"),
        ("mlflow.run_name=a/b", "plain folder name"),
        ("mlflow.run_name=../../escape", "plain folder name"),
        ("train.sampling=fixed:01-1", "cannot read path"),
    ],
)
def test_bad_values_give_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_every_preset_loads():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets, "configs/ should hold presets"
    for preset in presets:
        data = yaml.safe_load(preset.read_text())
        if isinstance(data, dict) and "sweep" in data:
            continue  # sweep presets have their own loader
        load_config(str(preset))


def test_a_file_that_is_not_a_mapping_and_an_empty_spec_are_one_line_config_errors(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    for path in ("/etc/passwd", str(listed)):
        with pytest.raises(ConfigError, match=f"config file '{path}' does not hold a config") as info:
            load_config(path)
        assert "\n" not in str(info.value)
    for space in ("bn,,in", "bn,in,", ",bn"):
        with pytest.raises(ConfigError, match="has an empty spec between commas"):
            load_config(None, [f"model.norm={space}"])
    assert load_config(None, ["model.norm=bn, in"]).model.norm == "bn, in"  # spaces around specs are fine
