"""Each epoch's metrics in the job's MLflow run exactly once, whatever kills a worker and when.

A Ray Train retry (a worker SIGKILLed, a node lost) or a resubmitted job resumes from the last
checkpoint Ray registered, and the epochs after it run again. Two windows would log an epoch twice
or never if rank 0 simply logged at the end of each epoch:
- logged, then killed before the epoch's checkpoint reached Ray: the epoch runs again and logs
  again. So an epoch is logged only after `ray.train.report` has persisted its checkpoint, and an
  epoch the run's history already holds is not logged again (Ray's controller registers a reported
  checkpoint a moment later, so even a logged epoch may run again; it computes the same numbers).
- reported, then killed before logging: the resumed run starts after that epoch. So on resume the
  checkpoint's own epoch is logged from the metrics the checkpoint carries when the history lacks it.
The history is read once per attempt (one request): `train_loss` is in every epoch's batch, and a
batch of metrics is one request, stored all or nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from . import tracking

MARKER_METRIC = "train_loss"  # logged every epoch, in the same batch as the others
FINAL_MARKER = "replicas_in_sync"  # in the final evaluation's batch
# Test hook (the kill drills of tests/test_local_cluster.py): "EPOCH:SECONDS[,EPOCH:SECONDS]" makes
# rank 0 wait that long right after it first logs that epoch, so a drill can kill a worker or stop
# the job at a known point. Never set in normal use.
PAUSE_ENV = "RNA_TEST_PAUSE_AFTER_EPOCH_LOG"


class EpochLog:
    """Rank 0's logger of per-epoch metrics for one training attempt (None client: logs nothing)."""

    def __init__(self, client: Any, run_id: str | None):
        self.client, self.run_id = client, run_id
        self.logged: set[int] = logged_steps(client, run_id) if client is not None and run_id else set()

    def log(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Log `metrics` at step `epoch` unless the run already holds that epoch; True if logged."""
        if self.client is None or not self.run_id or epoch in self.logged:
            return False
        tracking.log_metrics(self.client, self.run_id, metrics, step=epoch)
        self.logged.add(epoch)
        return True

    def log_final(self, epochs: int, metrics: Mapping[str, float]) -> bool:
        """The final evaluation's metrics at step `epochs`, unless an attempt killed after logging them did."""
        if self.client is None or not self.run_id or self.client.get_metric_history(self.run_id, FINAL_MARKER):
            return False
        tracking.log_metrics(self.client, self.run_id, metrics, step=epochs)
        return True

    def backfill(self, epoch: int, checkpoint_extra: Mapping[str, Any] | None) -> bool:
        """On resume: the checkpoint's epoch, from the metrics it carries, if it never reached MLflow."""
        metrics = (checkpoint_extra or {}).get("metrics") or {}
        return bool(metrics) and self.log(epoch, metrics)


def logged_steps(client: Any, run_id: str) -> set[int]:
    """The epochs (steps) whose metrics the run already holds."""
    return {int(m.step) for m in client.get_metric_history(run_id, MARKER_METRIC)}


def pause_after_log(epoch: int, logged: bool, env: Mapping[str, str] = os.environ) -> float:
    """The test hook's wait after `epoch` was logged (0 when unset, or when this attempt did not log it
    because an earlier one had: a retry or a resubmitted job does not stop there again)."""
    spec = env.get(PAUSE_ENV, "").strip()
    if not spec or not logged:
        return 0.0
    for item in spec.split(","):
        at, _, seconds = item.partition(":")
        if at.strip() == str(epoch):
            time.sleep(float(seconds))
            return float(seconds)
    return 0.0


__all__ = ["FINAL_MARKER", "MARKER_METRIC", "PAUSE_ENV", "EpochLog", "logged_steps", "pause_after_log"]
