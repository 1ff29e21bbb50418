"""Models from outside rna_core through jobs/evaluate.py --model MODULE:FACTORY --weights FILE.

Fast: the factory, the weights files (torch.save read with weights_only=True, safetensors) and the
bad inputs (one line, exit 2, nothing started or written). Slow: a user's module from the current
folder fanned out on a local Ray, where a deterministic model scores the same under every protocol
and every R; and AutoAttack's own example model (in the pyautoattack wheel) on images of the exact first
100 CIFAR-10 test images, against torchattacks and pyautoattack called directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import low_contrast
from safetensors.torch import save_file

from pipelines import tracking
from pipelines.evaluation.source import code_origin, load_external_source, pack
from pipelines.evaluation.tasks import unpack
from rna_core.data import make_synthetic, read_parquet_dataset, write_parquet_dataset
from rna_core.errors import ConfigError
from rna_core.external import ExternalModel, read_weights

REPO = Path(__file__).resolve().parents[1]
# The offline CIFAR-10 copy lives beside the checkout (as tests/test_data.py finds it); CI machines
# may not have it. RNA_SHARED_CIFAR points elsewhere (e.g. from a worktree).
SHARED_CIFAR = Path(os.environ.get("RNA_SHARED_CIFAR") or REPO.parent / "shared" / "data" / "cifar10")
EXACT_100 = SHARED_CIFAR / "test_exact_first100.parquet"

USER_MODULE = '''
"""A user's models, written without rna_core."""
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * width, classes),
        )

    def forward(self, x):
        return self.body((x - 0.5) * 8)  # its own input normalisation: the job hands it images in [0, 1]


def build(width: int = 8, classes: int = 10) -> nn.Module:
    return Net(width, classes)


def not_a_module():
    return 3


def broken():
    raise RuntimeError("needs a GPU")
