"""The attack-evaluation fan-out: units of work as Ray tasks, a resumable result store, MLflow.

    from pipelines.evaluate import EvalOptions, evaluate
    out = evaluate(checkpoint="ray_results/<run>/.../checkpoint.pt", options=EvalOptions(attacks=("fgsm",)))

Why units. An evaluation is attacks x protocols x trials over the test set; a *unit* is one
(attack, protocol, trial, shard), a shard being a run of consecutive batches. A unit calls
`rna_core.evaluation.evaluate_batch` on each of its batches with the seed that the sequential
`evaluate_model` gives that batch (`batch_seed(trial_seed(seed, trial), batch index)`), so its
counts are a pure function of (weights, shard, attack, protocol, trial seed): the summed counts
equal the sequential run's exactly, whatever ran where, in which order, on how many workers.

What is stored. The output folder (`eval_results/<source>-<fingerprint>` under the base folder)
holds `units/<unit id>.parquet`, one atomically written file per finished unit, so a re-run of
the same command skips what is done and an interrupted evaluation resumes; `results.parquet`,
the rows of DESIGN.md section 2 summed over shards (merged by row key: never a duplicate row);
Markdown tables; path-analysis data and plots; and `evaluation.json` (what was evaluated, which
MLflow run it logs to). The fingerprint covers everything that changes a unit's counts except
the attack and its settings, which are part of the unit id.

Ray. The weights and the test images are put in the object store once; a task receives their
references (nested, so Ray does not fetch them for it) and fetches and builds them only when its
worker process has not done so already. Each task asks for `cpus_per_task` CPUs and, when the
cluster has GPUs, `gpus_per_task` of a GPU; the driver keeps at most `max_in_flight` tasks in
flight (`ray.wait`), and Ray retries a failed task (`max_retries`, `retry_exceptions=True`).

MLflow. `--run-id` logs a nested run under the training run (same experiment, tag
`mlflow.parentRunId`); a bare checkpoint gets a run of its own. Metrics `acc_<attack>_<protocol>`
(mean over trials) and `acc_<attack>_<protocol>_std`; artifacts: the Parquet table, the
paper-style tables, the stability summary, the path-analysis plots. A re-run reopens the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rna_core.attacks.registry import Attack, attack_spec, get_attack
from rna_core.checkpoint import PREDATES_HINT, checkpoint_config, identity_mismatch, model_identity, read_checkpoint
from rna_core.config import Config, ScalingConfig, apply_overrides, config_from_dict, flatten, to_dict
from rna_core.data import BatchIterator, ImageTensorDataset, load_dataset
from rna_core.errors import CheckpointMismatchError, ConfigError
from rna_core.evaluation import (
    DEFAULT_EOT_ITER,
    PAPER_COLUMNS,
    ResultRow,
    accuracy_vs_distance,
    batch_seed,
    evaluate_batch,
    method_label,
    read_rows_parquet,
    render_markdown,
    save_distance_analysis,
    save_transfer_matrix,
    stability,
    stability_table,
    transfer_matrix,
    trial_seed,
    write_rows_parquet,
)
from rna_core.evaluation.protocols import check_protocol
from rna_core.paths import check_strategy, count_paths
from rna_core.selection import SELECTION_LABELS, SELECTIONS

from . import tracking
from .train_loop import CHECKPOINT_FILE, DATA_SEED, build_model, fixed_subset, state_digest

DEFAULT_ATTACKS: tuple[str, ...] = tuple(a for _, a in PAPER_COLUMNS) + ("eot_pgd", "autoattack_rand")
DEFAULT_PROTOCOLS: tuple[str, ...] = ("transfer", "eot")
CHECKPOINT_ARTIFACT = f"checkpoint/{CHECKPOINT_FILE}"  # where pipelines.trainer logs the final checkpoint
RESULTS_DIR = "eval_results"
STATE_FILE = "evaluation.json"
RESULTS_FILE = "results.parquet"
TABLES_FILE = "results.md"
STABILITY_FILE = "stability.md"
UNITS_DIR = "units"
PATHS_DIR = "path_analysis"
FAIL_ONCE_ENV = "RNA_EVAL_FAIL_ONCE_MARKER"  # test hook read by jobs/evaluate.py

Echo = Callable[[str], None]

UNIT_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("attack", pa.string()),
        ("settings", pa.string()),  # the attack's full settings, JSON
        ("protocol", pa.string()),
        ("trial", pa.int32()),
        ("seed", pa.int64()),  # the trial's seed
        ("first", pa.int64()),  # examples [first, stop) of the evaluated set
        ("stop", pa.int64()),
        ("n", pa.int64()),
        ("correct", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


# ----------------------------------------------------------------------------- options and plan


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how to spread it; None means "from the checkpoint's config"."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    trials: int = 1
    limit: int = 0  # examples of the test set (a fixed subset spread over classes); 0 = all
    batch_size: int | None = None  # None: data.eval_batch_size
    seed: int = 0
    eot_iter: int = DEFAULT_EOT_ITER
    strategy: str | None = None  # path strategy of the protocols; None: train.sampling
    shard_size: int = 1024  # examples per unit, rounded up to whole batches
    attack_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # [0, 1] units, as the registry
    include_natural: bool = True  # clean accuracy, scored like every attack (the tables' first column)
    path_analysis: int = 256  # examples for accuracy-vs-distance and the transfer matrix; 0 = skip
    path_attack: str = "pgd20"
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.25  # used only when the cluster has GPUs
    max_in_flight: int | None = None  # None: twice the tasks the cluster can run at once
    max_retries: int = 2
    out_dir: str | None = None
    progress_every: float = 10.0  # seconds between progress lines
    fail_once_marker: str | None = None  # test hook: the first unit to create this file raises once


@dataclass
class ModelSource:
    """Where the weights come from, loaded and checked (no Ray, no MLflow writes)."""

    kind: str  # "run" or "checkpoint"
    label: str  # for the output folder name
    description: str  # for humans and the MLflow tag
    cfg: Config
    state: dict[str, torch.Tensor]
    weights_digest: str
    tracking_uri: str
    parent_run_id: str | None = None  # the training run (kind "run")
    parent_experiment_id: str | None = None
    training_run_id: str | None = None  # the run a bare checkpoint came from, when it says
    selection: str | None = None  # None: a last-epoch checkpoint; "val" | "test": a selected epoch (rna_core.selection)
    selected_epoch: int | None = None

    @property
    def checkpoint_label(self) -> str:
        """Which checkpoint of its run this is, as rows, tables and MLflow name it."""
        return SELECTION_LABELS[self.selection]


@dataclass(frozen=True)
class Unit:
    attack: str
    settings_hash: str
    protocol: str
    trial: int
    first: int
    stop: int

    @property
    def unit_id(self) -> str:
        return f"{self.attack}-{self.settings_hash}_{self.protocol}_t{self.trial}_{self.first}-{self.stop}"


@dataclass
class EvalPlan:
    source: ModelSource
    options: EvalOptions  # with batch_size and strategy filled in
    attacks: list[Attack]
    dataset: ImageTensorDataset
    data_digest: str
    fingerprint: str
    out_dir: Path
    units: list[Unit]
    row_meta: dict[str, str]  # model, method, dataset (run_id is known once MLflow is open)

    @property
    def groups(self) -> list[tuple[str, str, int]]:
        return [(a.name, p, t) for t in range(self.options.trials) for a in self.attacks for p in self.options.protocols]


@dataclass
class EvalOutcome:
    """What a finished evaluation tells its caller (and what `jobs/evaluate.py` prints)."""

    out_dir: str
    results_path: str
    rows: list[ResultRow]  # this command's rows
    tables: str
    stability: str
    mlflow: tracking.RunRef
    parent_run_id: str | None
    units_total: int
    units_skipped: int  # already done by an earlier run
    units_run: int
    seconds: float
    metrics: dict[str, float]
    path_analysis: dict[str, str] = field(default_factory=dict)


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()[:n]


# Version of the scoring rules a unit's counts depend on beyond its settings (2: the unperturbed
# rule for every attack under transfer and eot, issue 13). Units stored under another version are
# other units, so an earlier evaluation's counts are never mixed with this code's.
SCORING_RULES = 2


def settings_hash(attack: Attack) -> str:
    """Short hash of an attack's full settings: a unit run with other settings is another unit."""
    return _hash({"name": attack.name, "settings": attack.settings, "rules": SCORING_RULES}, 8)


