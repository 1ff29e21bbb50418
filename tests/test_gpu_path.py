"""The GPU path, checked on a CPU-only machine (issue 18).

Ray accepts logical GPUs (`ray.init(num_gpus=2)` declares them without hardware), so the
cluster-facing decisions (how many GPUs a job needs, what `auto` picks, which GPU a reused
worker's task runs on) run against a real Ray here; what needs CUDA itself is covered by pure
functions and small fakes, and by `bench/gpu.sh` on a lent GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cluster import GpuCapacity, choose_training_device
from pipelines.preflight import check_gpu_request
from rna_core.config import load_config
from rna_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(None, ["model.name=small_cnn", "data.dataset=synthetic", *overrides])


# ----------------------------------------------------------------------------- items 1-3: GPUs a job asks for


def test_true_with_fewer_gpus_than_workers_is_refused_in_one_line():
    cfg = _cfg("ray.use_gpu=true", "ray.num_workers=2", "ray.gpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"needs 2 GPU\(s\) but the cluster has 1 GPU\(s\) up; lower ray.num_workers"):
        choose_training_device(cfg, GpuCapacity(now=1.0))
    assert choose_training_device(cfg, GpuCapacity(now=2.0)).backend == "nccl"


def test_auto_falls_back_to_cpu_and_says_why_when_gpus_are_too_few():
    cfg = _cfg("ray.use_gpu=auto", "ray.num_workers=2", "ray.gpus_per_worker=1")
    one = choose_training_device(cfg, GpuCapacity(now=1.0))
    assert not one.use_gpu and one.backend == "gloo"
    assert "need 2 but the cluster has 1 GPU(s) up, so training runs on CPU" in one.reason
    assert "backend gloo" in one.line(cfg) and "on cpu" in one.line(cfg)
    none = choose_training_device(cfg, GpuCapacity(now=0.0))
    assert not none.use_gpu and "no GPU" in none.reason
    assert choose_training_device(cfg, GpuCapacity(now=2.0)).use_gpu
    assert not choose_training_device(_cfg("ray.use_gpu=false"), GpuCapacity(now=8.0)).use_gpu


def test_auto_counts_the_gpus_an_autoscaling_cluster_can_scale_to():
    """`min_workers: 0` GPU nodes are not up when the job starts: auto must not train on CPU then."""
    cfg = _cfg("ray.use_gpu=auto", "ray.num_workers=2", "ray.gpus_per_worker=1")
    choice = choose_training_device(cfg, GpuCapacity(now=0.0, scalable=4.0))
    assert choice.use_gpu and "can scale to 4" in choice.reason and "wait for them" in choice.reason
    assert choice.params() == {
        "resolved.ray.use_gpu": "true",
        "resolved.ray.backend": "nccl",
        "resolved.ray.device_reason": choice.reason,
    }
    assert not choose_training_device(cfg, GpuCapacity(now=0.0, scalable=1.0)).use_gpu
    with pytest.raises(ConfigError, match="can scale to 1"):
        choose_training_device(_cfg("ray.use_gpu=true", "ray.num_workers=2"), GpuCapacity(now=0.0, scalable=1.0))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["ray.use_gpu=true", "ray.gpus_per_worker=0"], "ray.gpus_per_worker is 0 but ray.use_gpu is true"),
        (["ray.use_gpu=auto", "ray.gpus_per_worker=0"], "ray.gpus_per_worker is 0 but ray.use_gpu is auto"),
        (["ray.num_workers=2", "ray.gpus_per_worker=0.5"], "two NCCL ranks on one GPU"),
        (["ray.gpus_per_worker=1.5"], "whole GPUs only"),
    ],
)
def test_gpu_settings_ray_would_reject_late_are_refused_in_preflight(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        check_gpu_request(_cfg(*overrides))


def test_gpu_settings_that_work_pass_preflight():
    check_gpu_request(_cfg("ray.num_workers=1", "ray.gpus_per_worker=0.5"))  # one worker may share a GPU
    check_gpu_request(_cfg("ray.num_workers=4", "ray.gpus_per_worker=2"))
    check_gpu_request(_cfg("ray.use_gpu=false", "ray.num_workers=2", "ray.gpus_per_worker=0"))


@pytest.mark.parametrize("preset", ["paper_resnet18_cifar10", "paper_wrn34_10_cifar100", "compare_rpt_preact_resnet18"])
def test_paper_presets_ask_for_gpus_explicitly(preset):
    assert load_config(str(REPO / "configs" / f"{preset}.yaml")).ray.use_gpu == "true"


# ----------------------------------------------------------------------------- against a Ray with logical GPUs


@pytest.fixture(scope="module")
def two_gpu_ray(tmp_path_factory):
    """A private local Ray declaring 2 GPUs (logical: no hardware) and a SQLite MLflow store."""
    import ray

    root = tmp_path_factory.mktemp("gpu_path")
    mp_ = pytest.MonkeyPatch()
    mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp_.setenv("RNA_BASE_DIR", str(root))
    mp_.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield root
    ray.shutdown()
    mp_.undo()


@pytest.mark.slow
def test_a_job_asking_for_more_gpus_than_the_cluster_has_stops_before_its_run_opens(two_gpu_ray, capsys):
    """Ray 2.60 on a local cluster would retry the worker start forever (the hang of issue 18)."""
    import mlflow

    from pipelines.cluster import gpu_capacity
    from pipelines.train import run_training

    assert gpu_capacity() == GpuCapacity(now=2.0, scalable=None)  # a local cluster: no autoscaler limit
    storage = two_gpu_ray / "ray_results"
    cfg = _cfg("ray.use_gpu=true", "ray.num_workers=3", f"ray.storage_path={storage}", "mlflow.run_name=too-many")
    with pytest.raises(ConfigError, match=r"needs 3 GPU\(s\) but the cluster has 2 GPU\(s\) up"):
        run_training(cfg)
    assert not storage.exists()  # no run folder, no rna_job.json
    client = mlflow.MlflowClient(f"sqlite:///{two_gpu_ray}/mlflow.db")
    assert client.get_experiment_by_name(cfg.mlflow.experiment) is None  # no MLflow run
    auto = choose_training_device(_cfg("ray.num_workers=3"), gpu_capacity())
    assert not auto.use_gpu and "need 3 but the cluster has 2" in auto.reason
    assert choose_training_device(_cfg("ray.num_workers=2"), gpu_capacity()).backend == "nccl"
