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


# ----------------------------------------------------------------------------- item 7: GPU tasks of the fan-out


def test_cuda_index_maps_rays_gpu_id_to_torchs_index_in_the_worker():
    from pipelines.evaluation.tasks import cuda_index

    assert cuda_index(["1"], None) == 1 and cuda_index([0], "") == 0
    assert cuda_index(["3"], "2,3") == 1  # a node started with CUDA_VISIBLE_DEVICES=2,3
    assert cuda_index(["GPU-b"], "GPU-a, GPU-b") == 1
    with pytest.raises(RuntimeError, match="assigned GPU 0 but this worker sees only CUDA_VISIBLE_DEVICES=1"):
        cuda_index(["0"], "1")


class FakeCuda:
    """Records the allocator calls a unit's end makes (there is no CUDA here)."""

    def __init__(self, monkeypatch, initialized: bool = True):
        import torch

        self.calls: list = []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.calls.append(("sync", device)))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append(("empty_cache",)))
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)


def test_a_unit_gives_its_gpu_memory_back_and_cpu_units_touch_no_cuda(monkeypatch):
    import torch

    from pipelines.evaluation.tasks import release_device_memory

    fake = FakeCuda(monkeypatch)
    release_device_memory(torch.device("cpu"))
    assert fake.calls == []
    release_device_memory(torch.device("cuda", 1))
    assert fake.calls == [("sync", torch.device("cuda", 1)), ("empty_cache",)]


