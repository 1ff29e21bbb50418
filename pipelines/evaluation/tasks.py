"""The Ray tasks of an evaluation: a unit (or the units that share an attack run), and the path analysis.

The weights and the test images are put in the object store once; a task receives their
references (nested, so Ray does not fetch them for it) and fetches and builds them only when its
worker process has not done so already (a user's model: its factory's code too, when it is not
installed on the nodes; see source.py). A unit evaluates its batches with the seeds the
sequential `rna_core.evaluation.evaluate_model` gives them, so its counts do not depend on where
it ran. The driver side (which units go together, resources, the fan-out) is fanout.py.

GPUs. Ray gives a GPU task its GPU by setting `CUDA_VISIBLE_DEVICES` for the task, but keeps the
worker process for later tasks (`num_gpus` passed through `.options()` leaves worker reuse on, which
the weight cache relies on), and CUDA reads that variable once per process: a reused worker would
stay on its first task's GPU whatever GPU Ray assigned next. So GPU tasks ask Ray to leave the
variable alone (`GPU_TASK_ENV`), every GPU of the node stays visible, and each task picks the GPU
Ray assigned it by id (`task_device`). The weight cache is keyed by that device, and after every
unit the memory the unit's batches reserved goes back to the GPU (`release_device_memory`), so the
tasks sharing a GPU (`eval.gpus_per_task` < 1) do not hold each other's reserve.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ray
import torch

from rna_core.attacks.registry import get_attack
from rna_core.builders import model_from_config
from rna_core.config import unflatten
from rna_core.data import BatchIterator, ImageTensorDataset
from rna_core.errors import ConfigError
from rna_core.evaluation import Counts, accuracy_vs_distance, batch_seed, run_protocols, transfer_matrix, trial_seed
from rna_core.external import ExternalModel
from rna_core.speed import evaluation_forward

from .plan import settings_hash

_WORKER_CACHE: dict[str, tuple[str, Any]] = {}
_UNPACKED: dict[str, str] = {}  # a user's zipped code (source.pack) by digest -> its folder, in this process
# Ray's switch (ray/_private/accelerators/nvidia_gpu.py) to leave CUDA_VISIBLE_DEVICES as the worker started.
GPU_TASK_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


class InjectedFailure(RuntimeError):
    """Raised once by the test hook `fail_once_marker` (never in normal use)."""


def fail_once(marker: str | None, unit_id: str) -> None:
    """Test hook: the first caller to create `marker` raises; every later call passes.

    `O_EXCL` makes the creation atomic across processes, so exactly one task (the marker names its
    first unit) fails once, and only Ray's own retry can bring its units' results back.
    """
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(unit_id)
    raise InjectedFailure(f"injected failure of unit {unit_id} (fail_once_marker test hook)")


def cuda_index(assigned: list, visible: str | None) -> int:
    """torch's index of the GPU Ray assigned (`ray.get_gpu_ids()[0]`) in a process whose
    CUDA_VISIBLE_DEVICES is `visible` (as the node started the worker; None or empty: all GPUs)."""
    gpu = str(assigned[0]).strip()
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if not ids:
        return int(gpu)
    if gpu not in ids:
        raise RuntimeError(f"Ray assigned GPU {gpu} but this worker sees only CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(gpu)


def task_device() -> torch.device:
    """The device of the running task: the GPU Ray assigned it (by id, see the module docstring), else CPU."""
    assigned = ray.get_gpu_ids()
    if not assigned or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", cuda_index(assigned, os.environ.get("CUDA_VISIBLE_DEVICES")))
    torch.cuda.set_device(device)  # code that says plain "cuda" means this GPU too
    # Units' counts must not depend on which worker ran them: no autotuned, run-dependent cuDNN kernels.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return device


def release_device_memory(device: torch.device) -> None:
    """Give the memory cached by torch's allocator back to the GPU (the cached weights stay)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _cached(slot: str, key: str, box: list, build: Callable[[Any], Any]) -> Any:
    """The value of `slot` in this worker process, fetched from the object store only when `key` changed."""
    hit = _WORKER_CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    if _WORKER_CACHE.pop(slot, None) is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the old value's GPU memory back before the new one is built
    value = build(ray.get(box[0]))
    _WORKER_CACHE[slot] = (key, value)
    return value


def unpack(code: bytes) -> str:
    """Unpack a user's zipped code (`source.pack`) once per process, into a folder put first on
    `sys.path` and removed when the process exits; the folder."""
    key = hashlib.sha256(code).hexdigest()[:16]
    folder = _UNPACKED.get(key)
    if folder is None:
        folder = tempfile.mkdtemp(prefix=f"rna-user-code-{key}-")
        with zipfile.ZipFile(io.BytesIO(code)) as zf:
            zf.extractall(folder)
        atexit.register(shutil.rmtree, folder, True)
        _UNPACKED[key] = folder
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