def data_digest(ds: ImageTensorDataset) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(ds.images.contiguous().numpy().tobytes())
    h.update(ds.labels.contiguous().numpy().tobytes())
    h.update(json.dumps(list(ds.classes)).encode())
    return h.hexdigest()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    return config_from_dict(apply_overrides(to_dict(cfg), list(overrides))) if overrides else cfg


def _source_from_payload(payload: dict[str, Any], where: str, overrides: Sequence[str]) -> tuple[Config, dict, str]:
    """Config (with overrides and absolute paths), checked weights and their digest."""
    from .trainer import resolve_paths

    cfg = checkpoint_config(payload)
    if cfg is None:
        raise ConfigError(f"checkpoint {where} holds no config; evaluate checkpoints written by jobs/train.py")
    # Where training ran (e.g. `ray.address: local`, `use_gpu: false`) says nothing about where
    # this evaluation runs: the ray section starts from the defaults (`--set ray.*` still applies).
    cfg = replace(cfg, ray=ScalingConfig())
    cfg = resolve_paths(_apply_overrides(cfg, overrides))
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (NotImplementedError, RuntimeError):
        model = build_model(cfg)
    mismatch = identity_mismatch(payload["identity"], model_identity(model), "config")
    if mismatch is not None:
        diffs, predates = mismatch
        hint = PREDATES_HINT if predates else "do not override model.* keys"
        raise CheckpointMismatchError(f"checkpoint {where} does not match its model settings ({diffs}); {hint}")
    state = payload["model"]
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointMismatchError(f"checkpoint {where} lacks weights for {missing[0]} (and {len(missing) - 1} more); it does not fit the model")
    for key, tensor in model.state_dict().items():  # shapes too: a mismatch would only fail inside a Ray task
        got = tuple(getattr(state[key], "shape", ()))
        if got != tuple(tensor.shape):
            raise CheckpointMismatchError(f"checkpoint {where}: {key} has shape {list(got)}, the model needs {list(tensor.shape)}; it does not fit the model")
    return cfg, state, state_digest(state)


