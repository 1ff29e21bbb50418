"""What a finished training run leaves in MLflow beside its metrics: the tags that say which
checkpoint each number comes from, folders (local or object store) as artifacts, the logged models' URIs."""

from __future__ import annotations

import tempfile
from typing import Any

from rna_core.config import Config

from .logged_model import LoggedModelRef
from .run_folder import copy_to_local, is_uri


def model_record(ref: LoggedModelRef) -> dict[str, str | None]:
    """How to load (and evaluate) a logged model: its URIs."""
    return {"uri": ref.uri, "run_uri": ref.run_uri, "registered": ref.registered, "alias_uri": ref.alias_uri}


def selection_tags(cfg: Config, selected: dict[str, dict[str, Any]]) -> dict[str, str]:
    """MLflow tags saying which checkpoint each reported number comes from (rna_core.selection)."""
    tags = {"rna.result": "last epoch (checkpoint/); acc_* metrics"}
    for which, info in selected.items():
        note = " (selected on the test set, the papers' way: biased upward)" if which == "test" else ""
        tags[f"rna.selected_on_{which}"] = (
            f"epoch {info['epoch']} by {info['metric']} {info['score']:.4f}; selected_{which}/, "
            f"{which}_selected_acc_* metrics{note}"
        )
    if cfg.train.select_on_test:
        tags["rna.selection_on_test_set"] = "true"
    return tags


def log_folder(client: Any, run_id: str, folder: str, artifact_path: str) -> None:
    """Log a local folder or an object-store folder (copied to a temporary folder first) as artifacts."""
    if not is_uri(folder):
        client.log_artifacts(run_id, folder, artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        copy_to_local(folder, tmp)
        client.log_artifacts(run_id, tmp, artifact_path)


__all__ = ["log_folder", "model_record", "selection_tags"]