def build_task_model(payload: Mapping[str, Any], device: torch.device, precision: str = "fp32") -> torch.nn.Module:
    """Our model from its config, or a user's from its factory (its code unpacked here first, when it travels)."""
    if payload.get("external"):
        if payload.get("code"):
            unpack(payload["code"])
        model = ExternalModel.from_dict(payload["external"]).build()
    else:
        model = model_from_config(unflatten(payload["config"]))
    model.load_state_dict(payload["state"])
    return evaluation_forward(model.to(device).eval(), precision)


def _build_data(payload: Mapping[str, Any]) -> ImageTensorDataset:
    return ImageTensorDataset(payload["images"], payload["labels"], list(payload["classes"]), payload["name"])


def _task_context(
    task: Mapping[str, Any], model_box: list, data_box: list
) -> tuple[torch.nn.Module, ImageTensorDataset, torch.device]:
    torch.set_num_threads(max(1, int(task["threads"])))
    device = task_device()
    precision = task.get("forward_precision", "fp32")
    key = f"{task['weights']}@{device}/{precision}"
    model = _cached("model", key, model_box, lambda p: build_task_model(p, device, precision))
    data = _cached("data", task["data"], data_box, _build_data)
    return model, data, device


# Test hook (the node-kill drill of tests/test_local_cluster.py): every unit first waits this many
# seconds, so a drill can find a unit running on a given node and kill it there. Never set in normal use.
UNIT_PAUSE_ENV = "RNA_TEST_UNIT_PAUSE_S"


def evaluate_unit(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the counts of its units (one attack, trial and shard; one unit per protocol in
    `task["protocols"]`), batch by batch with the sequential run's seeds; protocols that share an
    attack run it once (`run_protocols`)."""
    unit_ids = list(task["unit_ids"])
    fail_once(task.get("fail_once_marker"), unit_ids[0])
    time.sleep(float(os.environ.get(UNIT_PAUSE_ENV) or 0))
    model, data, device = _task_context(task, model_box, data_box)
    attack = get_attack(task["attack"], **task["settings"])
    if settings_hash(attack) != task["settings_hash"]:  # a worker running other code than the driver
        raise ConfigError(
            f"attack {attack.name} has other settings on this worker than on the driver ({attack.settings}); "
            "update the cluster's code"
        )
    protocols = list(task["protocols"])
    bs, first = int(task["batch_size"]), int(task["first"])
    shard = data.subset(torch.arange(first, int(task["stop"])))
    tseed = trial_seed(int(task["seed"]), int(task["trial"]))
    draws = int(task["inference_draws"])
    totals = {p: Counts() for p in protocols}
    seconds = dict.fromkeys(protocols, 0.0)
    try:
        for i, (x, y) in enumerate(BatchIterator(shard, bs, shuffle=False, seed=0, device=device)):
            bseed = batch_seed(tseed, first // bs + i)
            outcomes = run_protocols(
                model, x, y, attack, protocols, bseed, int(task["eot_iter"]), task["strategy"], draws
            )
            for p, outcome in outcomes.items():
                totals[p] = totals[p] + outcome.counts
                seconds[p] += outcome.seconds
    finally:
        release_device_memory(device)
    units = [
        {
            "unit_id": uid,
            "correct": totals[p].correct,
            "worst": totals[p].worst,
            "vote": totals[p].vote,
            "draws": draws,
            "n": totals[p].n,
            "seconds": seconds[p],
        }
        for uid, p in zip(unit_ids, protocols, strict=True)
    ]
    return {"units": units, "device": str(device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def analyze_paths(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: accuracy vs. attack/inference path distance, and the transfer matrix."""
    model, data, device = _task_context(task, model_box, data_box)
    subset = data.head(int(task["limit"]))
    batches = list(BatchIterator(subset, int(task["batch_size"]), shuffle=False, seed=0, device=device))
    attack = get_attack(task["attack"])
    try:
        return {
            "distance": accuracy_vs_distance(model, batches, attack, seed=int(task["seed"])),
            "matrix": transfer_matrix(model, batches, attack, num_paths=4, seed=int(task["seed"])),
        }
    finally:
        del batches
        release_device_memory(device)


__all__ = [
    "GPU_TASK_ENV",
    "InjectedFailure",
    "UNIT_PAUSE_ENV",
    "analyze_paths",
    "build_task_model",
    "cuda_index",
    "evaluate_unit",
    "fail_once",
    "release_device_memory",
    "task_device",
]
