"""Attach to a Ray cluster or start a local one, and decide whether it offers GPUs.

`ray.address` (or `RAY_ADDRESS`) names a cluster; without one, a cluster started with `ray start`
on this machine is joined, else a local Ray is started. `ray.address: local` always starts a
private local instance (tests, or a laptop where someone else's cluster runs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import ray

from rna_core.config import Config

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


def resolve_use_gpu(cfg: Config) -> bool:
    """`ray.use_gpu`: true or false as given; auto: whether the cluster has a GPU."""
    flag = str(cfg.ray.use_gpu).lower()
    if flag in ("true", "false"):
        return flag == "true"
    return ray.cluster_resources().get("GPU", 0) > 0


def cluster_resources() -> dict[str, float]:
    """CPUs, GPUs and the rest of the connected cluster (for sizing concurrency)."""
    return dict(ray.cluster_resources())


__all__ = ["cluster_resources", "ensure_ray", "local_cpus", "resolve_use_gpu"]
