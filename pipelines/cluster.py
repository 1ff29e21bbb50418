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
from pathlib import Path

import ray

from rna_core.config import Config
from rna_core.errors import ConfigError

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


def ensure_ray(cfg: Config, echo: Echo | None = None) -> None:
    """Connect to the configured cluster, or start a local Ray with room for the job's workers."""
    if ray.is_initialized():
        return
    check_ray_address(cfg)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    needed = math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    # The dashboard is on because Train V2's placement-group cleaner polls the State API (served
    # by the dashboard) and logs a warning every second without it; it listens on localhost only.
    local_kwargs = dict(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, dashboard_host="127.0.0.1")
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


__all__ = [
    "check_cluster",
    "check_ray_address",
    "cluster_resources",
    "configured_address",
    "ensure_ray",
    "recorded_address",
    "recorded_address_file",
    "resolve_use_gpu",
    "workers_elsewhere",
]
