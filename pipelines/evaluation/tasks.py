"""The Ray tasks of an evaluation (the units of one attack, trial and shard; the path analysis) and their fan-out.

The weights and the test images are put in the object store once; a task receives their
references (nested, so Ray does not fetch them for it) and fetches and builds them only when its
worker process has not done so already (a user's model: its factory's code too, when it is not
installed on the nodes; see source.py). A unit evaluates its batches with the seeds the
sequential `rna_core.evaluation.evaluate_model` gives them, so its counts do not depend on where
it ran. Each task asks for `eval.cpus_per_task` CPUs and, when the cluster has GPUs,
`eval.gpus_per_task` of a GPU; the driver keeps at most `eval.max_in_flight` tasks in flight
(`ray.wait`), and Ray retries a failed task (`eval.max_retries`, `retry_exceptions=True`).

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
from rna_core.config import EvalConfig, flatten, unflatten
from rna_core.data import BatchIterator, ImageTensorDataset
from rna_core.errors import ConfigError
from rna_core.evaluation import Counts, accuracy_vs_distance, batch_seed, run_protocols, transfer_matrix, trial_seed
from rna_core.external import ExternalModel
from rna_core.memory import GIB, gpu_fraction, measure_task_memory, tasks_per_gpu
from rna_core.speed import evaluation_forward
from rna_core.units import settings_to_unit

from ..cluster import cluster_resources, resolve_use_gpu
from .plan import EvalPlan, settings_hash
from .store import Unit, paths_settings, save_paths, write_unit

Echo = Callable[[str], None]

_WORKER_CACHE: dict[str, tuple[str, Any]] = {}
_UNPACKED: dict[str, str] = {}  # a user's zipped code (source.pack) by digest -> its folder, in this process
# Ray's switch (ray/_private/accelerators/nvidia_gpu.py) to leave CUDA_VISIBLE_DEVICES as the worker started.
GPU_TASK_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


class InjectedFailure(RuntimeError):
    """Raised once by the test hook `fail_once_marker` (never in normal use)."""


def fail_once(marker: str | None, unit_id: str) -> None:
    """Test hook: the first caller to create `marker` raises; every later call passes.

    `O_EXCL` makes the creation atomic across processes, so exactly one unit fails once, and
    only Ray's own retry can bring its result back.
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


def _build_model(payload: Mapping[str, Any], device: torch.device, precision: str = "fp32") -> torch.nn.Module:
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
    model = _cached("model", key, model_box, lambda p: _build_model(p, device, precision))
    data = _cached("data", task["data"], data_box, _build_data)
    return model, data, device


# Test hook (the node-kill drill of tests/test_local_cluster.py): every unit first waits this many
# seconds, so a drill can find a unit running on a given node and kill it there. Never set in normal use.
UNIT_PAUSE_ENV = "RNA_TEST_UNIT_PAUSE_S"


def evaluate_unit(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the counts of the units of one attack, trial and shard (one per protocol in
    `task["protocols"]`), batch by batch with the sequential run's seeds; the protocols that share
    an attack run it once (`run_protocols`)."""
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


def unit_groups(units: list[Unit]) -> list[list[Unit]]:
    """The units one task runs together: those of one attack, trial and shard (their protocols
    may share an attack run), in the order of `units`."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.attack, u.settings_hash, u.trial, u.first, u.stop), []).append(u)
    return list(groups.values())


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


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Units done / total, elapsed and ETA, as a line at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, already: int, echo: Echo, every: float):
        self.total, self.done, self.already = total, already, already
        self.echo, self.every = echo, every
        self.start = time.monotonic()
        self.last = -float("inf")

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        ran = self.done - self.already
        left = self.total - self.done
        eta = _clock(elapsed / ran * left) if ran else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"[evaluate] {self.done}/{self.total} units ({pct:.0f}%)  elapsed {_clock(elapsed)}  eta {eta}"

    def advance(self, k: int = 1) -> None:
        self.done += k
        self.maybe_print(force=self.done == self.total)

    def maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            self.echo(self.line())


def gpu_share(
    options: EvalConfig, build_model: Callable[[], torch.nn.Module], input_shape: tuple[int, ...]
) -> tuple[float, str]:
    """Ray's GPU request per task and how it was chosen: `eval.gpus_per_task` as given, or sized from
    the measured memory of the model `build_model()` makes (built only then), at the evaluation batch,
    for GPUs of `eval.gpu_memory_gib` (one line, ConfigError, when a task does not fit one GPU)."""
    if options.gpus_per_task is not None:
        return options.gpus_per_task, "eval.gpus_per_task"
    memory = measure_task_memory(build_model(), input_shape)
    batch = int(options.batch_size or 1)
    count = tasks_per_gpu(memory, batch, options.gpu_memory_gib * GIB)
    need = memory.peak_bytes(batch) / GIB
    how = f"sized: ~{need:.1f} GiB a task at batch {batch}, {count} per {options.gpu_memory_gib:g} GiB GPU"
    return gpu_fraction(count), how