'''


def _write_user_module(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(USER_MODULE)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder holding a user's module (not installed), the current folder, with weights beside it."""
    name = f"user_nets_{abs(hash(str(tmp_path))) % 10**8}"
    _write_user_module(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved_path = list(sys.path)
    torch.manual_seed(0)
    spec = ExternalModel.parse(f"{name}:build")
    net = spec.build()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    yield {"root": tmp_path, "module": name, "spec": spec, "net": net.eval()}
    sys.path[:] = saved_path
    sys.modules.pop(name, None)


def test_weights_load_strictly_from_torch_save_and_safetensors(user_folder):
    root, spec, net = user_folder["root"], user_folder["spec"], user_folder["net"]
    x = torch.rand(4, 3, 32, 32)
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, root / "nested.pt")  # other tools' checkpoint dicts
    for name in ("net.pt", "net.safetensors", "nested.pt"):
        torch.manual_seed(123)  # a fresh build draws other weights: only the file can make the logits equal
        loaded = spec.load(root / name)
        assert not loaded.training and torch.equal(loaded(x), net(x)), name
    assert set(read_weights(root / "net.safetensors")) == set(net.state_dict())
    # Installed packages are found by workers of the same environment; a module of the current folder travels.
    assert code_origin(spec) == (root / f"{user_folder['module']}.py").resolve()
    assert code_origin(ExternalModel.parse("pyautoattack.examples.resnet:ResNet18")) is None
    args = ExternalModel.parse("m:f", ["width=16", "flag=true", "name=wide", "ratio=0.5"]).args
    assert args == {"width": 16, "flag": True, "name": "wide", "ratio": 0.5}


def test_a_users_package_travels_zipped_and_imports_where_it_is_not_on_disk(tmp_path, monkeypatch):
    """What a worker on another node does: the package exists only in the zip from the driver."""
    pkg = tmp_path / "home" / "defense_pkg_travels"
    _write_user_module(pkg / "nets", "wide")
    (pkg / "__init__.py").write_text("")
    (pkg / "nets" / "__init__.py").write_text("from .wide import build\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "stale.pyc").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path / "home"))
    spec = ExternalModel.parse("defense_pkg_travels.nets:build", ["width=4"])
    origin = code_origin(spec)
    assert origin == pkg.resolve()  # the top-level package folder, not only the submodule's file
    code = pack(origin)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in sys.modules if n.startswith("defense_pkg_travels")]:
        monkeypatch.delitem(sys.modules, name)
    sys.path.remove(str(tmp_path / "home"))
    pkg.rename(tmp_path / "elsewhere")  # gone from where the driver found it
    with pytest.raises(ConfigError, match="cannot import module 'defense_pkg_travels.nets'"):
        spec.build()
    folder = unpack(code)
    assert unpack(code) == folder and sys.path.count(folder) == 1  # once per process
    assert not (Path(folder) / "defense_pkg_travels" / "__pycache__").exists()
    assert isinstance(spec.build(), nn.Module)
    sys.path.remove(folder)
    for name in [n for n in sys.modules if n.startswith("defense_pkg_travels")]:
        del sys.modules[name]


def test_a_user_model_plans_as_an_external_source(user_folder):
    """Rows name the factory; a path strategy is refused (the model draws its own randomness)."""
    from pipelines.evaluation.plan import plan_evaluation

    root, module = user_folder["root"], user_folder["module"]
    test = low_contrast(make_synthetic(24, seed=0, split="test"))
    write_parquet_dataset(root / "data" / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    data = [f"data.data_dir={root / 'data'}", "eval.attacks=fgsm", "eval.protocols=transfer,eot"]
    source = load_external_source(f"{module}:build", "net.safetensors", ["width=8"], data)
    plan = plan_evaluation(source)
    assert plan.row_meta == {"model": f"{module}:build", "method": "external(width=8)", "dataset": "cifar10-test"}
    assert plan.options.strategy is None and plan.options.inference_draws == 10
    assert len(plan.units) == 2 * 2 and not plan.out_dir.exists()  # natural and fgsm, two protocols; nothing written
    with pytest.raises(ConfigError, match="--strategy draws paths of rna_core models"):
        plan_evaluation(load_external_source(f"{module}:build", "net.pt", [], [*data, "eval.strategy=uniform"]))


def test_bad_external_inputs_are_one_line_and_exit_2_before_ray_starts(user_folder, capsys):
    """In-process (the real process is in test_evaluate_pipeline's bad-input test): exit 2, one stderr
    line naming the problem, no Ray started, nothing written."""
    import ray

    sys.path.insert(0, str(REPO))
    from jobs.evaluate import main

    root, m = user_folder["root"], user_folder["module"]
    torch.save(user_folder["net"], root / "pickled_module.pt")  # a whole pickled Module: not weights_only
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    test = make_synthetic(8, seed=0, split="test")
    write_parquet_dataset(root / "data" / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    data = ["--set", f"data.data_dir={root / 'data'}"]
    before = sorted(p.name for p in root.iterdir())
    cases = [
        (["--model", f"{m}.build", "--weights", "net.pt"], "is not MODULE:FACTORY"),
        (["--model", "no_such_pkg.nets:build", "--weights", "net.pt"], "cannot import module 'no_such_pkg.nets'"),
        (
            ["--model", f"{m}:nope", "--weights", "net.pt"],
            f"module '{m}' has no callable 'nope'; it has: Net, broken, build",
        ),
        (["--model", f"{m}:not_a_module", "--weights", "net.pt"], "returned a int, not a torch.nn.Module"),
        (["--model", f"{m}:broken", "--weights", "net.pt"], "the factory raised RuntimeError: needs a GPU"),
        (["--model", f"{m}:build", "--weights", "net.pt", "--factory-arg", "depth=3"], "does not take these"),
        (["--model", f"{m}:build", "--weights", "net.pt", "--factory-arg", "width"], "is not NAME=VALUE"),
        (["--model", f"{m}:build"], "needs --weights FILE"),
        (["--model", f"{m}:build", "--weights", "absent.pt"], "absent.pt' does not exist"),
        (["--model", f"{m}:build", "--weights", "pickled_module.pt"], "cannot be read with torch.load(weights_only"),
        (["--model", f"{m}:build", "--weights", "broken.safetensors"], "is not a readable safetensors file"),
        (
            ["--model", f"{m}:build", "--weights", "net.pt", "--factory-arg", "width=16"],
            "body.0.weight has shape [8, 3, 3, 3], the model needs [16, 3, 3, 3]",
        ),
        (["--model", f"{m}:build", "--weights", "net.pt", "--strategy", "uniform", *data], "drop --strategy"),
        (["--checkpoint", "c.pt", "--weights", "net.pt"], "--weights and --factory-arg go with --model"),
        (["--model", f"{m}:build", "--weights", "net.pt", "--selected", "val"], "--selected picks a checkpoint"),
    ]
    for args, needle in cases:
        code = main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and needle in lines[0], (args, err)
        assert not ray.is_initialized()
    assert sorted(p.name for p in root.iterdir()) == before  # no eval_results, no mlflow.db


def test_a_model_with_the_wrong_number_of_classes_is_refused_on_the_driver(user_folder):
    from pipelines.evaluation.plan import plan_evaluation

    root, m = user_folder["root"], user_folder["module"]
    torch.save(ExternalModel.parse(f"{m}:build", ["classes=5"]).build().state_dict(), root / "five.pt")
    test = make_synthetic(8, seed=0, split="test")
    write_parquet_dataset(root / "data" / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    source = load_external_source(f"{m}:build", "five.pt", ["classes=5"], [f"data.data_dir={root / 'data'}"])
    with pytest.raises(ConfigError, match=r"its output is \(2, 5\), but scoring needs logits of shape \(2, 10\)"):
        plan_evaluation(source)


# ----------------------------------------------------------------------------- through Ray (slow)


def _trained_user_net(spec: ExternalModel, data, steps: int = 80) -> nn.Module:
    torch.manual_seed(0)
    net = spec.build()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data.images.float() / 255, data.labels.long()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.mark.slow  # starts Ray
def test_a_users_module_fans_out_and_a_deterministic_model_scores_the_same_under_every_protocol(user_folder, capsys):
    """The module lives in the current folder only (it travels to the workers zipped). A deterministic
    model is attacked and scored on one forward, so every protocol but early-stop gives the same
    number, and worst-of-10 and vote-of-10 equal it; the fan-out equals rna_core's sequential run."""
    sys.path.insert(0, str(REPO))
    from jobs.evaluate import main
    from rna_core.attacks import get_attack
    from rna_core.evaluation import evaluate_model, read_rows_parquet

    root, m, spec = user_folder["root"], user_folder["module"], user_folder["spec"]
    net = _trained_user_net(spec, low_contrast(make_synthetic(256, seed=0, split="train")))
    save_file(net.state_dict(), str(root / "trained.safetensors"))
    test = low_contrast(make_synthetic(48, seed=0, split="test"))
    write_parquet_dataset(root / "data" / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    protocols = ["transfer", "transfer-raw", "fixed-path", "eot", "early-stop"]
    code = main(
        [
            "--model",
            f"{m}:build",
            "--weights",
            "trained.safetensors",
            "--factory-arg",
            "width=8",
            "--attacks",
            "pgd20",
            "--attack-set",
            "pgd20.steps=3",
            "--protocols",
            ",".join(protocols),
            "--batch-size",
            "12",
            "--shard-size",
            "24",
            "--eot-iter",
            "2",
            "--set",
            f"data.data_dir={root / 'data'}",
            "--set",
            "ray.address=local",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"| {m}:build | external(width=8) |" in printed and "worst-of-10" in printed
    client = tracking.client_for(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics, params = run.data.metrics, run.data.params
    assert params["eval.model"] == f"{m}:build" and params["eval.inference_draws"] == "10"
    pgd = {p: metrics["acc_pgd20_steps3_" + ("eot_iter2_" if p == "eot" else "") + p] for p in protocols}
    natural = metrics["acc_natural_transfer"]
    assert pgd["transfer"] < natural - 0.2, "the attack must bite, or equal numbers prove nothing"
    for p in ("transfer-raw", "fixed-path", "eot"):
        assert pgd[p] == pgd["transfer"], (p, pgd)
    assert pgd["early-stop"] <= pgd["transfer"]  # it keeps each example's first success
    for name, value in metrics.items():
        if name.startswith("acc_") and not name.endswith("_std") and "_worst" not in name and "_vote" not in name:
            assert metrics[f"{name}_worst10"] == value == metrics[f"{name}_vote10"], name
    # the same numbers as the sequential, in-process evaluation of the same model and images
    rows = read_rows_parquet(Path(run.data.tags["rna.eval_dir"]) / "results.parquet")
    seq = evaluate_model(
        net,
        test,
        attacks=["natural", get_attack("pgd20", steps=3)],
        protocols=protocols,
        batch_size=12,
        eot_iter=2,
        strategy=None,
        progress=False,
    )
    key = lambda r: (r.attack, r.protocol)  # noqa: E731
    assert {key(r): (r.n, r.correct, r.correct_worst, r.correct_vote) for r in rows} == {
        key(r): (r.n, r.correct, r.correct_worst, r.correct_vote) for r in seq
    }


EPS, STEP = 0.75, 0.1875  # pixels/255: at 8/255 this standard model scores 0 under both attacks, which proves nothing


@pytest.mark.slow  # starts Ray; ResNet-18 under APGD-CE (100 iterations) twice: about 2 CPU-minutes
@pytest.mark.skipif(not EXACT_100.is_file(), reason=f"offline CIFAR-10 copy not present ({EXACT_100}; CI)")
def test_autoattacks_example_model_scores_as_the_libraries_called_directly(tmp_path, monkeypatch, capsys):
    """AutoAttack's example model (pyautoattack/examples: resnet.py and model_test.pt, a standard
    ResNet-18 on [0, 1] inputs) through `jobs/evaluate.py --model`, on a fixed 20 of the exact first
    100 CIFAR-10 test images, against torchattacks.PGD and pyautoattack.AutoAttack (APGD-CE alone)
    called directly on the same images with the same seeds. eps is 0.75/255, where the attacks fool
    some examples and not others, so equal accuracies say the same attack ran on the same points."""
    import pyautoattack
    import torchattacks
    from pyautoattack import AutoAttack

    sys.path.insert(0, str(REPO))
    from jobs.evaluate import main
    from rna_core.attacks.registry import draw_seed
    from rna_core.data import fixed_subset
    from rna_core.evaluation import attack_generator, batch_seed, trial_seed

    weights = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    (tmp_path / "data").mkdir()
    os.symlink(EXACT_100, tmp_path / "data" / "test.parquet")  # the job reads <data_dir>/test.parquet
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNA_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    limit, batch = 20, 10  # two shards per attack: both cores busy
    code = main(
        [
            "--model",
            "pyautoattack.examples.resnet:ResNet18",
            "--weights",
            str(weights),
            "--attacks",
            "pgd20,apgd_ce",
            "--attack-set",
            f"pgd20.eps={EPS}",
            "--attack-set",
            f"pgd20.step_size={STEP}",
            "--attack-set",
            f"apgd_ce.eps={EPS}",
            "--protocols",
            "transfer",
            "--limit",
            str(limit),
            "--batch-size",
            str(batch),
            "--shard-size",
            str(batch),
            "--set",
            f"data.data_dir={tmp_path / 'data'}",
            "--set",
            "ray.address=local",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics

    def ours(attack: str) -> str:
        """The one metric of `attack` under transfer (its name carries the non-default settings)."""
        (name,) = [k for k in metrics if k.startswith(f"acc_{attack}") and k.endswith("_transfer")]
        return name

    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    data = fixed_subset(read_parquet_dataset(str(EXACT_100)), limit)  # the rows --limit picks
    assert len(data) == limit and metrics["eval_images"] == limit
    right = {"natural": 0, "pgd20": 0, "apgd_ce": 0}
    eps, step = EPS / 255, STEP / 255
    for b in range(limit // batch):
        x = data.images[b * batch : (b + 1) * batch].float() / 255
        y = data.labels[b * batch : (b + 1) * batch].long()
        # The seed each attack of batch b gets (eval.seed 0, trial 0): the generator the protocols
        # hand the attack, and the library seed drawn from it (rna_core.attacks.registry.Attack).
        seed = draw_seed(attack_generator(batch_seed(trial_seed(0, 0), b)))
        with torch.no_grad():
            right["natural"] += int((model(x).argmax(1) == y).sum())
        torch.manual_seed(seed)
        x_pgd = torchattacks.PGD(model, eps=eps, alpha=step, steps=20, random_start=True)(x, y)
        apgd_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(seed)).item())
        aa = AutoAttack(model, attacks=["apgd-ce"], version="custom", eps=eps, norm="Linf", seed=apgd_seed)
        aa.apgd.n_restarts = 1  # as in AutoAttack's standard version
        x_apgd, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
        with torch.no_grad():
            right["pgd20"] += int((model(x_pgd).argmax(1) == y).sum())
            right["apgd_ce"] += int((model(x_apgd).argmax(1) == y).sum())
    direct = {k: v / limit for k, v in right.items()}
    assert direct["natural"] >= 0.85, direct  # a standard model: accurate
    assert all(0 < direct[a] < direct["natural"] for a in ("pgd20", "apgd_ce")), direct  # some fooled, not all
    for attack in ("natural", "pgd20", "apgd_ce"):
        name = ours(attack)
        assert metrics[name] == direct[attack], (name, metrics[name], direct)
        assert metrics[f"{name}_worst10"] == metrics[f"{name}_vote10"] == metrics[name]  # deterministic: R is moot
