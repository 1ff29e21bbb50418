"""A model logged by the training job, found by its MLflow URI, for `jobs/evaluate.py --model-uri`.

`load_uri_source` is the evaluation's ModelSource for such a URI: the checkpoint is checked exactly
as a `--checkpoint` file is (pipelines.evaluation.source), and the evaluation is nested under the
training run that logged the model, as `--run-id` does. Nothing is written.

`models:/<name>@<alias>`, `models:/<name>/<version>` (or `latest`), `models:/m-<id>` and
`runs:/<run id>/<model name>` are resolved with the explicit client (a registered version points at
its logged model), then only two files of the model are fetched: `MLmodel` (its metadata says where
rna_core's checkpoint is) and that checkpoint, which the evaluation reads as any checkpoint file
(`torch.load(weights_only=True)`). The pickled network is never loaded here
(pipelines.logged_model says what the model holds).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from rna_core.errors import ConfigError

from . import tracking
from .evaluation.source import ModelSource, load_source, safe_name
from .preflight import check_tracking_store
from .run_folder import base_dir


@dataclass
class FetchedModel:
    """A logged model found by URI: its checkpoint file (downloaded) and where it came from."""

    checkpoint: Path
    model_id: str
    name: str
    run_id: str | None
    resolved: str  # what the URI named, in words


def _logged_model_of_version(client: Any, version: Any, uri: str) -> tuple[Any, str]:
    model_id = getattr(version, "model_id", None)
    if not model_id and str(version.source).startswith("models:/m-"):
        model_id = str(version.source)[len("models:/") :]
    if not model_id:
        raise ConfigError(
            f"{uri} (version {version.version}) was not registered from a logged model of jobs/train.py "
            f"(its source is {version.source}); evaluate its checkpoint with --checkpoint"
        )
    return client.get_logged_model(model_id), f"version {version.version} of '{version.name}'"


def find_logged_model(client: Any, uri: str) -> tuple[Any, str]:
    """The LoggedModel entity a `models:/...` or `runs:/<run id>/<name>` URI names, and the URI in words.

    `models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/<name>/latest`, `models:/m-<id>`.
    A `runs:/` URI takes the newest model of that name the run logged (a resumed run logs its new
    last epoch again, as MLflow's own `runs:/` resolution does).
    """
    if uri.startswith("runs:/"):
        run_id, _, name = uri[len("runs:/") :].partition("/")
        name = name.strip("/")
        if not run_id or not name or "/" in name:
            raise ConfigError(f"--model-uri '{uri}' is not runs:/<run id>/<model name> (e.g. runs:/<id>/model)")
        run = client.get_run(run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'", max_results=1000
        )
        mine = [m for m in models if m.source_run_id == run_id]
        if not mine:
            raise ConfigError(
                f"MLflow run '{run_id}' logged no model named '{name}' (jobs/train.py logs `model` and, with "
                "data.val_size, `model_selected_val`)"
            )
        return max(mine, key=lambda m: m.creation_timestamp), f"model '{name}' of run {run_id}"
    if not uri.startswith("models:/"):
        raise ConfigError(
            f"--model-uri '{uri}' is not an MLflow model URI; give models:/<name>@<alias>, models:/<name>/<version> "
            "or runs:/<run id>/model (files: --checkpoint)"
        )
    rest = uri[len("models:/") :].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return client.get_logged_model(rest), f"logged model {rest}"
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return _logged_model_of_version(client, client.get_model_version_by_alias(name, alias), uri)
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise ConfigError(f"--model-uri '{uri}' names no version; give models:/<name>@<alias> or models:/<name>/<n>")
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'") if "'" not in name else []
        if not versions:
            raise ConfigError(f"registered model '{name}' has no version yet")
        return _logged_model_of_version(client, max(versions, key=lambda v: int(v.version)), uri)
    return _logged_model_of_version(client, client.get_model_version(name, version), uri)


def fetch_model(client: Any, tracking_uri: str, uri: str, dst: str | Path) -> FetchedModel:
    """Download the checkpoint of the logged model `uri` names into folder `dst`; nothing is loaded.

    MLflow's errors (no such model, alias, version or run) become one ConfigError line.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        logged, resolved = find_logged_model(client, uri.strip())
        base = logged.artifact_location.rstrip("/")
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/MLmodel", dst_path=str(dst), tracking_uri=tracking_uri
            )
        except MlflowException:
            raise ConfigError(f"{uri} ({resolved}) has no MLmodel file: its logging did not finish") from None
        meta = (yaml.safe_load(Path(mlmodel).read_text()) or {}).get("metadata") or {}
        inside = (meta.get("rna") or {}).get("checkpoint")
        if not inside:
            raise ConfigError(
                f"{uri} ({resolved}) was not logged by jobs/train.py (no rna checkpoint inside); evaluate "
                "other models with --model <module>:<factory> --weights <file>"
            )
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{base}/{inside}", dst_path=str(dst), tracking_uri=tracking_uri
        )
    except MlflowException as e:
        reason = (str(e).strip().splitlines() or ["unknown"])[0]
        raise ConfigError(f"MLflow model '{uri}' not found in {tracking_uri} ({reason})") from None
    return FetchedModel(Path(local), logged.model_id, logged.name, logged.source_run_id, resolved)


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


__all__ = ["FetchedModel", "fetch_model", "find_logged_model", "load_uri_source"]