def _local_checkpoint(path: str) -> Path:
    """A checkpoint path as given (relative to the current folder), else under the base folder."""
    from .trainer import base_dir

    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (base_dir() / p).resolve()


def _selection_of(payload: Mapping[str, Any], where: str) -> tuple[str | None, int | None]:
    """(selection, epoch) a checkpoint says it holds: written by training as `selected_on`."""
    which = (payload.get("extra") or {}).get("selected_on")
    if which is None:
        return None, None
    if which not in SELECTIONS:
        raise ConfigError(f"checkpoint {where} says it was selected on '{which}', which this code does not know; update the code")
    return str(which), int(payload.get("epoch", 0))


def load_source(
    run_id: str | None = None, checkpoint: str | None = None, overrides: Sequence[str] = (), selected: str | None = None
) -> ModelSource:
    """The model to evaluate: the checkpoint artifact of MLflow run `run_id`, or a local `checkpoint`.

    `selected` ("val" | "test", with `run_id`) takes the run's selected checkpoint
    (`selected_<which>/checkpoint.pt`) instead of the last epoch's. A checkpoint written as a
    selected one says so itself, so rows of a `checkpoint` are labelled as well.
    Writes nothing: an unknown run, a missing store or a missing file is a ConfigError.
    """
    from .trainer import base_dir, check_tracking_store

    if (run_id is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --run-id RUN_ID or --checkpoint PATH")
    if selected is not None and selected not in SELECTIONS:
        raise ConfigError(f"--selected '{selected}' is unknown; valid: {', '.join(SELECTIONS)}")
    if selected is not None and checkpoint is not None:
        raise ConfigError("--selected picks a checkpoint of a training run (--run-id); with --checkpoint, pass the selected file itself "
                          "(<run folder>/selected_<val|test>/checkpoint.pt)")
    uri = tracking.resolve_tracking_uri(base_dir())
    check_tracking_store(uri)  # an unreachable server: one line, not minutes of MLflow retries
    if checkpoint is not None:
        path = _local_checkpoint(checkpoint)
        payload = read_checkpoint(path)
        cfg, state, digest = _source_from_payload(payload, f"'{checkpoint}'", overrides)
        trained_in = (payload.get("extra") or {}).get("mlflow_run_id")
        which, epoch = _selection_of(payload, f"'{checkpoint}'")
        return ModelSource(
            "checkpoint", f"ckpt-{_safe(path.parent.name)}-{digest[:8]}", str(path), cfg, state, digest, uri,
            training_run_id=str(trained_in) if trained_in else None, selection=which, selected_epoch=epoch,
        )
    run_id = run_id.strip()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(f"MLflow run '{run_id}' not found: there is no MLflow store at {uri}; set MLFLOW_TRACKING_URI to the store jobs/train.py used")
    from mlflow.exceptions import MlflowException

    client = tracking.client_for(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow run '{run_id}' not found in {uri}; pass the run id printed by jobs/train.py (or set MLFLOW_TRACKING_URI)") from None
    artifact = CHECKPOINT_ARTIFACT if selected is None else selected_artifact(selected)
    names = {a.path for a in client.list_artifacts(run_id, artifact.rsplit("/", 1)[0])}
    if artifact not in names:
        if selected is not None:
            how = "data.val_size > 0" if selected == "val" else "train.select_on_test=true"
            raise ConfigError(f"MLflow run '{run_id}' has no {artifact} artifact: it made no selection on {selected} "
                              f"(train with {how}); evaluate its last epoch without --selected")
        raise ConfigError(f"MLflow run '{run_id}' has no {artifact} artifact (did its training finish?); evaluate a --checkpoint instead")
    with tempfile.TemporaryDirectory(prefix="rna-eval-ckpt-") as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        payload = read_checkpoint(local)
    cfg, state, digest = _source_from_payload(payload, f"of run '{run_id}'", overrides)
    which, epoch = _selection_of(payload, f"{artifact} of run '{run_id}'")
    if which != selected:
        raise ConfigError(f"{artifact} of run '{run_id}' holds a checkpoint {SELECTION_LABELS[which]}, not {SELECTION_LABELS[selected]}")
    label = f"run-{_safe(run_id)}" + (f"-selected-{selected}" if selected else "")
    return ModelSource(
        "run", label, f"runs:/{run_id}/{artifact}", cfg, state, digest, uri,
        parent_run_id=run_id, parent_experiment_id=run.info.experiment_id, training_run_id=run_id,
        selection=which, selected_epoch=epoch,
    )


def selected_artifact(which: str) -> str:
    """Where pipelines.trainer logs a run's selected checkpoint (beside checkpoint/, the last epoch)."""
    return f"selected_{which}/{CHECKPOINT_FILE}"


def resolve_attacks(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]], include_natural: bool) -> list[Attack]:
    """Attack objects (natural first unless excluded); unknown names or settings are ConfigErrors."""
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise ConfigError("no attacks given; e.g. --attacks fgsm,pgd20")
    for n in list(names) + list(settings):
        attack_spec(n)  # unknown names: one line listing the valid ones
    unused = sorted(set(settings) - set(names) - {"natural"})
    if unused:
        raise ConfigError(f"settings given for attack(s) {', '.join(unused)} that are not evaluated; add them to --attacks")
    if len(set(names)) != len(names):
        raise ConfigError(f"attack names must be unique, got {', '.join(names)}")
    if include_natural and "natural" not in names:
        names.insert(0, "natural")
    return [get_attack(n, **dict(settings.get(n, {}))) for n in names]