def _task_resources(options: EvalConfig, use_gpu: bool, gpus: float = 0.0) -> dict[str, Any]:
    res: dict[str, Any] = {
        "num_cpus": options.cpus_per_task,
        "max_retries": options.max_retries,
        "retry_exceptions": True,
    }
    if use_gpu and gpus > 0:
        res["num_gpus"] = gpus
        res["runtime_env"] = {"env_vars": dict(GPU_TASK_ENV)}  # merged over the job's runtime_env
    return res


def _max_in_flight(options: EvalConfig, use_gpu: bool, gpus: float = 0.0) -> int:
    """Twice what the cluster runs at once: enough queued to keep it busy, bounded memory."""
    if options.max_in_flight:
        return options.max_in_flight
    res = cluster_resources()
    slots = res.get("CPU", 1.0) / options.cpus_per_task
    if use_gpu and gpus > 0:
        slots = min(slots, res.get("GPU", 0.0) / gpus)
    return max(1, int(slots)) * 2


def fan_out(plan: EvalPlan, todo: list[Unit], echo: Echo, with_paths: bool, fail_once_marker: str | None = None) -> int:
    """Run `todo` (and the path analysis) as Ray tasks, one per attack, trial and shard (its
    protocols' units together, `unit_groups`); each finished unit is stored at once.

    Returns the number of units run. On a task that fails after its retries the tasks in flight
    are cancelled and the error propagates; the units stored so far stay (a re-run resumes).
    """
    o = plan.options
    use_gpu = resolve_use_gpu(plan.source.cfg)
    external = plan.source.external.to_dict() if plan.source.external is not None else None
    model = {
        "config": flatten(plan.source.cfg),
        "state": plan.source.state,
        "external": external,
        "code": plan.source.code,
    }
    gpus, gpus_how = 0.0, ""
    if use_gpu:
        on_cpu = lambda: _build_model(model, torch.device("cpu"), o.forward_precision)  # noqa: E731
        gpus, gpus_how = gpu_share(o, on_cpu, tuple(plan.dataset.images.shape[1:]))
    resources = _task_resources(o, use_gpu, gpus)
    limit = _max_in_flight(o, use_gpu, gpus)
    model_box = [ray.put(model)]
    ds = plan.dataset
    data_box = [ray.put({"images": ds.images, "labels": ds.labels, "classes": list(ds.classes), "name": ds.name})]
    common = {
        "weights": plan.source.weights_digest,
        "data": plan.data_digest,
        "threads": max(1, int(o.cpus_per_task)),
        "batch_size": o.batch_size,
        "seed": o.seed,
        "eot_iter": o.eot_iter,
        "strategy": o.strategy,
        "forward_precision": o.forward_precision,
        "inference_draws": o.inference_draws,
    }
    by_name = {a.name: a for a in plan.attacks}
    unit_task = ray.remote(evaluate_unit).options(**resources)
    gpu_note = f" + {gpus:g} GPU ({gpus_how})" if "num_gpus" in resources else ""
    echo(
        f"[evaluate] {len(todo)} unit(s) to run as {len(unit_groups(todo))} Ray tasks "
        f"({o.cpus_per_task:g} CPU{gpu_note} each, at most {limit} in flight, {o.max_retries} retries)"
    )

    progress = Progress(len(plan.units) + int(with_paths), len(plan.units) - len(todo), echo, o.progress_every)
    in_flight: dict[Any, list[Unit] | None] = {}
    if with_paths:
        paths_task = ray.remote(analyze_paths).options(**resources)
        in_flight[paths_task.remote(model_box, data_box, {**common, **paths_settings(plan)})] = None
    queue = list(reversed(unit_groups(todo)))
    ran = 0
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                group = queue.pop()
                u = group[0]
                task = {
                    **common,
                    "unit_ids": [g.unit_id for g in group],
                    "attack": u.attack,
                    "settings": settings_to_unit(o.attack_settings.get(u.attack, {})),
                    "settings_hash": u.settings_hash,
                    "protocols": [g.protocol for g in group],
                    "trial": u.trial,
                    "first": u.first,
                    "stop": u.stop,
                    "fail_once_marker": fail_once_marker,
                }
                in_flight[unit_task.remote(model_box, data_box, task)] = group
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=o.progress_every)
            for ref in ready:
                group = in_flight.pop(ref)
                result = ray.get(ref)  # a task that failed after its retries raises here
                if group is None:
                    save_paths(plan, result)
                    progress.advance()
                    continue
                for g, unit_result in zip(group, result["units"], strict=True):
                    if unit_result["unit_id"] != g.unit_id:
                        raise RuntimeError(f"a task returned unit {unit_result['unit_id']} for {g.unit_id}")
                    write_unit(plan.out_dir, g, by_name[g.attack], unit_result, o.seed)
                    ran += 1
                progress.advance(len(group))
            if not ready:
                progress.maybe_print()
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=False)
        raise
    return ran


__all__ = [
    "GPU_TASK_ENV",
    "InjectedFailure",
    "Progress",
    "analyze_paths",
    "cuda_index",
    "evaluate_unit",
    "fail_once",
    "fan_out",
    "release_device_memory",
    "task_device",
    "unit_groups",
]