@pytest.mark.slow
def test_gpu_tasks_keep_every_gpu_visible_and_pick_theirs_by_id(two_gpu_ray, monkeypatch):
    """Ray reuses the worker processes of tasks whose num_gpus came through `.options()`; with
    Ray setting CUDA_VISIBLE_DEVICES per task, a reused worker's CUDA would stay on its first GPU."""
    import ray

    from pipelines.evaluation.fanout import _task_resources
    from pipelines.evaluation.tasks import _cached
    from rna_core.config import EvalConfig

    def _probe_gpu() -> tuple:  # defined here: Ray pickles it by value
        import os

        import ray

        from pipelines.evaluation.tasks import cuda_index

        ids = [str(g) for g in ray.get_gpu_ids()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return os.getpid(), ids, visible, cuda_index(ids, visible)

    resources = _task_resources(EvalConfig(gpus_per_task=0.5, cpus_per_task=1.0), use_gpu=True, gpus=0.5)
    assert resources["num_gpus"] == 0.5
    ours = ray.get([ray.remote(_probe_gpu).options(**resources).remote() for _ in range(4)])
    plain = {k: v for k, v in resources.items() if k != "runtime_env"}
    ray_default = ray.get([ray.remote(_probe_gpu).options(**plain).remote() for _ in range(4)])
    # What Ray does without our switch: the variable names the task's GPU, and workers are reused
    # (fewer processes than tasks), so a worker's CUDA, initialised once, would miss later GPUs.
    assert all(visible == ",".join(ids) for _, ids, visible, _ in ray_default)
    assert len({pid for pid, *_ in ray_default}) < len(ray_default)
    # Ours: every GPU stays visible and each task's device index is the GPU Ray assigned it.
    assert all(visible is None and len(ids) == 1 and index == int(ids[0]) for _, ids, visible, index in ours)
    assert {ids[0] for _, ids, _, _ in ours} <= {"0", "1"}

    fake = FakeCuda(monkeypatch)  # the driver stands in for a worker: the cache keyed by device
    box = [ray.put({"w": 1})]
    first = _cached("model", "weights@cuda:0", box, lambda p: ("on cuda:0", p))
    assert _cached("model", "weights@cuda:0", box, lambda p: pytest.fail("rebuilt")) is first
    assert fake.calls == []
    assert _cached("model", "weights@cuda:1", box, lambda p: ("on cuda:1", p))[0] == "on cuda:1"
    assert fake.calls == [("empty_cache",)]  # the model on the old GPU freed before the new one is built


@pytest.mark.slow
def test_a_fan_out_on_gpu_tasks_equals_the_sequential_evaluation(two_gpu_ray):
    """Units asking for 0.25 GPU each on logical GPUs (sized from the model: a small_cnn task takes a
    few MiB, so the most tasks per GPU, 4): the same counts as in-process."""
    import torch

    from pipelines.evaluation.job import run_evaluation
    from pipelines.evaluation.plan import plan_evaluation
    from pipelines.evaluation.source import load_source
    from rna_core.attacks import get_attack
    from rna_core.builders import model_from_config
    from rna_core.checkpoint import save_checkpoint
    from rna_core.config import EvalConfig
    from rna_core.data import make_synthetic, write_parquet_dataset
    from rna_core.evaluation import evaluate_model

    root = two_gpu_ray
    test = make_synthetic(32, seed=0, split="test")
    write_parquet_dataset(root / "data" / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    cfg = load_config(None, ["model.name=small_cnn", "data.dataset=cifar10", f"data.data_dir={root / 'data'}"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    ckpt = save_checkpoint(root / "ckpt" / "checkpoint.pt", model, epoch=0, config=cfg)
    options = dict(attacks=("fgsm",), protocols=("transfer",), trials=1, batch_size=16, shard_size=16, seed=5)
    plan = plan_evaluation(load_source(checkpoint=str(ckpt)), EvalConfig(**options, out_dir=str(root / "eval")))
    lines: list[str] = []
    out = run_evaluation(plan, echo=lines.append)
    assert any("+ 0.25 GPU (sized: ~0.6 GiB a task at batch 16, 4 per 22.5 GiB GPU) each" in line for line in lines)
    sequential = evaluate_model(
        model.eval(), plan.dataset, attacks=[get_attack("fgsm")], protocols=("transfer",), trials=1, seed=5,
        batch_size=16, progress=False,
    )  # fmt: skip
    assert [(r.attack, r.n, r.correct) for r in out.rows if r.attack == "fgsm"] == [
        (r.attack, r.n, r.correct) for r in sequential if r.attack == "fgsm"
    ]


# ----------------------------------------------------------------------------- items 8-9: backend settings


@pytest.fixture
def restore_backend(monkeypatch):
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]


def test_deterministic_sets_torchs_cudnns_and_cublass_settings_and_the_default_autotunes(restore_backend):
    import os

    import torch

    from rna_core.determinism import apply_backend_settings

    on = apply_backend_settings(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert on["deterministic_algorithms"] == "true" and on["cudnn.benchmark"] == "false"
    off = apply_backend_settings(False)  # the job's default, as bench/gpu.py measures it
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert off["cudnn.benchmark"] == "true" and off["cudnn.deterministic"] == "false"
    assert set(off) >= {"cudnn.allow_tf32", "cuda.matmul.allow_tf32", "CUBLAS_WORKSPACE_CONFIG"}


def test_the_deterministic_loss_avoids_nllloss_off_the_cpu_and_equals_cross_entropy(restore_backend):
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from rna_core.determinism import cross_entropy, one_hot_cross_entropy

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    ref = F.cross_entropy(logits, y)
    (g_ref,) = torch.autograd.grad(ref, logits)
    alt = one_hot_cross_entropy(logits, y)
    (g_alt,) = torch.autograd.grad(alt, logits)
    assert torch.allclose(alt, ref, atol=1e-6) and torch.allclose(g_alt, g_ref, atol=1e-6)
    torch.use_deterministic_algorithms(True)
    assert torch.equal(cross_entropy(logits, y), ref)  # CPU: the library kernel, bit for bit
    meta = torch.empty(6, 10, device="meta", requires_grad=True)  # stands in for a GPU tensor
    with Ops() as ops:
        cross_entropy(meta, y.to("meta")).backward()
    assert not any("nll_loss" in name for name in ops.names)
    torch.use_deterministic_algorithms(False)
    with Ops() as ops:
        cross_entropy(meta, y.to("meta"))
    assert any("nll_loss" in name for name in ops.names)


def test_a_training_step_under_deterministic_settings_runs_and_matches_on_cpu(restore_backend):
    import torch

    from rna_core import create_model
    from rna_core.config import AttackConfig, TrainConfig
    from rna_core.determinism import apply_backend_settings
    from rna_core.distributed import state_digest
    from rna_core.optim import build_optimizer
    from rna_core.paths import PathSampler
    from rna_core.training import train_step

    cfg = TrainConfig(attack=AttackConfig(steps=2), amp_bf16="false", channels_last="false", deterministic=True)
    x, y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    digests = []
    for deterministic in (True, False):
        apply_backend_settings(deterministic)
        torch.manual_seed(0)
        model = create_model("small_cnn", norm="bn,gns:1")
        train_step(model, x, y, build_optimizer(model, cfg), cfg, PathSampler("uniform", seed=1))
        digests.append(state_digest(model))
    assert digests[0] == digests[1]  # CPU kernels are deterministic already: the flag changes nothing here


# ----------------------------------------------------------------------------- item 10: the smaller ones


def test_the_random_start_generator_lives_on_the_training_device():
    import torch

    from rna_core.config import TrainConfig
    from rna_core.distributed import step_streams

    _, noise = step_streams(TrainConfig(), 0, 0, torch.device("cpu"))
    assert noise is not None and noise.device == torch.device("cpu")
    _, none = step_streams(TrainConfig(rank_paths="per_rank"), 0, 0, torch.device("cpu"))
    assert none is None  # per-rank paths: the sampler's (CPU) generator draws both, as documented
    source = (REPO / "pipelines" / "train_worker.py").read_text()
    assert "step_streams(train_cfg, seed, rank, device)" in source  # the job passes its device


def test_epoch_seconds_are_read_after_the_device_drains(monkeypatch):
    import torch

    import rna_core.training as training
    from rna_core import create_model
    from rna_core.config import AttackConfig, TrainConfig
    from rna_core.data import BatchIterator, make_synthetic
    from rna_core.optim import build_optimizer
    from rna_core.paths import PathSampler
    from rna_core.speed import wait_for_device

    fake = FakeCuda(monkeypatch)
    wait_for_device(torch.device("cuda", 0))
    wait_for_device("cpu")
    assert fake.calls == [("sync", torch.device("cuda", 0))]
    order: list[str] = []
    clock = training.time.perf_counter
    monkeypatch.setattr(training, "wait_for_device", lambda device: order.append(f"wait {device}"))
    monkeypatch.setattr(training.time, "perf_counter", lambda: order.append("clock") or clock())
    cfg = TrainConfig(attack=AttackConfig(steps=1), amp_bf16="false", channels_last="false")
    model = create_model("small_cnn", norm="bn")
    batches = BatchIterator(make_synthetic(16, seed=0), 8, shuffle=False, seed=0)
    training.train_epoch(model, batches, build_optimizer(model, cfg), cfg, PathSampler("uniform", seed=0))
    assert order[-2:] == ["wait cpu", "clock"]  # the last clock reading comes after the device is drained


def _average_buffers_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from rna_core import create_model
    from rna_core.distributed import average_buffers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = create_model("small_cnn", norm="bn")
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        with torch.no_grad():
            bn.running_mean.fill_(float(rank))
            bn.num_batches_tracked.fill_(10 + rank)
        before = {k: v.clone() for k, v in model.named_buffers() if k.startswith("standardize")}
        for _ in range(3):  # three epochs' averaging
            average_buffers(model)
        after = dict(model.named_buffers())
        report = {
            "standardize_unchanged": all(torch.equal(v, after[k]) for k, v in before.items()),
            "bn_mean": bn.running_mean.tolist(),
            "bn_count": int(bn.num_batches_tracked),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_buffer_averaging_averages_statistics_and_leaves_constants_bit_exact(tmp_path):
    """3 ranks: sum / 3 of CIFAR's standardisation mean is not the mean itself (1 ulp per epoch)."""
    import json

    import torch
    import torch.multiprocessing as mp

    from rna_core import create_model

    mean = dict(create_model("small_cnn", norm="bn").named_buffers())["standardize.mean"]
    assert not torch.equal((mean + mean + mean) / 3, mean)  # what averaging it did
    world = 3
    mp.start_processes(
        _average_buffers_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        start_method="spawn",
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rep in reports:
        assert rep["standardize_unchanged"]
        assert rep["bn_mean"] == [1.0] * len(rep["bn_mean"])  # (0 + 1 + 2) / 3
        assert rep["bn_count"] == 10  # integer counters come from rank 0


def test_a_resumed_optimizer_state_takes_the_weights_layout():
    import torch

    from rna_core import create_model
    from rna_core.config import TrainConfig
    from rna_core.optim import build_optimizer
    from rna_core.speed import optimizer_state_like_params, use_channels_last

    cfg = TrainConfig()
    model = create_model("small_cnn", norm="bn")
    opt = build_optimizer(model, cfg)
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers, contiguous
    saved = opt.state_dict()
    resumed_model = use_channels_last(create_model("small_cnn", norm="bn"))  # converted before loading
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(saved)
    convs = [p for p in resumed_model.parameters() if p.dim() == 4]
    assert not all(resumed.state[p]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last) for p in convs)
    optimizer_state_like_params(resumed)
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        buf = resumed.state[p]["momentum_buffer"]
        assert torch.equal(buf, opt.state[q]["momentum_buffer"])  # same values
        if p.dim() == 4:
            assert buf.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- item 4: EOT's memory


def _eot_grad(average: bool, draws: int = 4):
    import torch
    import torch.nn.functional as F

    from rna_core import create_model
    from rna_core.evaluation.protocols import LogitAverage, _Draws

    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1").eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.arange(6) % 10
    stream = _Draws(model, 7, "eot")
    with stream.every_forward():
        if average:
            logits = LogitAverage(model, draws, stream)(x)
        else:  # every graph kept: what LogitAverage computed before issue 18
            logits = sum(model(x) for _ in range(draws)) / draws
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), [x])
    return logits.detach(), grad, stream.count, stream.generator.get_state()


def test_logit_average_recomputes_each_draw_with_its_own_path_and_gives_the_same_gradient():
    import torch

    new_logits, new_grad, new_count, new_state = _eot_grad(True)
    old_logits, old_grad, old_count, old_state = _eot_grad(False)
    assert torch.equal(new_logits, old_logits)  # the same 4 paths, in the same order
    assert torch.allclose(new_grad, old_grad, rtol=1e-5, atol=1e-7) and new_grad.abs().sum() > 0
    assert new_count == old_count == 4 and torch.equal(new_state, old_state)  # the stream moved on as before


PEAK_SCRIPT = r"""
import sys, torch, torch.nn.functional as F
from rna_core import create_model
from rna_core.evaluation.protocols import LogitAverage, _Draws
torch.set_num_threads(1)
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
torch.manual_seed(0)
model = create_model("small_cnn", norm="bn,gns:1").eval()
x = torch.rand(128, 3, 32, 32).requires_grad_(True)
with torch.no_grad():
    model(x)  # warm-up: what the process holds besides the attack's graphs
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
before = rss("VmRSS:")
stream = _Draws(model, 7, "eot")
with stream.every_forward():
    average, draws = sys.argv[1] == "bounded", int(sys.argv[2])
    logits = LogitAverage(model, draws, stream)(x) if average else sum(model(x) for _ in range(draws)) / draws
    torch.autograd.grad(F.cross_entropy(logits, torch.zeros(128, dtype=torch.long)), [x])
print(rss("VmHWM:") - before)
"""


@pytest.mark.slow  # three subprocesses of up to 16 forward/backward passes at batch 128
def test_logit_average_peak_memory_is_one_graph_not_eot_iter_graphs():
    """Peak resident memory of an EOT gradient, each variant in its own process: with every graph
    kept it grows with the draws; bounded, 16 draws peak where 4 do.

    glibc's fixed mmap threshold returns freed tensors to the system, so the peak measures live
    memory rather than the allocator's retained heap."""
    import subprocess
    import sys

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for variant, draws in (("bounded", 4), ("bounded", 16), ("all_graphs", 16)):
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, variant, str(draws)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[(variant, draws)] = int(proc.stdout.split()[-1])
    mib = 2**20
    assert peaks[("bounded", 16)] < peaks[("bounded", 4)] + 16 * mib, peaks  # flat in the draws
    assert peaks[("all_graphs", 16)] > peaks[("bounded", 16)] + 200 * mib, peaks  # sixteen graphs kept


def test_logit_average_replays_its_draws_in_a_backward_outside_the_attack_block():
    import torch
    import torch.nn.functional as F

    from rna_core import create_model
    from rna_core.evaluation.protocols import LogitAverage, _Draws

    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1").eval()
    x = torch.rand(4, 3, 32, 32).requires_grad_(True)
    stream = _Draws(model, 7, "eot")
    with stream.every_forward():
        logits = LogitAverage(model, 3, stream)(x)
    (late,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)), [x])
    _, inside, _, _ = _eot_grad_small(3)
    assert torch.allclose(late, inside, rtol=1e-5, atol=1e-7) and stream.count == 3


def _eot_grad_small(draws: int):
    import torch
    import torch.nn.functional as F

    from rna_core import create_model
    from rna_core.evaluation.protocols import LogitAverage, _Draws

    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1").eval()
    x = torch.rand(4, 3, 32, 32).requires_grad_(True)
    stream = _Draws(model, 7, "eot")
    with stream.every_forward():
        logits = LogitAverage(model, draws, stream)(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)), [x])
    return logits, grad, stream.count, None


