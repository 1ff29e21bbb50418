"""The driver side of an evaluation's Ray tasks: which units go together, what each task asks for,
and the fan-out that keeps them in flight and stores each unit as it arrives.

One task runs the units of one attack, trial and shard whose protocols share an attack run
(`unit_groups`), so they attack once (`rna_core.evaluation.run_protocols`); each unit is still stored in its
own file, so a resumed evaluation runs only the missing protocols of a group. Each task asks for
`eval.cpus_per_task` CPUs and, when the cluster has GPUs, a GPU share (`gpu_share`); the driver keeps
at most `eval.max_in_flight` tasks in flight (`ray.wait`), and Ray retries a failed task
(`eval.max_retries`, `retry_exceptions=True`). The tasks themselves live in tasks.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from rna_core.config import EvalConfig, flatten
from rna_core.evaluation.protocols import SHARED_ATTACK
from rna_core.memory import GIB, gpu_fraction, measure_task_memory, tasks_per_gpu
from rna_core.units import settings_to_unit

from ..cluster import cluster_resources, resolve_use_gpu
from .plan import EvalPlan
from .store import Unit, paths_settings, save_paths, write_unit
from .tasks import GPU_TASK_ENV, analyze_paths, build_task_model, evaluate_unit

Echo = Callable[[str], None]


def unit_groups(units: list[Unit]) -> list[list[Unit]]:
    """The units one task runs together, in the order of `units`: those of one attack, trial and
    shard whose protocols share an attack run (SHARED_ATTACK); every other unit is a task of its own
    (an `eot` unit shares nothing, and tying it to a `transfer` unit would only halve the tasks)."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        together = "shared" if u.protocol in SHARED_ATTACK else u.protocol
        groups.setdefault((u.attack, u.settings_hash, u.trial, u.first, u.stop, together), []).append(u)
    return list(groups.values())


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
    """Run `todo` (and the path analysis) as Ray tasks, the units that share an attack run in one
    task (`unit_groups`); each finished unit is stored at once.

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
        on_cpu = lambda: build_task_model(model, torch.device("cpu"), o.forward_precision)  # noqa: E731
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


__all__ = ["Progress", "fan_out", "gpu_share", "unit_groups"]
