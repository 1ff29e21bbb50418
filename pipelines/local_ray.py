"""Start a Ray of the job's own on this machine, waiting as long as the user allows.

Ray gives a new local node's raylet a fixed 30 s to register with its GCS (`ray._private.node`,
not configurable) and then raises a bare Exception, a traceback; on a loaded machine (2 cores,
other jobs) that happens. Here the wait is `RNA_RAY_START_TIMEOUT_S` seconds (default 120; Ray's
wait for the GCS port is raised to match unless `RAY_gcs_server_port_wait_time_s` is set), and
running out of it is one line (exit code 2): what did not start in time, and what to do.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray
from ray._private import services

from rna_core.errors import ConfigError, RnaError

START_TIMEOUT_ENV = "RNA_RAY_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 120.0
GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray's own (default 30 s)


class RayStartTimeout(RnaError):
    """The local Ray did not come up within the start timeout."""


def start_timeout_s(env: Mapping[str, str] = os.environ) -> float:
    """The start timeout: `RNA_RAY_START_TIMEOUT_S`, else the default; ConfigError if it is not > 0."""
    raw = env.get(START_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_START_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{START_TIMEOUT_ENV}={raw!r} is not a number of seconds > 0; e.g. {START_TIMEOUT_ENV}=300")
    return value


def timeout_message(timeout_s: float) -> str:
    return (
        f"the local Ray (ray.address=local, or no cluster to join) did not start within {timeout_s:g} s: its node "
        f"did not register with its GCS, as happens on a loaded machine; wait for other jobs to finish, or set "
        f"{START_TIMEOUT_ENV} to more seconds (e.g. {START_TIMEOUT_ENV}={max(300, int(timeout_s * 2))})"
    )


@contextmanager
def patient_node_lookup(deadline: float, timeout_s: float) -> Iterator[None]:
    """While Ray starts a node, its lookups of the node in the GCS retry until `deadline` (monotonic)
    instead of Ray's 30 s, then raise RayStartTimeout (which Ray's start loop does not catch)."""
    original = services.get_node

    def get_node(*args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return original(*args, **kwargs)
            except RuntimeError:  # "node info not available" yet: what Ray's own loop retries on
                if time.monotonic() >= deadline:
                    raise RayStartTimeout(timeout_message(timeout_s)) from None
                time.sleep(0.2)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


def init_local_ray(init=None, **kwargs: Any) -> None:
    """`ray.init(**kwargs)` for a local Ray, under the start timeout (`init` replaces ray.init in tests)."""
    timeout = start_timeout_s()
    os.environ.setdefault(GCS_PORT_WAIT_ENV, str(math.ceil(timeout)))
    deadline = time.monotonic() + timeout
    try:
        with patient_node_lookup(deadline, timeout):
            (init or ray.init)(**kwargs)
    except RayStartTimeout:
        raise
    except Exception as exc:  # Ray's own timeouts (the GCS port) end in bare exceptions: past the deadline, ours
        if time.monotonic() < deadline:
            raise
        raise RayStartTimeout(timeout_message(timeout)) from exc


__all__ = [
    "DEFAULT_START_TIMEOUT_S",
    "GCS_PORT_WAIT_ENV",
    "START_TIMEOUT_ENV",
    "RayStartTimeout",
    "init_local_ray",
    "patient_node_lookup",
    "start_timeout_s",
    "timeout_message",
]
