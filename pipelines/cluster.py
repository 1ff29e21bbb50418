"""Attach to a Ray cluster or start a local one, and decide whether it offers GPUs.

`ray.address` (or `RAY_ADDRESS`) names a cluster; without one, a cluster started with `ray start`
on this machine is joined, else a local Ray is started. `ray.address: local` always starts a
private local instance (tests, or a laptop where someone else's cluster runs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray._private import state as ray_state

from rna_core.config import Config
from rna_core.errors import ConfigError

Echo = Callable[[str], None]


def local_cpus(cfg: Config, extra_cpus: float = 0.0) -> int:
    """Logical CPUs of a local Ray: the machine's, or what the job's workers (plus `extra_cpus`) ask.

    `extra_cpus` is what a sweep's trial drivers hold beside their Train workers (a sliver each,
    mostly idle): a trial whose worker takes every core still fits.
    """
    needed = math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker + extra_cpus - 1e-9)
    return max(os.cpu_count() or 1, needed)


def ensure_ray(cfg: Config, echo: Echo | None = None, extra_cpus: float = 0.0) -> None:
    """Connect to the configured cluster, or start a local Ray with room for the job's workers."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    # The dashboard is on because Train V2's placement-group cleaner polls the State API (served
    # by the dashboard) and logs a warning every second without it; it listens on localhost only.
    local_kwargs = dict(num_cpus=local_cpus(cfg, extra_cpus), include_dashboard=True, dashboard_host="127.0.0.1")
    if address == "local":
        ray.init(address="local", **local_kwargs)
        return
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")  # a cluster started with `ray start` on this machine
        if echo:
            echo("connected to the running Ray cluster")
    except ConnectionError:
        ray.init(**local_kwargs)


@dataclass(frozen=True)
class GpuCapacity:
    """GPUs of the connected cluster: up now, and at most after autoscaling (None: no autoscaler)."""

    now: float
    scalable: float | None = None

    @property
    def most(self) -> float:
        """What the cluster can offer at most: its autoscaling limit, else what is up now."""
        return max(self.now, self.scalable) if self.scalable is not None else self.now

    def describe(self) -> str:
        text = f"{self.now:g} GPU(s) up"
        if self.scalable is not None:
            text += f", can scale to {self.scalable:g}"
        return text


@dataclass(frozen=True)
class DeviceChoice:
    """Where the training workers run, and why (printed by the launcher, logged as params)."""

    use_gpu: bool
    reason: str

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def line(self, cfg: Config) -> str:
        r = cfg.ray
        per_worker = f"{r.gpus_per_worker:g} GPU" if self.use_gpu else f"{r.cpus_per_worker:g} CPU"
        device = "cuda" if self.use_gpu else "cpu"
        return (
            f"device: {r.num_workers} worker(s) x {per_worker} on {device}, backend {self.backend} "
            f"(ray.use_gpu={str(r.use_gpu).lower()}: {self.reason})"
        )

    def params(self) -> dict[str, str]:
        return {
            "resolved.ray.use_gpu": str(self.use_gpu).lower(),
            "resolved.ray.backend": self.backend,
            "resolved.ray.device_reason": self.reason,
        }


def gpu_capacity() -> GpuCapacity:
    """The connected cluster's GPUs now and, on an autoscaling cluster, the most it can scale to.

    The limit comes from the autoscaler's cluster config in the GCS (what Ray Train's own check
    reads); a local cluster has none, and then only the GPUs up now count.
    """
    now = float(ray.cluster_resources().get("GPU", 0.0))
    scalable = None
    try:
        limits = ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # private API: without it, an autoscaling cluster is judged by what is up
        limits = None
    if limits:
        scalable = float(limits.get("GPU", 0) or 0)
    return GpuCapacity(now, scalable)


def choose_training_device(cfg: Config, capacity: GpuCapacity) -> DeviceChoice:
    """GPU or CPU for `ray.num_workers` workers of `ray.gpus_per_worker` GPUs each.

    `true` with fewer GPUs than the workers need is refused (Ray 2.60 skips its own resource check
    on a cluster without an autoscaler and retries the worker start forever); `auto` takes GPUs
    when the cluster has, or can scale to, enough of them, and otherwise trains on CPU and says why.
    """
    r = cfg.ray
    flag = str(r.use_gpu).lower()
    if flag == "false":
        return DeviceChoice(False, "set explicitly")
    needed = r.num_workers * r.gpus_per_worker
    enough = capacity.most >= needed
    if flag == "true":
        if not enough:
            raise ConfigError(
                f"ray.num_workers={r.num_workers} x ray.gpus_per_worker={r.gpus_per_worker:g} needs {needed:g} GPU(s) "
                f"but the cluster has {capacity.describe()}; lower ray.num_workers, or set ray.use_gpu=false"
            )
        return DeviceChoice(True, f"set explicitly; the cluster has {capacity.describe()}")
    if capacity.most <= 0:
        return DeviceChoice(False, "the cluster has no GPU and cannot scale to one")
    if not enough:
        return DeviceChoice(
            False,
            f"{r.num_workers} worker(s) x {r.gpus_per_worker:g} GPU need {needed:g} but the cluster has "
            f"{capacity.describe()}, so training runs on CPU; lower ray.num_workers to use the GPUs",
        )
    waiting = " (GPU nodes still to start: the workers wait for them)" if capacity.now < needed else ""
    return DeviceChoice(True, f"the cluster has {capacity.describe()}{waiting}")


def resolve_use_gpu(cfg: Config) -> bool:
    """`ray.use_gpu` for tasks that need any GPU: true or false as given; auto: whether the cluster
    has or can scale to one (training sizes its workers with `choose_training_device`)."""
    flag = str(cfg.ray.use_gpu).lower()
    if flag in ("true", "false"):
        return flag == "true"
    return gpu_capacity().most > 0


def cluster_resources() -> dict[str, float]:
    """CPUs, GPUs and the rest of the connected cluster (for sizing concurrency)."""
    return dict(ray.cluster_resources())


__all__ = [
    "DeviceChoice",
    "GpuCapacity",
    "choose_training_device",
    "cluster_resources",
    "ensure_ray",
    "gpu_capacity",
    "local_cpus",
    "resolve_use_gpu",
]
