"""Every check that runs before Ray starts or an MLflow run is created.

A mistake in a job's input (config, data location, a model that cannot be built, a run folder or
store that cannot be written, a tracking server that does not answer) costs one line and leaves
nothing behind. The checks create nothing: a folder is checked on its nearest existing ancestor.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rna_core.builders import effective_train_config, model_structure
from rna_core.config import Config, flatten
from rna_core.data.parquet import check_parquet_dataset, dataset_exists, dataset_rows
from rna_core.data.torchvision_data import TORCHVISION_FOLDERS, load_torchvision_cifar
from rna_core.errors import ConfigError, DatasetNotFoundError
from rna_core.paths import check_strategy

from .run_folder import filesystem, is_uri, join

# What a resumed run must share with the run it continues (the network it trains).
MODEL_IDENTITY_KEYS = ("model.name", "model.method", "model.norm", "model.precisions", "data.dataset")
CIFAR_TRAIN_ROWS = 50_000  # CIFAR-10 and CIFAR-100 both have 50,000 training images

Echo = Callable[[str], None]


def check_writable_folder(path: str, what: str) -> None:
    """ConfigError unless the local folder `path` exists or can be created, and can be written.

    URIs (s3://, gs://, http://) are left to their clients.
    """
    if is_uri(path) and not path.startswith("file://"):
        return
    target = Path(path[len("file://") :] if path.startswith("file://") else path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {target} cannot be created: {probe} is a file, not a folder; choose another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {target} is not writable (no write permission on {probe}); choose another place")


def check_object_store(uri: str, what: str, timeout_s: float = 5.0) -> None:
    """An object-store URI must be reachable (one line after `timeout_s`, not minutes of retries).

    S3 clients retry an endpoint that does not answer for minutes; the endpoint (`AWS_ENDPOINT_URL`,
    e.g. a MinIO or moto server) is probed first, then the bucket is looked up.
    """
    if not uri.startswith("s3://"):
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urllib.parse.urlsplit(endpoint)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout_s).close()
        except OSError as e:
            raise ConfigError(
                f"{what} {uri}: the object store {endpoint} (AWS_ENDPOINT_URL) is not reachable ({e.strerror or e}); "
                "start it or fix AWS_ENDPOINT_URL"
            ) from None
    bucket = uri[len("s3://") :].split("/", 1)[0]
    try:
        fs, path = filesystem(f"s3://{bucket}")
        found = fs.get_file_info(path).type
    except OSError as e:
        raise ConfigError(
            f"{what} {uri}: the object store refused the request ({' '.join(str(e).split())[:200]})"
        ) from None
    if found == pafs.FileType.NotFound:
        raise ConfigError(f"{what} {uri}: the bucket {bucket} does not exist; create it or fix the URI")


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """The MLflow store must be usable: a local one creatable, a tracking server answering.

    An unreachable server otherwise hangs in MLflow's own retries for minutes before the first
    run is created; here it is one line after `timeout_s`.
    """
    if uri.startswith("sqlite:///"):
        check_writable_folder(str(Path(uri[len("sqlite:///") :]).parent), "the MLflow store's folder")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # the server answered (a proxy may not route /health): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                f"the MLflow tracking server {uri} is not reachable ({reason}); start it or fix MLFLOW_TRACKING_URI"
            ) from None
    elif not is_uri(uri):
        check_writable_folder(uri, "the MLflow store")


def is_driver_local(uri: str) -> bool:
    """Whether only this machine's disk can serve `uri` (a path, file://, a SQLite or file MLflow store)."""
    return not is_uri(uri) or uri.startswith(("file://", "sqlite://"))


def check_cluster_paths(cfg: Config, tracking_uri: str, where: str) -> None:
    """Workers on other nodes share no disk with the driver: refuse settings only its disk serves.

    `where` says why it matters (e.g. "the cluster at ... runs workers on 2 other node(s)").
    Train workers write checkpoints to `ray.storage_path`, read `data.data_dir` and log metrics
    to the tracking store; on another node a local path is another disk, so the driver would
    never see what they wrote.
    """
    if is_driver_local(cfg.ray.storage_path):
        raise ConfigError(
            f"ray.storage_path {cfg.ray.storage_path} is on the driver's disk but {where}; "
            "use an object-store URI, e.g. --set ray.storage_path=s3://BUCKET/ray_results"
        )
    if cfg.data.dataset != "synthetic" and is_driver_local(cfg.data.data_dir or "./data"):
        raise ConfigError(
            f"data.data_dir {cfg.data.data_dir} is on the driver's disk but {where}; upload the Parquet files and "
            "use their object-store URI, e.g. --set data.data_dir=s3://BUCKET/data/cifar10"
        )
    if is_driver_local(tracking_uri):
        raise ConfigError(
            f"the MLflow store {tracking_uri} is on the driver's disk but {where}; "
            "set MLFLOW_TRACKING_URI=http://HOST:PORT of a tracking server that every node reaches"
        )


def check_compatible(stored_flat: dict[str, Any], cfg: Config, run_dir: str) -> None:
    """A resumed run must train the same network; refuse a different model before Ray starts."""
    flat = flatten(cfg)
    for key in MODEL_IDENTITY_KEYS:
        if key in stored_flat and str(stored_flat[key]) != str(flat.get(key)):
            raise ConfigError(
                f"cannot resume {run_dir}: it trains {key}={stored_flat[key]} but the config says {flat.get(key)}; "
                "resume with the run's own config (omit --config) or pick a new mlflow.run_name"
            )


def check_val_size(cfg: Config, train_rows: int) -> None:
    """The validation split must leave every worker training rows (one line before Ray, not in a worker)."""
    d = cfg.data
    if d.val_size and train_rows - d.val_size < cfg.ray.num_workers:
        raise ConfigError(
            f"data.val_size ({d.val_size}) leaves {max(train_rows - d.val_size, 0)} of the {train_rows} "
            "training images "
            f"for {cfg.ray.num_workers} worker(s); lower data.val_size"
        )


def check_data(cfg: Config, echo: Echo | None = None) -> None:
    """Fail fast (one line) when the dataset is not where the config says; download once if asked.

    Downloading here, on the driver, keeps N workers from racing to download into one folder.
    """
    d = cfg.data
    if d.dataset == "synthetic":
        return
    root = d.data_dir or "./data"
    check_object_store(root, "data.data_dir")
    for split in ("train", "test"):
        if dataset_exists(join(root, f"{split}.parquet")):
            check_parquet_dataset(join(root, f"{split}.parquet"))  # corrupt or foreign: one line, before Ray
            if split == "train":
                check_val_size(cfg, dataset_rows(join(root, "train.parquet")))
            continue
        if is_uri(root):
            raise DatasetNotFoundError(
                f"no {split}.parquet under {root}; upload the files written by "
                f"`python jobs/prepare_data.py --dataset {d.dataset} --out DIR` there"
            )
        if (Path(root) / TORCHVISION_FOLDERS[d.dataset]).is_dir():
            if split == "train":
                check_val_size(cfg, CIFAR_TRAIN_ROWS)
            continue
        if d.download:
            if echo:
                echo(f"downloading {d.dataset} ({split}) to {root} ...")
            load_torchvision_cifar(d.dataset, root=root, train=split == "train", download=True)
            if split == "train":
                check_val_size(cfg, CIFAR_TRAIN_ROWS)
            continue
        raise DatasetNotFoundError(
            f"{d.dataset} data not found in {root} (neither {split}.parquet nor torchvision files); "
            f"run `python jobs/prepare_data.py --dataset {d.dataset} --out DIR` and set data.data_dir=DIR, "
            "or set data.download=true"
        )


def check_gpu_request(cfg: Config) -> None:
    """GPU settings Ray would only reject after the run was opened, or run wrongly.

    `gpus_per_worker` 0 with GPUs in use fails inside Ray Train; a fraction below 1 with several
    workers lets Ray put two NCCL ranks on one GPU ("Duplicate GPU detected"); above 1, Ray
    takes whole GPUs only.
    """
    r = cfg.ray
    if str(r.use_gpu).lower() == "false":
        return
    if r.gpus_per_worker <= 0:
        raise ConfigError(
            f"ray.gpus_per_worker is 0 but ray.use_gpu is {str(r.use_gpu).lower()}; set ray.gpus_per_worker=1, "
            "or ray.use_gpu=false to train on CPU"
        )
    if r.gpus_per_worker < 1 and r.num_workers > 1:
        raise ConfigError(
            f"ray.gpus_per_worker={r.gpus_per_worker:g} with ray.num_workers={r.num_workers} can put two NCCL ranks "
            "on one GPU, which NCCL refuses; use ray.gpus_per_worker=1 (one GPU per worker)"
        )
    if r.gpus_per_worker > 1 and r.gpus_per_worker != int(r.gpus_per_worker):
        raise ConfigError(
            f"ray.gpus_per_worker={r.gpus_per_worker:g}: above 1, Ray gives whole GPUs only; use 1, 2, ..."
        )


def check_training_config(cfg: Config) -> None:
    """Checks that need no data and no cluster: the model builds, the batch fits the workers."""
    check_gpu_request(cfg)
    effective_train_config(cfg)  # method-specific training choices can contradict each other
    structure = model_structure(cfg)  # groups that do not divide a layer's channels, etc.
    check_strategy(structure, cfg.train.sampling)  # e.g. a fixed: path of the wrong length
    check_writable_folder(cfg.ray.storage_path, "ray.storage_path")
    if cfg.data.batch_size < cfg.ray.num_workers:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) is the global batch and must be >= ray.num_workers "
            f"({cfg.ray.num_workers}); raise the batch or use fewer workers"
        )
    if cfg.data.dataset == "synthetic":
        n = cfg.data.train_limit or cfg.data.synthetic_size
        if min(n, cfg.data.synthetic_size) < cfg.ray.num_workers:
            raise ConfigError(f"the training set ({n} images) is smaller than ray.num_workers ({cfg.ray.num_workers})")
        check_val_size(cfg, cfg.data.synthetic_size)


__all__ = [
    "MODEL_IDENTITY_KEYS",
    "check_cluster_paths",
    "check_compatible",
    "check_object_store",
    "check_data",
    "check_gpu_request",
    "check_tracking_store",
    "check_training_config",
    "check_val_size",
    "check_writable_folder",
    "is_driver_local",
]