def plan_evaluation(source: ModelSource, options: EvalOptions = EvalOptions()) -> EvalPlan:
    """Validate the options, load the test set and list the units (no Ray, nothing written)."""
    from .trainer import base_dir

    cfg = source.cfg
    o = replace(
        options,
        batch_size=options.batch_size if options.batch_size is not None else cfg.data.eval_batch_size,
        strategy=options.strategy or cfg.train.sampling,
        attacks=tuple(a.strip().lower() for a in options.attacks),
        protocols=tuple(p.strip() for p in options.protocols if p.strip()),
    )
    for name, value, low in (("trials", o.trials, 1), ("batch size", o.batch_size, 1), ("shard size", o.shard_size, 1),
                             ("eot_iter", o.eot_iter, 1), ("limit", o.limit, 0), ("path analysis size", o.path_analysis, 0),
                             ("max retries", o.max_retries, 0)):
        if int(value) != value or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value}")
    if o.max_in_flight is not None and o.max_in_flight < 1:
        raise ConfigError(f"max in flight must be >= 1, got {o.max_in_flight}")
    if o.cpus_per_task <= 0 or o.gpus_per_task < 0 or o.gpus_per_task > 1:
        raise ConfigError("cpus per task must be > 0 and gpus per task in [0, 1]")
    if not o.protocols:
        raise ConfigError("no protocols given; e.g. --protocols transfer,eot")
    for p in o.protocols:
        check_protocol(p)
    if len(set(o.protocols)) != len(o.protocols):
        raise ConfigError(f"protocols must be unique, got {', '.join(o.protocols)}")
    structure = build_model_meta(cfg)
    check_strategy(structure, o.strategy)  # e.g. a fixed: path of the wrong length, before any data or cluster
    attacks = resolve_attacks(o.attacks, o.attack_settings, o.include_natural)
    if o.path_analysis:
        get_attack(o.path_attack)

    d = cfg.data
    full = load_dataset(d.dataset, "test", data_dir=d.data_dir, download=False, synthetic_size=d.synthetic_size, seed=DATA_SEED)
    dataset = fixed_subset(full, o.limit)
    if len(dataset) == 0:
        raise ConfigError(f"the {d.dataset} test set is empty; check data.data_dir")
    digest = data_digest(dataset)
    fingerprint = _hash({
        "weights": source.weights_digest, "data": digest, "n": len(dataset), "batch_size": o.batch_size,
        "seed": o.seed, "eot_iter": o.eot_iter, "strategy": o.strategy,
    }, 10)
    out_dir = Path(o.out_dir).expanduser().resolve() if o.out_dir else base_dir() / RESULTS_DIR / f"{source.label}-{fingerprint}"
    check_output_folder(out_dir, fingerprint)

    per_shard = -(-o.shard_size // o.batch_size) * o.batch_size
    bounds = [(s, min(s + per_shard, len(dataset))) for s in range(0, len(dataset), per_shard)]
    units = [
        Unit(a.name, settings_hash(a), p, t, first, stop)
        for t in range(o.trials) for a in attacks for p in o.protocols for first, stop in bounds
    ]
    spec = getattr(structure, "rna_spec", {}) or {}
    method = method_label(spec or {"method": cfg.model.method})
    if source.selection is not None:  # a selected epoch's weights: its own table row, never blended with the last epoch's
        method += f" [{source.checkpoint_label}, epoch {source.selected_epoch}]"
    meta = {"model": str(spec.get("model", cfg.model.name)), "method": method, "dataset": dataset.name}
    return EvalPlan(source, o, attacks, dataset, digest, fingerprint, out_dir, units, meta)


def build_model_meta(cfg: Config) -> torch.nn.Module:
    """The model's structure without weights (cheap; for its spec and path count)."""
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (NotImplementedError, RuntimeError):
        return build_model(cfg)


# ----------------------------------------------------------------------------- the unit store


def unit_path(out_dir: Path, unit: Unit) -> Path:
    return out_dir / UNITS_DIR / f"{unit.unit_id}.parquet"


def done_units(out_dir: Path) -> set[str]:
    """Ids of the units with a result file (complete by construction: written by rename)."""
    folder = out_dir / UNITS_DIR
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.parquet") if not p.name.startswith(".")}


def write_unit(out_dir: Path, unit: Unit, attack: Attack, result: Mapping[str, Any], seed: int) -> Path:
    """One unit's row, atomically (temporary file, then rename): a unit is stored whole or not at all."""
    target = unit_path(out_dir, unit)
    target.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "unit_id": unit.unit_id, "attack": unit.attack, "settings": json.dumps(attack.settings, sort_keys=True),
        "protocol": unit.protocol, "trial": unit.trial, "seed": trial_seed(seed, unit.trial), "first": unit.first,
        "stop": unit.stop, "n": int(result["n"]), "correct": int(result["correct"]), "seconds": float(result["seconds"]),
    }
    table = pa.Table.from_pylist([row], schema=UNIT_SCHEMA)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_unit(out_dir: Path, unit: Unit) -> dict[str, Any]:
    rows = pq.read_table(unit_path(out_dir, unit)).to_pylist()
    if len(rows) != 1 or rows[0]["unit_id"] != unit.unit_id:
        raise ConfigError(f"{unit_path(out_dir, unit)} is not the result of unit {unit.unit_id}; delete it and run again")
    return rows[0]


