"""Attach to a Ray cluster or start a local one, and decide whether it offers GPUs.

`ray.address` (or `RAY_ADDRESS`) names a cluster; without one, a cluster started with `ray start`
on this machine is joined, else a local Ray is started. `ray.address: local` always starts a
private local instance (tests, or a laptop where someone else's cluster runs).

Before anything is started or written, `check_ray_address` probes the address a job would join:
Ray itself waits minutes for a GCS that does not answer (a cluster killed without `ray stop`
leaves its address in `<temp>/ray/ray_current_cluster`, and every later job tries to join it);
here it is one line within seconds.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import state as ray_state

from rna_core.config import Config
from rna_core.errors import ConfigError

from .local_ray import init_local_ray
from .preflight import check_cluster_paths

Echo = Callable[[str], None]
PROBE_TIMEOUT_S = 3.0
ADDRESS_FILE = "ray_current_cluster"  # written by `ray start`, removed by `ray stop`
LOCAL_HINT = "--set ray.address=local runs the job on a Ray of its own on this machine"


def recorded_address_file() -> Path:
    """Where `ray start` records the cluster it started (Ray's rule: RAY_TMPDIR, TMPDIR, /tmp)."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(temp) / "ray" / ADDRESS_FILE


def recorded_address() -> str | None:
    """The address `ray start` recorded on this machine, or None."""
    try:
        text = recorded_address_file().read_text().strip()
    except OSError:
        return None
    return text or None


def gcs_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address (`host:port`, `ray://host:port`); None for other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at the address (True for forms we cannot probe)."""
    target = gcs_host_port(address)
    if target is None:
        return True
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return True
    except OSError:
        return False


def configured_address(cfg: Config) -> tuple[str | None, str]:
    """The address the job would join and the setting it comes from (None: no cluster named)."""
    if cfg.ray.address:
        return cfg.ray.address, "ray.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    recorded = recorded_address()
    if recorded:
        return recorded, f"the cluster recorded in {recorded_address_file()}"
    return None, ""


def check_ray_address(cfg: Config) -> None:
    """ConfigError (one line) when the cluster the job would join does not answer; nothing started."""
    if ray.is_initialized():  # already attached (a notebook, a test): ensure_ray will not join another
        return
    address, source = configured_address(cfg)
    if address is None or address in ("local", "auto") or answers(address):
        return
    if source.startswith("the cluster recorded"):
        raise ConfigError(
            f"the Ray cluster at {address} ({source}) does not answer: it was stopped without `ray stop`; "
            f"{LOCAL_HINT}, or delete {recorded_address_file()} to make jobs start a local Ray by default"
        )
    raise ConfigError(
        f"the Ray cluster at {address} ({source}) does not answer within {PROBE_TIMEOUT_S:g} s; start it or fix "
        f"{source}; {LOCAL_HINT}"
    )


def workers_elsewhere(cfg: Config) -> str | None:
    """When the job's workers can run on a node other than this driver's: a phrase saying so.

    Joins the named cluster to look (joining starts nothing); a Ray of the job's own
    (`ray.address=local`, or no cluster named) has one node, this one.
    """
    address, _ = configured_address(cfg)
    if address is None or address == "local":
        return None
    ensure_ray(cfg)
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here and n["Resources"].get("CPU", 0) > 0]
    if not others:
        return None
    return f"the cluster at {address} runs workers on {len(others)} other node(s)"


def check_cluster(cfg: Config, tracking_uri: str) -> None:
    """Before a job opens its run: the cluster answers, and if its workers run on other nodes, no
    setting needs the driver's disk (storage, data, the tracking store `tracking_uri`)."""
    check_ray_address(cfg)
    elsewhere = workers_elsewhere(cfg)
    if elsewhere:
        check_cluster_paths(cfg, tracking_uri, elsewhere)


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
    check_ray_address(cfg)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    # The dashboard is on because Train V2's placement-group cleaner polls the State API (served
    # by the dashboard) and logs a warning every second without it; it listens on localhost only.
    local_kwargs = dict(num_cpus=local_cpus(cfg, extra_cpus), include_dashboard=True, dashboard_host="127.0.0.1")
    if address == "local":
        init_local_ray(address="local", **local_kwargs)  # RNA_RAY_START_TIMEOUT_S (pipelines.local_ray)
        return
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")  # a cluster started with `ray start` on this machine
        if echo:
            echo("connected to the running Ray cluster")
    except ConnectionError:
        init_local_ray(**local_kwargs)


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
    "check_cluster",
    "check_ray_address",
    "choose_training_device",
    "cluster_resources",
    "configured_address",
    "ensure_ray",
    "gpu_capacity",
    "local_cpus",
    "recorded_address",
    "recorded_address_file",
    "resolve_use_gpu",
    "workers_elsewhere",
]
