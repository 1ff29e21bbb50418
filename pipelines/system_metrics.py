"""System metrics of a training run (MLflow's monitor): CPU, memory, disk, network, GPU when present.

One monitor per node, in the node's first worker (local rank 0), sampling every
`mlflow.system_metrics_interval` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides it)
into the run as `system/<name>` (`system/node<k>/<name>` for the k-th node after the first, so
every name is one machine). GPU metrics need NVML (`nvidia-ml-py`, installed); without a GPU the
monitor skips them. `mlflow.system_metrics: false` turns it off.

The monitors start once the first epoch's metrics are logged: MLflow's compare view opens on the
first metric a run logged, and that should be the robust accuracy, not `system/cpu_...`.
"""

from __future__ import annotations

import logging
from typing import Any

from rna_core.config import Config

from .tracking import RunRef


def start_monitor(cfg: Config, run: RunRef | None, node_rank: int, local_rank: int) -> Any | None:
    """Start this node's monitor (in its local rank 0 only); None when off or not this worker's job."""
    if run is None or not cfg.mlflow.system_metrics or local_rank != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per worker
    monitor = SystemMetricsMonitor(
        run.run_id,
        sampling_interval=cfg.mlflow.system_metrics_interval,
        samples_before_logging=1,
        resume_logging=True,  # a resumed run continues the steps it has
        node_id=None if node_rank == 0 else f"node{node_rank}",
        tracking_uri=run.tracking_uri,
    )
    first_step = getattr(monitor, "_logging_step", None)  # where this attempt's samples start
    monitor.start()
    monitor.rna_first_step = first_step
    return monitor


def stop_monitor(monitor: Any | None) -> None:
    """Stop sampling and flush what was sampled (the run must still be RUNNING). A run (or resumed
    attempt) shorter than one sampling interval would log no system metrics at all: it gets one sample
    at its end. That uses the monitor's own collect/publish methods, so it is best effort."""
    if monitor is None:
        return
    monitor.finish()
    first = getattr(monitor, "rna_first_step", None)
    if first is None or getattr(monitor, "_logging_step", first) != first:
        return
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # MLflow's monitor changed: a missing final sample is no reason to fail a run
        logging.getLogger(__name__).warning("system metrics: no final sample (%s)", e)


__all__ = ["start_monitor", "stop_monitor"]
