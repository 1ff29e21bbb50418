"""Where a user opens what a job logged: the `mlflow ui` command and the UI's addresses of an
experiment and of a compare view (printed by the jobs, put in the sweep summary)."""

from __future__ import annotations

import json
from urllib.parse import quote


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    server = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1 --host 127.0.0.1"
    return f"{server} --backend-store-uri {tracking_uri}"


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` (ui_command) listens by default
# MLflow 3.17's UI shows an experiment as the workspace switcher says (GenAI unless the user picked
# "Model training"), whatever its mlflow.experimentKind tag: links we print pick model training.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def _ui_base(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs in the MLflow UI (the tracking server's, else `mlflow ui`'s default address)."""
    return f"{_ui_base(tracking_uri)}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def compare_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of `run_ids` (e.g. a sweep's trials), side by side."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([str(experiment_id)]))
    return f"{_ui_base(tracking_uri)}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING_VIEW}"


__all__ = ["MODEL_TRAINING_VIEW", "UI_ADDRESS", "compare_url", "experiment_url", "ui_command"]
