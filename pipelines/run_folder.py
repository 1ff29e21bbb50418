"""Where a job's files go: the base folder, local paths and object-store URIs, job files.

Relative paths in a config (`ray.storage_path`, `data.data_dir`) and the default MLflow store
(`mlflow.db`, `mlruns/`) resolve against a base folder: `$RNA_BASE_DIR` if set, else the current
directory. Under `ray job submit` the current directory is Ray's temporary copy of the working
dir (deleted later, without the git-ignored data), so there the base is `~/rna_platform` unless
`RNA_BASE_DIR` says otherwise (`infra/start_local.sh` sets it to the repository, so jobs
submitted to that cluster write where `mlflow ui` looks).

A job's folder holds a JSON job file (`rna_job.json` of a training run, `rna_sweep.json` of a
sweep, `evaluation.json` of an evaluation) naming its config and its MLflow run, so running the
same command again continues the same job. Job files are written atomically (a temporary file
renamed over the old one on local disks; one whole object on object stores).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rna_core.config import Config
from rna_core.errors import ConfigError

JOB_FILE = "rna_job.json"
BASE_DIR_ENV = "RNA_BASE_DIR"
JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver


def under_job_submission() -> bool:
    return JOB_SUBMISSION_ENV in os.environ


def base_dir() -> Path:
    """The folder relative paths resolve against (see the module docstring)."""
    env = os.environ.get(BASE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    if under_job_submission():
        return (Path.home() / "rna_platform").resolve()
    return Path.cwd().resolve()


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str, base: Path | None = None) -> str:
    """`path` made absolute against `base` (default: the base folder); URIs unchanged."""
    return path if is_uri(path) else str(((base or base_dir()) / Path(path).expanduser()).resolve())


def join(base: str, leaf: str) -> str:
    """`base/leaf` for local folders and URIs alike."""
    return f"{base.rstrip('/')}/{leaf}" if is_uri(base) else str(Path(base) / leaf)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path on it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Make `ray.storage_path` and `data.data_dir` absolute, so workers (other cwd) agree."""
    base = base or base_dir()
    data_dir = cfg.data.data_dir
    if cfg.data.dataset != "synthetic":
        data_dir = absolute(data_dir or "./data", base)
    return replace(
        cfg,
        data=replace(cfg.data, data_dir=data_dir),
        ray=replace(cfg.ray, storage_path=absolute(cfg.ray.storage_path, base)),
    )


def resolve_run_dir(run_dir: str) -> str:
    """The absolute form of a run folder given on the command line (`--resume`)."""
    return absolute(run_dir.rstrip("/"))


def read_job_file(folder: str, name: str = JOB_FILE) -> dict[str, Any] | None:
    """The job file `name` of a folder, or None when the folder holds no job of ours."""
    fs, path = filesystem(join(folder, name))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read().decode(errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{join(folder, name)} is not valid JSON ({e.msg}); restore it or choose another run folder"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{join(folder, name)} does not hold a job record; restore it or choose another run folder")
    return data


def write_job_file(folder: str, data: dict[str, Any], name: str = JOB_FILE) -> None:
    """Write the job file `name` of a folder atomically (the one JSON write of every job)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    if is_uri(folder):
        fs, path = filesystem(join(folder, name))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, Path(folder) / name)


def copy_to_local(folder: str, local: str) -> None:
    """Copy an object-store folder (or a local one) into the local folder `local`."""
    fs, path = filesystem(folder)
    pafs.copy_files(path, local, source_filesystem=fs)


__all__ = [
    "BASE_DIR_ENV",
    "JOB_FILE",
    "absolute",
    "base_dir",
    "copy_to_local",
    "exists",
    "filesystem",
    "is_uri",
    "join",
    "read_job_file",
    "resolve_paths",
    "resolve_run_dir",
    "under_job_submission",
    "write_job_file",
]