# ----------------------------------------------------------------------------- item 6: early-stop without syncs


def test_first_fooled_keeps_each_examples_first_fooling_row_without_a_python_loop():
    """The vectorised hook against the row-by-row rule it replaced, on forwards that repeat examples."""
    import torch

    from rna_core.attacks.registry import ThreatModel
    from rna_core.evaluation.protocols import FirstFooled

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g)
    y = torch.arange(6) % 3
    eps = 8 / 255
    watch = FirstFooled(torch.nn.Identity(), x, y, ThreatModel("linf", eps))
    found, points = torch.zeros(6, dtype=torch.bool), x.clone()
    for _ in range(5):
        rows = torch.randint(0, 6, (9,), generator=g)  # a subset forward: examples repeat, some are absent
        q = (x[rows] + (torch.rand(9, 3, 4, 4, generator=g) * 2 - 1) * eps).clamp(0, 1)
        logits = torch.randn(9, 3, generator=g)
        watch._hook(None, (q,), logits)
        idx, valid = watch._match(q)  # the reference: rows in order, an example's first hit wins
        for r in range(9):
            i = int(idx[r])
            if valid[r] and int(logits[r].argmax()) != int(y[i]) and not found[i]:
                found[i], points[i] = True, q[r]
    assert found.any() and torch.equal(watch.found, found) and torch.equal(watch.points, points)