def _clean_temporaries(out_dir: Path) -> None:
    """Temporary files of a driver killed between writing and renaming (never a result)."""
    for p in (out_dir / UNITS_DIR).glob(".*.tmp") if (out_dir / UNITS_DIR).is_dir() else []:
        p.unlink(missing_ok=True)


def gather_rows(plan: EvalPlan, run_id: str) -> list[ResultRow]:
    """DESIGN.md rows of this plan: each (attack, protocol, trial) summed over its shards."""
    totals: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for unit in plan.units:
        r = read_unit(plan.out_dir, unit)
        acc = totals[(unit.attack, unit.protocol, unit.trial)]
        acc[0] += r["correct"]
        acc[1] += r["n"]
        acc[2] += r["seconds"]
    by_name = {a.name: a for a in plan.attacks}
    rows = []
    for attack_name, protocol, t in plan.groups:
        correct, n, seconds = totals[(attack_name, protocol, t)]
        eps = by_name[attack_name].eps
        rows.append(ResultRow.make(
            run_id=run_id, **plan.row_meta, attack=attack_name, protocol=protocol,
            eps=None if eps is None else round(eps * 255, 6), trial=t, seed=trial_seed(plan.options.seed, t),
            n=int(n), correct=int(correct), seconds=float(seconds),
        ))
    return rows


# ----------------------------------------------------------------------------- the Ray task

_WORKER_CACHE: dict[str, tuple[str, Any]] = {}


class InjectedFailure(RuntimeError):
    """Raised once by the test hook `fail_once_marker` (never in normal use)."""


def fail_once(marker: str | None, unit_id: str) -> None:
    """Test hook: the first caller to create `marker` raises; every later call passes.

    `O_EXCL` makes the creation atomic across processes, so exactly one unit fails once, and
    only Ray's own retry can bring its result back.
    """
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(unit_id)
    raise InjectedFailure(f"injected failure of unit {unit_id} (fail_once_marker test hook)")


def _cached(slot: str, key: str, box: list, build: Callable[[Any], Any]) -> Any:
    """The value of `slot` in this worker process, fetched from the object store only when `key` changed."""
    hit = _WORKER_CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    import ray

    _WORKER_CACHE.pop(slot, None)  # free the old one before fetching the new one
    value = build(ray.get(box[0]))
    _WORKER_CACHE[slot] = (key, value)
    return value


