"""The model an evaluation scores, named by an MLflow model URI (`jobs/evaluate.py --model-uri`).

`models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<run id>/model` and
`models:/m-<id>` name a model the training job logged (pipelines.logged_model). Its rna_core
checkpoint is fetched (pipelines.model_uri, `weights_only`) and checked exactly as a
`--checkpoint` file is (pipelines.evaluation.source); the evaluation is then nested under the
training run that logged the model, as `--run-id` does. Nothing is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rna_core.errors import ConfigError

from .. import tracking
from ..model_uri import fetch_model
from ..preflight import check_tracking_store
from ..run_folder import base_dir
from .source import ModelSource, load_source, safe_name


def load_uri_source(model_uri: str, overrides: Sequence[str] = ()) -> ModelSource:
    """The model `model_uri` names, loaded and checked, nested under its training run."""
    uri = tracking.resolve_tracking_uri(base_dir())
    check_tracking_store(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(
            f"MLflow model '{model_uri}' not found: there is no MLflow store at {uri}; "
            "set MLFLOW_TRACKING_URI to the store jobs/train.py used"
        )
    client = tracking.client_for(uri)
    with tempfile.TemporaryDirectory(prefix="rna-eval-model-uri-") as tmp:
        fetched = fetch_model(client, uri, model_uri, tmp)
        source = load_source(checkpoint=str(fetched.checkpoint), overrides=overrides)
    run_id = fetched.run_id
    experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    return replace(
        source,
        kind="model",
        label=f"{safe_name(fetched.name)}-{fetched.model_id[-8:]}-{source.weights_digest[:8]}",
        description=model_uri.strip(),
        parent_run_id=run_id,
        parent_experiment_id=experiment_id,
        training_run_id=run_id or source.training_run_id,
    )


__all__ = ["load_uri_source"]
