"""The Ray tasks of an evaluation: one unit's counts, and the path analysis.

The weights and the test images are put in the object store once; a task receives their
references (nested, so Ray does not fetch them for it) and fetches and builds them only when its
worker process has not done so already. A unit evaluates its batches with the seeds the
sequential `rna_core.evaluation.evaluate_model` gives them, so its counts do not depend on where
it ran.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import ray
import torch

from rna_core.attacks.registry import get_attack
from rna_core.builders import model_from_config
from rna_core.config import unflatten
from rna_core.data import BatchIterator, ImageTensorDataset
from rna_core.errors import ConfigError
from rna_core.evaluation import accuracy_vs_distance, batch_seed, evaluate_batch, transfer_matrix, trial_seed

from .plan import settings_hash

_WORKER_CACHE: dict[str, tuple[str, Any]] = {}


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


def _cached(slot: str, key: str, box: list, build: Callable[[Any], Any]) -> Any:
    """The value of `slot` in this worker process, fetched from the object store only when `key` changed."""
    hit = _WORKER_CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    _WORKER_CACHE.pop(slot, None)  # free the old one before fetching the new one
    value = build(ray.get(box[0]))
    _WORKER_CACHE[slot] = (key, value)
    return value


def _build_model(payload: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    model = model_from_config(unflatten(payload["config"]))
    model.load_state_dict(payload["state"])
    return model.to(device).eval()


def _build_data(payload: Mapping[str, Any]) -> ImageTensorDataset:
    return ImageTensorDataset(payload["images"], payload["labels"], list(payload["classes"]), payload["name"])


def _task_context(task: Mapping[str, Any], model_box: list, data_box: list) -> tuple[torch.nn.Module, ImageTensorDataset, torch.device]:
    torch.set_num_threads(max(1, int(task["threads"])))
    use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model = _cached("model", f"{task['weights']}@{device}", model_box, lambda p: _build_model(p, device))
    data = _cached("data", task["data"], data_box, _build_data)
    return model, data, device


def evaluate_unit(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: correct predictions of one unit, batch by batch with the sequential run's seeds."""
    fail_once(task.get("fail_once_marker"), task["unit_id"])
    model, data, device = _task_context(task, model_box, data_box)
    attack = get_attack(task["attack"], **task["settings"])
    if settings_hash(attack) != task["settings_hash"]:  # a worker running other code than the driver
        raise ConfigError(f"attack {attack.name} has other settings on this worker than on the driver ({attack.settings}); "
                          "update the cluster's code")
    bs, first = int(task["batch_size"]), int(task["first"])
    shard = data.subset(torch.arange(first, int(task["stop"])))
    tseed = trial_seed(int(task["seed"]), int(task["trial"]))
    correct = n = 0
    start = time.perf_counter()
    for i, (x, y) in enumerate(BatchIterator(shard, bs, shuffle=False, seed=0, device=device)):
        bseed = batch_seed(tseed, first // bs + i)
        correct += evaluate_batch(model, x, y, attack, task["protocol"], bseed, int(task["eot_iter"]), task["strategy"])
        n += int(y.shape[0])
    return {"unit_id": task["unit_id"], "correct": correct, "n": n, "seconds": time.perf_counter() - start}


def analyze_paths(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: accuracy vs. attack/inference path distance, and the transfer matrix."""
    model, data, device = _task_context(task, model_box, data_box)
    subset = data.head(int(task["limit"]))
    batches = list(BatchIterator(subset, int(task["batch_size"]), shuffle=False, seed=0, device=device))
    attack = get_attack(task["attack"])
    return {
        "distance": accuracy_vs_distance(model, batches, attack, seed=int(task["seed"])),
        "matrix": transfer_matrix(model, batches, attack, num_paths=4, seed=int(task["seed"])),
    }


__all__ = ["InjectedFailure", "analyze_paths", "evaluate_unit", "fail_once"]
