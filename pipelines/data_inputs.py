"""Which data a run used, as MLflow dataset inputs: training, validation and evaluation rows.

Each input names its source (the Parquet file's URI, the torchvision folder, or the synthetic
generator), the split, how many rows were used out of how many (`data.train_limit`,
`data.val_size`, `data.eval_limit` / `--limit` pick fixed subsets, rna_core.data.subsets) and two
digests: the dataset digest is that of the decoded rows themselves (`ImageTensorDataset.
content_digest`, what the evaluation job's fingerprint uses), so two runs on different rows never
look alike in the UI and a training run's held-out slice matches an evaluation with the same
`--limit`; the profile adds a digest of the Parquet file's bytes. The training job logs its
inputs from rank 0, where the rows are loaded anyway; the evaluation job from its driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rna_core.config import Config
from rna_core.data import ImageTensorDataset
from rna_core.data.datasets import load_dataset
from rna_core.data.parquet import dataset_exists, dataset_rows
from rna_core.data.subsets import DATA_SEED
from rna_core.data.torchvision_data import TORCHVISION_FOLDERS

from .run_folder import filesystem, is_uri, join

CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI shows beside a run's dataset
TRAINING, VALIDATION, EVALUATION = "training", "validation", "evaluation"
SCHEMA = {  # the columns of a dataset file (DESIGN: Parquet with image bytes and int16 labels)
    "mlflow_colspec": [
        {"type": "binary", "name": "image", "required": True},
        {"type": "integer", "name": "label", "required": True},
    ]
}
CIFAR_ROWS = {"train": 50_000, "test": 10_000}  # torchvision's CIFAR-10 and CIFAR-100 splits
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (uri, size, mtime) -> digest, per process


@dataclass(frozen=True)
class DataInput:
    """One dataset a run used, in the form MLflow stores (`to_entity`)."""

    context: str  # training | validation | evaluation
    name: str  # e.g. cifar10-train
    digest: str  # of the decoded rows
    source_type: str  # local | s3 | ... | code (generated in memory)
    source: dict[str, Any]
    profile: dict[str, Any] = field(default_factory=dict)

    def to_entity(self) -> Any:  # -> mlflow.entities.DatasetInput
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=self.name,
            digest=self.digest,
            source_type=self.source_type,
            source=json.dumps(self.source, sort_keys=True),
            schema=json.dumps(SCHEMA),
            profile=json.dumps(self.profile, sort_keys=True),
        )
        return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, self.context)])


def file_digest(uri: str) -> str | None:
    """blake2b (16 hex digits) of a file's bytes, local or on an object store; None if it is absent."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    key = (uri, int(info.size or 0), int(info.mtime_ns or 0))
    if key not in _FILE_DIGESTS:
        h = hashlib.blake2b(digest_size=8)
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def _source(cfg: Config, split: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(source type, source, profile entries about the source) of one split of the config's dataset."""
    d = cfg.data
    if d.dataset == "synthetic":
        source = {"generator": "rna_core.data.make_synthetic", "seed": DATA_SEED, "size": d.synthetic_size}
        return "code", source, {}
    root = d.data_dir or "./data"
    parquet = join(root, f"{split}.parquet")
    digest = file_digest(parquet)
    if digest is not None:
        uri = parquet if is_uri(parquet) else f"file://{parquet}"
        return uri.split("://", 1)[0], {"uri": uri}, {"file_digest": digest, "format": "parquet"}
    folder = join(root, TORCHVISION_FOLDERS.get(d.dataset, ""))
    uri = folder if is_uri(folder) else f"file://{folder}"
    return uri.split("://", 1)[0], {"uri": uri}, {"format": "torchvision"}


def file_rows(cfg: Config, split: str) -> int:
    """Rows of the whole split (before any subset): the Parquet footer, CIFAR's sizes, or the generator's."""
    d = cfg.data
    if d.dataset == "synthetic":
        return len(load_dataset("synthetic", split, synthetic_size=d.synthetic_size, seed=DATA_SEED))
    parquet = join(d.data_dir or "./data", f"{split}.parquet")
    if dataset_exists(parquet):
        return dataset_rows(parquet)
    return CIFAR_ROWS[split]


def data_input(cfg: Config, context: str, split: str, rows: ImageTensorDataset, subset: str) -> DataInput:
    """The input `rows` (the rows actually used) of `split` of the config's dataset, under `context`."""
    source_type, source, about = _source(cfg, split)
    part = {TRAINING: "train", VALIDATION: "val", EVALUATION: "test"}[context]
    profile = {
        "rows": len(rows),
        "split": split,
        "file_rows": file_rows(cfg, split),
        "subset": subset,
        "classes": len(rows.classes),
        **about,
    }
    return DataInput(context, f"{cfg.data.dataset}-{part}", rows.content_digest(), source_type, source, profile)


def subset_text(used: int, of: int, what: str) -> str:
    """How `used` rows were picked from `of` (the profile's `subset`)."""
    return f"all {of} rows" if used >= of else f"{used} of {of} rows (a fixed subset, {what})"


def training_inputs(
    cfg: Config, train_rows: ImageTensorDataset, val_rows: ImageTensorDataset | None, held_out: ImageTensorDataset
) -> list[DataInput]:
    """The training run's inputs: the rows it trains on, its validation split, its held-out slice."""
    d = cfg.data
    n_train, n_test = file_rows(cfg, "train"), file_rows(cfg, "test")
    n_val = len(val_rows) if val_rows is not None else 0
    train_subset = subset_text(len(train_rows), n_train - n_val, "data.train_limit")
    if n_val:
        train_subset += f"; {n_val} other rows held out for validation (data.val_size)"
    inputs = [data_input(cfg, TRAINING, "train", train_rows, train_subset)]
    if val_rows is not None:
        text = f"{n_val} of {n_train} training rows (a fixed subset, data.val_size), never trained on"
        inputs.append(data_input(cfg, VALIDATION, "train", val_rows, text))
    held = subset_text(len(held_out), n_test, f"data.eval_limit={d.eval_limit}")
    inputs.append(data_input(cfg, EVALUATION, "test", held_out, held))
    return inputs


def evaluation_input(cfg: Config, rows: ImageTensorDataset, limit: int) -> DataInput:
    """The evaluation job's test rows (`--limit`: the same rows as a training run's data.eval_limit)."""
    text = subset_text(len(rows), file_rows(cfg, "test"), f"--limit {limit}")
    return data_input(cfg, EVALUATION, "test", rows, text)


def log_inputs(client: Any, run_id: str, inputs: Iterable[DataInput]) -> None:
    """Attach the inputs to the run (logging the same input again changes nothing)."""
    entities = [i.to_entity() for i in inputs]
    if entities:
        client.log_inputs(run_id, datasets=entities)


def metric_dataset(inputs: Iterable[DataInput], context: str = EVALUATION) -> Mapping[str, str]:
    """{dataset_name, dataset_digest} of the input under `context`, for metrics computed on it."""
    for i in inputs:
        if i.context == context:
            return {"dataset_name": i.name, "dataset_digest": i.digest}
    return {}


__all__ = [
    "CONTEXT_TAG",
    "DataInput",
    "EVALUATION",
    "TRAINING",
    "VALIDATION",
    "data_input",
    "evaluation_input",
    "file_digest",
    "file_rows",
    "log_inputs",
    "metric_dataset",
    "subset_text",
    "training_inputs",
]