def _build_model(payload: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    from rna_core.config import unflatten

    model = build_model(unflatten(payload["config"]))
    model.load_state_dict(payload["state"])
    return model.to(device).eval()


def _build_data(payload: Mapping[str, Any]) -> ImageTensorDataset:
    return ImageTensorDataset(payload["images"], payload["labels"], list(payload["classes"]), payload["name"])


def _task_context(task: Mapping[str, Any], model_box: list, data_box: list) -> tuple[torch.nn.Module, ImageTensorDataset, torch.device]:
    import ray

    torch.set_num_threads(max(1, int(task["threads"])))
    use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model = _cached("model", f"{task['weights']}@{device}", model_box, lambda p: _build_model(p, device))
    data = _cached("data", task["data"], data_box, _build_data)
    return model, data, device


def evaluate_unit(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: correct predictions of one unit, batch by batch with the sequential run's seeds."""
    fail_once(task.get("fail_once_marker"), task["unit_id"])
    model, data, device = _task_context(task, model_box, data_box)
    attack = get_attack(task["attack"], **task["settings"])
    if settings_hash(attack) != task["settings_hash"]:  # a worker running other code than the driver
        raise ConfigError(f"attack {attack.name} has other settings on this worker than on the driver ({attack.settings}); update the cluster's code")
    bs, first = int(task["batch_size"]), int(task["first"])
    shard = data.subset(torch.arange(first, int(task["stop"])))
    tseed = trial_seed(int(task["seed"]), int(task["trial"]))
    correct = n = 0
    start = time.perf_counter()
    for i, (x, y) in enumerate(BatchIterator(shard, bs, shuffle=False, seed=0, device=device)):
        bseed = batch_seed(tseed, first // bs + i)
        correct += evaluate_batch(model, x, y, attack, task["protocol"], bseed, int(task["eot_iter"]), task["strategy"])
        n += int(y.shape[0])
    return {"unit_id": task["unit_id"], "correct": correct, "n": n, "seconds": time.perf_counter() - start}


def analyze_paths(model_box: list, data_box: list, task: dict[str, Any]) -> dict[str, Any]:
    """Ray task: accuracy vs. attack/inference path distance, and the transfer matrix."""
    model, data, device = _task_context(task, model_box, data_box)
    subset = data.head(int(task["limit"]))
    batches = list(BatchIterator(subset, int(task["batch_size"]), shuffle=False, seed=0, device=device))
    attack = get_attack(task["attack"])
    return {
        "distance": accuracy_vs_distance(model, batches, attack, seed=int(task["seed"])),
        "matrix": transfer_matrix(model, batches, attack, num_paths=4, seed=int(task["seed"])),
    }


# ----------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Units done / total, elapsed and ETA, as a line at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, already: int, echo: Echo, every: float):
        self.total, self.done, self.already = total, already, already
        self.echo, self.every = echo, every
        self.start = time.monotonic()
        self.last = -float("inf")

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        ran = self.done - self.already
        left = self.total - self.done
        eta = _clock(elapsed / ran * left) if ran else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"[evaluate] {self.done}/{self.total} units ({pct:.0f}%)  elapsed {_clock(elapsed)}  eta {eta}"

    def advance(self, k: int = 1) -> None:
        self.done += k
        self.maybe_print(force=self.done == self.total)

    def maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            self.echo(self.line())


# ----------------------------------------------------------------------------- the driver


def _task_resources(options: EvalOptions, use_gpu: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"num_cpus": options.cpus_per_task, "max_retries": options.max_retries, "retry_exceptions": True}
    if use_gpu and options.gpus_per_task > 0:
        res["num_gpus"] = options.gpus_per_task
    return res


def _max_in_flight(options: EvalOptions, use_gpu: bool) -> int:
    """Twice what the cluster runs at once: enough queued to keep it busy, bounded memory."""
    if options.max_in_flight:
        return options.max_in_flight
    import ray

    res = ray.cluster_resources()
    slots = res.get("CPU", 1.0) / options.cpus_per_task
    if use_gpu and options.gpus_per_task > 0:
        slots = min(slots, res.get("GPU", 0.0) / options.gpus_per_task)
    return max(1, int(slots)) * 2


def _use_gpu(cfg: Config) -> bool:
    from .trainer import resolve_use_gpu

    return resolve_use_gpu(cfg)


def _paths_settings(plan: EvalPlan) -> dict[str, Any]:
    o = plan.options
    return {"attack": o.path_attack, "limit": min(o.path_analysis, len(plan.dataset)), "seed": o.seed,
            "batch_size": o.batch_size, "weights": plan.source.weights_digest, "data": plan.data_digest}


def _paths_done(plan: EvalPlan) -> bool:
    f = plan.out_dir / PATHS_DIR / "settings.json"
    return f.is_file() and json.loads(f.read_text()) == _paths_settings(plan)


def _save_paths(plan: EvalPlan, result: Mapping[str, Any]) -> None:
    """Path-analysis files, written into a temporary folder and renamed (whole or not at all)."""
    final = plan.out_dir / PATHS_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{PATHS_DIR}.", dir=plan.out_dir))
    try:
        attack = plan.options.path_attack
        save_distance_analysis(result["distance"], tmp, attack=attack)
        save_transfer_matrix(result["matrix"], tmp, attack=attack)
        (tmp / "settings.json").write_text(json.dumps(_paths_settings(plan), indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fan_out(plan: EvalPlan, todo: list[Unit], echo: Echo, with_paths: bool) -> int:
    """Run `todo` (and the path analysis) as Ray tasks; each finished unit is stored at once.

    Returns the number of units run. On a task that fails after its retries the tasks in flight
    are cancelled and the error propagates; the units stored so far stay (a re-run resumes).
    """
    import ray

    o = plan.options
    use_gpu = _use_gpu(plan.source.cfg)
    resources = _task_resources(o, use_gpu)
    limit = _max_in_flight(o, use_gpu)
    model_box = [ray.put({"config": flatten(plan.source.cfg), "state": plan.source.state})]
    ds = plan.dataset
    data_box = [ray.put({"images": ds.images, "labels": ds.labels, "classes": list(ds.classes), "name": ds.name})]
    common = {"weights": plan.source.weights_digest, "data": plan.data_digest, "threads": max(1, int(o.cpus_per_task)),
              "batch_size": o.batch_size, "seed": o.seed, "eot_iter": o.eot_iter, "strategy": o.strategy}
    by_name = {a.name: a for a in plan.attacks}
    unit_task = ray.remote(evaluate_unit).options(**resources)
    gpu_note = f" + {o.gpus_per_task:g} GPU" if "num_gpus" in resources else ""
    echo(f"[evaluate] {len(todo)} unit(s) to run as Ray tasks ({o.cpus_per_task:g} CPU{gpu_note} each, "
         f"at most {limit} in flight, {o.max_retries} retries)")

    progress = Progress(len(plan.units) + int(with_paths), len(plan.units) - len(todo), echo, o.progress_every)
    in_flight: dict[Any, Unit | None] = {}
    if with_paths:
        paths_task = ray.remote(analyze_paths).options(**resources)
        in_flight[paths_task.remote(model_box, data_box, {**common, **_paths_settings(plan)})] = None
    queue = list(reversed(todo))
    ran = 0
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                u = queue.pop()
                task = {**common, "unit_id": u.unit_id, "attack": u.attack, "settings": dict(o.attack_settings.get(u.attack, {})),
                        "settings_hash": u.settings_hash, "protocol": u.protocol,
                        "trial": u.trial, "first": u.first, "stop": u.stop, "fail_once_marker": o.fail_once_marker}
                in_flight[unit_task.remote(model_box, data_box, task)] = u
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=o.progress_every)
            for ref in ready:
                u = in_flight.pop(ref)
                result = ray.get(ref)  # a task that failed after its retries raises here
                if u is None:
                    _save_paths(plan, result)
                else:
                    write_unit(plan.out_dir, u, by_name[u.attack], result, o.seed)
                    ran += 1
                progress.advance()
            if not ready:
                progress.maybe_print()
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=False)
        raise
    return ran


# ----------------------------------------------------------------------------- MLflow


def _metric_name(attack: str, eps: float | None, protocol: str) -> str:
    spec_eps = attack_spec(attack).defaults.get("eps")
    default = None if spec_eps is None else round(spec_eps * 255, 6)
    tag = f"_eps{eps:g}" if eps is not None and default is not None and attack != "natural" and round(eps, 6) != default else ""
    return f"acc_{attack}{tag}_{protocol}"


def summary_metrics(rows: Sequence[ResultRow]) -> dict[str, float]:
    """`acc_<attack>_<protocol>` (mean over trials) and `..._std` (sample std over trials)."""
    out: dict[str, float] = {}
    for s in stability(rows):
        name = _metric_name(s.attack, s.eps, s.protocol)
        out[name] = s.mean
        out[f"{name}_std"] = s.std
    return out


def _eval_params(plan: EvalPlan) -> dict[str, Any]:
    o = plan.options
    params: dict[str, Any] = {
        "eval.source": plan.source.description, "eval.attacks": ",".join(a.name for a in plan.attacks),
        "eval.protocols": ",".join(o.protocols), "eval.trials": o.trials, "eval.limit": o.limit,
        "eval.images": len(plan.dataset), "eval.batch_size": o.batch_size, "eval.seed": o.seed,
        "eval.eot_iter": o.eot_iter, "eval.strategy": o.strategy, "eval.shard_size": o.shard_size,
        "eval.weights_digest": plan.source.weights_digest, "eval.data_digest": plan.data_digest,
        "eval.fingerprint": plan.fingerprint, "eval.checkpoint": plan.source.checkpoint_label,
    }
    for a in plan.attacks:
        if a.settings:
            params[f"eval.attack.{a.name}"] = json.dumps(a.settings, sort_keys=True)
    if plan.source.kind == "checkpoint":  # no training run holds the config: log it here
        params.update(flatten(plan.source.cfg))
    return params


def _read_state(out_dir: Path) -> dict[str, Any] | None:
    f = out_dir / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def check_output_folder(out_dir: Path, fingerprint: str) -> None:
    """Refuse a folder that holds another evaluation: its finished units would be taken for ours.

    A unit's file name says which attack, protocol, trial and shard it holds, not which weights,
    data or seed; the folder's `evaluation.json` fingerprint says that. So a folder of another
    model (e.g. an `--out` reused) or a folder jobs/evaluate.py did not write is a ConfigError.
    """
    from .trainer import check_writable_folder

    check_writable_folder(str(out_dir), "the output folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    try:
        state = _read_state(out_dir)
    except (OSError, ValueError):
        raise ConfigError(f"{out_dir / STATE_FILE} is unreadable; delete the folder {out_dir} or choose another --out") from None
    if state is None:
        raise ConfigError(f"{out_dir} exists but was not written by jobs/evaluate.py; choose another --out")
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{out_dir} holds the evaluation of {state.get('source', 'another model')} (fingerprint {state.get('fingerprint')}), "
            f"not of this model, data and seed (fingerprint {fingerprint}); choose another --out or delete that folder"
        )


def _write_state(out_dir: Path, data: Mapping[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=out_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / STATE_FILE)


def open_eval_run(plan: EvalPlan, echo: Echo) -> tuple[Any, tracking.RunRef]:
    """Reopen the evaluation run of this output folder, or create it (nested under the training run)."""
    from mlflow.exceptions import MlflowException

    src = plan.source
    client = tracking.client_for(src.tracking_uri)
    params = _eval_params(plan)
    old = (_read_state(plan.out_dir) or {}).get("mlflow")
    if old and old.get("tracking_uri") == src.tracking_uri:
        try:
            tracking.reopen_run(client, old["run_id"], params)
            echo(f"[evaluate] resuming MLflow run {old['run_id']}")
            return client, tracking.RunRef.from_dict(old)
        except MlflowException:
            pass  # the run was deleted: start a new one
    tags = {"rna.entry_point": "jobs/evaluate.py", "rna.eval_dir": str(plan.out_dir), "rna.source": src.description,
            "rna.git_dirty": str(tracking.git_dirty()), "git_commit": tracking.git_commit()}
    if src.parent_run_id:
        exp_id = src.parent_experiment_id
        tags["mlflow.parentRunId"] = src.parent_run_id
    else:
        exp_id = tracking.get_or_create_experiment(client, src.cfg.mlflow.experiment, tracking.artifact_root_for(src.tracking_uri))
    if src.training_run_id:
        tags["rna.training_run_id"] = src.training_run_id
    tags["rna.checkpoint"] = src.checkpoint_label + (f" (epoch {src.selected_epoch})" if src.selection else "")
    if src.selection == "test":
        tags["rna.selection_on_test_set"] = "true (the papers' way: biased upward)"
    name = f"eval-{plan.row_meta['model']}-{plan.fingerprint[:6]}" + (f"-selected-on-{src.selection}" if src.selection else "")
    run_id = tracking.start_run(client, exp_id, name, params, tags)
    return client, tracking.RunRef(src.tracking_uri, exp_id, run_id)


def log_results(client: Any, ref: tracking.RunRef, plan: EvalPlan, metrics: Mapping[str, float]) -> None:
    tracking.log_metrics(client, ref.run_id, metrics, step=0)
    for name in (RESULTS_FILE, TABLES_FILE, STABILITY_FILE):
        if (plan.out_dir / name).is_file():
            client.log_artifact(ref.run_id, str(plan.out_dir / name))
    if (plan.out_dir / PATHS_DIR).is_dir():
        client.log_artifacts(ref.run_id, str(plan.out_dir / PATHS_DIR), PATHS_DIR)


# ----------------------------------------------------------------------------- the job


def run_evaluation(plan: EvalPlan, echo: Echo = print) -> EvalOutcome:
    """Fan the plan's missing units out on Ray, gather, write the tables and log them to MLflow."""
    start = time.monotonic()
    o = plan.options
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(plan.out_dir)
    done = done_units(plan.out_dir)
    todo = [u for u in plan.units if u.unit_id not in done]
    with_paths = bool(o.path_analysis) and count_paths(build_model_meta(plan.source.cfg)) > 1 and not _paths_done(plan)
    shards = len({(u.first, u.stop) for u in plan.units})
    echo(f"[evaluate] {plan.row_meta['model']} {plan.row_meta['method']} on {len(plan.dataset)} {plan.row_meta['dataset']} images: "
         f"{len(plan.attacks)} attack(s) x {len(o.protocols)} protocol(s) x {o.trials} trial(s) x {shards} shard(s) = "
         f"{len(plan.units)} units; {len(plan.units) - len(todo)} done earlier; folder {plan.out_dir}")

    client, ref = open_eval_run(plan, echo)
    status = "FAILED"
    try:
        _write_state(plan.out_dir, {
            "format": 1, "source": plan.source.description, "fingerprint": plan.fingerprint,
            "weights_digest": plan.source.weights_digest, "data_digest": plan.data_digest,
            "mlflow": ref.to_dict(), "parent_run_id": plan.source.parent_run_id,
            "options": {k: v for k, v in asdict(plan.options).items() if k not in ("fail_once_marker",)},
        })
        ran = 0
        if todo or with_paths:
            from .trainer import ensure_ray

            ensure_ray(plan.source.cfg, echo)
            ran = fan_out(plan, todo, echo, with_paths)
        row_run = plan.source.training_run_id or ref.run_id
        rows = gather_rows(plan, row_run)
        results = plan.out_dir / RESULTS_FILE
        write_rows_parquet(rows, results, merge=True)
        all_rows = [r for r in read_rows_parquet(results) if r.run_id == row_run]
        title = f"{plan.row_meta['model']} {plan.row_meta['method']}, {plan.source.description}"
        if plan.source.selection == "test":
            title += " (selected on the test set, the papers' way: biased upward)"
        (plan.out_dir / TABLES_FILE).write_text(render_markdown(all_rows, title=title))
        (plan.out_dir / STABILITY_FILE).write_text(
            f"# Stability over trials: {title}\n\nAccuracy (%) over trials; std is the sample standard deviation.\n\n"
            + stability_table(all_rows) + "\n"
        )
        metrics = summary_metrics(all_rows)
        metrics.update({"eval_images": float(len(plan.dataset)), "eval_units": float(len(plan.units)),
                        "eval_units_run": float(ran), "eval_seconds": time.monotonic() - start})
        log_results(client, ref, plan, metrics)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(client, ref.run_id, status)

    paths = {p.name: str(p) for p in sorted((plan.out_dir / PATHS_DIR).glob("*"))} if (plan.out_dir / PATHS_DIR).is_dir() else {}
    return EvalOutcome(
        out_dir=str(plan.out_dir), results_path=str(results), rows=rows,
        tables=render_markdown(rows), stability=stability_table(rows), mlflow=ref,
        parent_run_id=plan.source.parent_run_id, units_total=len(plan.units),
        units_skipped=len(plan.units) - len(todo), units_run=ran, seconds=time.monotonic() - start,
        metrics=metrics, path_analysis=paths,
    )


def evaluate(
    run_id: str | None = None,
    checkpoint: str | None = None,
    options: EvalOptions = EvalOptions(),
    overrides: Sequence[str] = (),
    echo: Echo = print,
    selected: str | None = None,
) -> EvalOutcome:
    """Load, validate and plan (nothing started or written on a bad input), then run."""
    source = load_source(run_id=run_id, checkpoint=checkpoint, overrides=overrides, selected=selected)
    plan = plan_evaluation(source, options)
    return run_evaluation(plan, echo)


__all__ = [
    "CHECKPOINT_ARTIFACT",
    "DEFAULT_ATTACKS",
    "DEFAULT_PROTOCOLS",
    "EvalOptions",
    "EvalOutcome",
    "EvalPlan",
    "ModelSource",
    "Unit",
    "done_units",
    "evaluate",
    "evaluate_unit",
    "fail_once",
    "fan_out",
    "gather_rows",
    "load_source",
    "plan_evaluation",
    "resolve_attacks",
    "run_evaluation",
    "selected_artifact",
    "summary_metrics",
]
