"""MLflow as users meet it: experiment kind, logged and registered models, model URIs, dataset
inputs, system metrics. A real SQLite MLflow store, no Ray: the training job's own functions
(pipelines.logged_model, pipelines.data_inputs, pipelines.system_metrics) are called on a small
model and a generated Parquet dataset. The same functions inside a real training run are checked
by the slow tests of test_train_pipeline.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pipelines import tracking
from pipelines.data_inputs import evaluation_input, log_inputs, training_inputs
from pipelines.evaluation.plan import plan_evaluation
from pipelines.logged_model import log_trained_model
from pipelines.model_uri import find_logged_model, load_uri_source
from pipelines.system_metrics import start_monitor, stop_monitor
from rna_core.builders import model_from_config as build_model
from rna_core.checkpoint import read_checkpoint, save_checkpoint
from rna_core.config import EvalConfig, load_config
from rna_core.data import held_out_rows, make_synthetic, write_parquet_dataset
from rna_core.data.subsets import training_splits
from rna_core.distributed import state_digest
from rna_core.errors import ConfigError
from rna_core.inference import FreshPathModel
from rna_core.paths import get_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store, a Parquet dataset, a small_cnn over bn,gns:1 (16 paths) and a training run."""
    root = tmp_path_factory.mktemp("mlflow-models")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("RNA_BASE_DIR", str(root))
    mp.setenv("MLFLOW_EXPERIMENT_ID", "0")  # must redirect nothing
    data_dir = root / "data"
    for split, n in (("train", 96), ("test", 64)):
        ds = make_synthetic(n, seed=1, split=split)
        write_parquet_dataset(data_dir / f"{split}.parquet", ds.images, ds.labels, ds.classes, "cifar10")
    cfg = load_config(
        None,
        [
            "model.name=small_cnn",
            "model.norm=bn,gns:1",
            "data.dataset=cifar10",
            f"data.data_dir={data_dir}",
            "data.eval_limit=32",
            "mlflow.experiment=models-test",
            "mlflow.registered_model=rna-small",
            "mlflow.model_alias=champion",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    payload = read_checkpoint(save_checkpoint(root / "ckpt" / "checkpoint.pt", model, epoch=3, config=cfg))
    client = tracking.client_for(uri)
    exp_id = tracking.get_or_create_experiment(client, "models-test", tracking.artifact_root_for(uri))
    run_id = tracking.start_run(client, exp_id, "train", {"model.name": "small_cnn"}, {})
    ref = tracking.RunRef(uri, exp_id, run_id)
    example = held_out_rows(cfg.data, 2).images.float().div(255).numpy()
    logged = log_trained_model(
        client,
        ref,
        cfg,
        payload,
        which=None,
        metrics={"acc_natural_transfer": 0.25},
        input_example=example,
        step=3,
        register_as=cfg.mlflow.registered_model,
        alias=cfg.mlflow.model_alias,
    )
    tracking.end_run(client, run_id)
    yield {"root": root, "uri": uri, "client": client, "cfg": cfg, "payload": payload, "ref": ref, "logged": logged}
    mp.undo()


def test_every_experiment_a_job_uses_is_marked_as_model_training(store):
    client, root = store["client"], store["root"]
    exp = client.get_experiment_by_name("models-test")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-elsewhere", artifact_location=(root / "x").as_uri())  # untagged
    chosen = client.create_experiment(
        "chosen-kind", artifact_location=(root / "y").as_uri(), tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert tracking.get_or_create_experiment(client, "made-elsewhere", None) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracking.get_or_create_experiment(client, "chosen-kind", None)
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice


def test_fresh_path_model_draws_a_path_per_forward_reproducibly():
    cfg = load_config(None, ["model.name=small_cnn", "model.norm=bn,gns:1"])
    torch.manual_seed(0)
    net = FreshPathModel(build_model(cfg).eval(), strategy="uniform", seed=5)
    x = torch.rand(4, 3, 32, 32)
    paths = []
    for _ in range(6):
        net(x)
        paths.append(str(get_path(net.model)))
    assert len(set(paths)) > 1 and net.draws == 6  # 16 paths: six draws are not all one path
    net.reseed(5)
    again = []
    for _ in range(6):
        net(x)
        again.append(str(get_path(net.model)))
    assert again == paths
    shared = FreshPathModel(build_model(cfg).eval(), strategy="shared", seed=0)
    for _ in range(4):
        shared(x)
        assert len(set(str(get_path(shared.model)))) == 1  # one candidate for the whole network
    assert "fresh path" in net.describe() and "16 paths" in net.describe()


def test_logged_model_loads_by_every_uri_and_draws_a_fresh_path_per_forward(store):
    import mlflow.pytorch
    from mlflow.models import Model

    client, logged = store["client"], store["logged"]
    assert logged.alias_uri == "models:/rna-small@champion" and logged.registered == "models:/rna-small/1"
    uris = [logged.alias_uri, logged.registered, logged.run_uri, logged.uri, "models:/rna-small/latest"]
    assert {find_logged_model(client, u)[0].model_id for u in uris} == {logged.model_id}

    info = Model.load(logged.alias_uri)
    shape = info.signature.inputs.to_dict()[0]["tensor-spec"]
    assert shape["dtype"] == "float32" and list(shape["shape"]) == [-1, 3, 32, 32]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    assert info.saved_input_example_info is not None and info.metadata["rna"]["epoch"] == 3

    net = mlflow.pytorch.load_model(logged.alias_uri)
    assert isinstance(net, FreshPathModel) and net.num_paths == 16 and net.draws == 0
    assert state_digest(net.model.state_dict()) == state_digest(store["payload"]["model"])
    x = torch.from_numpy(np.ascontiguousarray(held_out_rows(store["cfg"].data, 8).images.float().div(255).numpy()))
    paths = set()
    with torch.no_grad():
        for _ in range(6):
            net(x)
            paths.add(str(get_path(net.model)))
    assert len(paths) > 1

    model = client.get_logged_model(logged.model_id)
    version = client.get_model_version_by_alias("rna-small", "champion")
    for text in (model.tags["mlflow.note.content"], version.description):
        assert "fresh path" in text and "jobs/evaluate.py --model-uri" in text
    assert {m.key: m.value for m in model.metrics} == {"acc_natural_transfer": 0.25}


def test_model_uri_source_is_the_checkpoint_nested_under_its_training_run(store):
    logged, ref = store["logged"], store["ref"]
    for uri in (logged.alias_uri, logged.run_uri):
        source = load_uri_source(uri, ["eval.attacks=fgsm"])
        assert source.kind == "model" and source.description == uri
        assert (source.parent_run_id, source.parent_experiment_id) == (ref.run_id, ref.experiment_id)
        assert source.weights_digest == state_digest(store["payload"]["model"]) and source.selection is None
    plan = plan_evaluation(source, EvalConfig(attacks=("fgsm",), limit=32, out_dir=str(store["root"] / "eval-uri")))
    assert len(plan.dataset) == 32 and [a.name for a in plan.attacks] == ["natural", "fgsm"]


@pytest.mark.parametrize(
    "uri, needle",
    [
        ("models:/rna-small@nope", "MLflow model 'models:/rna-small@nope' not found"),
        ("models:/no-such-model/1", "MLflow model 'models:/no-such-model/1' not found"),
        ("runs:/0123456789abcdef/model", "not found"),
        ("runs:/{run}/model_selected_val", "logged no model named 'model_selected_val'"),
        ("runs:/{run}", "is not runs:/<run id>/<model name>"),
        ("s3://bucket/model", "is not an MLflow model URI"),
    ],
)
def test_a_bad_model_uri_is_one_line(store, uri, needle):
    with pytest.raises(ConfigError) as info:
        load_uri_source(uri.format(run=store["ref"].run_id))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_dataset_inputs_name_source_digest_rows_split_and_subset(store):
    from dataclasses import replace

    cfg, client = store["cfg"], store["client"]
    train_rows, val_rows = training_splits(replace(cfg, data=replace(cfg.data, val_size=16)))[:2]
    held = held_out_rows(cfg.data, 32)
    vcfg = replace(cfg, data=replace(cfg.data, val_size=16))
    inputs = training_inputs(vcfg, train_rows, val_rows, held)
    assert [i.context for i in inputs] == ["training", "validation", "evaluation"]
    by = {i.context: i for i in inputs}
    assert by["training"].profile["rows"] == 80 and by["validation"].profile["rows"] == 16
    assert by["evaluation"].profile["rows"] == 32 and by["evaluation"].profile["file_rows"] == 64
    assert by["evaluation"].profile["split"] == "test" and "32 of 64 rows" in by["evaluation"].profile["subset"]
    assert by["training"].source["uri"].endswith("/data/train.parquet")
    assert len({i.digest for i in inputs}) == 3  # different rows, different digests
    assert by["training"].profile["file_digest"] == by["validation"].profile["file_digest"]  # one file
    # The evaluation job's input for the same --limit is the same dataset; another limit is another.
    assert evaluation_input(cfg, held, 32).digest == by["evaluation"].digest
    assert evaluation_input(cfg, held_out_rows(cfg.data, 48), 48).digest != by["evaluation"].digest

    run_id = tracking.start_run(client, store["ref"].experiment_id, "inputs", {}, {})
    log_inputs(client, run_id, inputs)
    log_inputs(client, run_id, inputs)  # again (a resumed run): nothing changes
    got = client.get_run(run_id).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in got) == ["cifar10-test", "cifar10-train", "cifar10-val"]
    train = next(d for d in got if d.dataset.name == "cifar10-train")
    assert json.loads(train.dataset.profile)["rows"] == 80 and train.dataset.digest == by["training"].digest
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    tracking.end_run(client, run_id)


def test_system_metrics_are_sampled_into_the_run_and_can_be_turned_off(store):
    from dataclasses import replace

    cfg, client = store["cfg"], store["client"]
    run_id = tracking.start_run(client, store["ref"].experiment_id, "sysmetrics", {}, {})
    ref = tracking.RunRef(store["uri"], store["ref"].experiment_id, run_id)
    off = replace(cfg, mlflow=replace(cfg.mlflow, system_metrics=False))
    assert start_monitor(off, ref, 0, 0) is None and start_monitor(cfg, ref, 0, 1) is None  # off; not local rank 0
    fast = replace(cfg, mlflow=replace(cfg.mlflow, system_metrics_interval=0.2))
    monitor = start_monitor(fast, ref, 0, 0)
    time.sleep(1.5)
    stop_monitor(monitor)
    metrics = client.get_run(run_id).data.metrics
    assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0 * torch.get_num_threads() * 64
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert len(client.get_metric_history(run_id, "system/system_memory_usage_megabytes")) >= 2
    node = start_monitor(fast, ref, 1, 0)  # the second node's first worker: its own names
    time.sleep(0.6)
    stop_monitor(node)
    assert any(k.startswith("system/node1/") for k in client.get_run(run_id).data.metrics)
    tracking.end_run(client, run_id)


def test_a_run_shorter_than_one_sampling_interval_still_gets_one_system_sample(store):
    """A fast run (or a resumed attempt) ends before the monitor's first interval: one sample at the end."""
    from dataclasses import replace

    cfg, client = store["cfg"], store["client"]
    run_id = tracking.start_run(client, store["ref"].experiment_id, "short", {}, {})
    ref = tracking.RunRef(store["uri"], store["ref"].experiment_id, run_id)
    slow = replace(cfg, mlflow=replace(cfg.mlflow, system_metrics_interval=60.0))
    stop_monitor(start_monitor(slow, ref, 0, 0))  # stopped long before its first 60 s sample
    history = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(history) == 1 and history[0].value > 0
    tracking.end_run(client, run_id)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("mlflow.model_alias=latest", "reserves 'latest'"),
        ("mlflow.model_alias=v3", "reserves 'latest' and 'v<number>'"),
        ("mlflow.model_alias=a b", "is not usable"),
        ("mlflow.registered_model=a/b", "without '/'"),
        ("mlflow.system_metrics_interval=0", "must be > 0 seconds"),
    ],
)
def test_bad_mlflow_settings_fail_before_training(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_config_turns_system_metrics_off_from_the_command_line():
    assert load_config(None, ["mlflow.system_metrics=false"]).mlflow.system_metrics is False
    assert load_config(None, []).mlflow.registered_model is None


def test_cli_model_uri_errors_are_one_line_and_exit_2(store, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.evaluate import main

    for argv, needle in (
        (["--model-uri", "models:/rna-small@nope"], "MLflow model 'models:/rna-small@nope' not found"),
        (["--model-uri", store["logged"].run_uri, "--selected", "val"], "--selected goes with --run-id"),
        (["--model-uri", "models:/x@y", "--run-id", "abc"], "not allowed with argument"),
    ):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)
