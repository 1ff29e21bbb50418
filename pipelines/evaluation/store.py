"""An evaluation's result folder: resumable, one atomically written file per finished unit.

The folder (`eval_results/<source>-<fingerprint>` under the base folder) holds
`units/<unit id>.parquet`, one file per finished unit, so a re-run of the same command skips what
is done and an interrupted evaluation resumes; `results.parquet`, the result rows summed over
shards (merged by row key: never a duplicate row); Markdown tables; path-analysis data and plots;
and `evaluation.json` (what was evaluated, which MLflow run it logs to). The fingerprint covers
everything that changes a unit's counts except the attack and its settings, which are part of
the unit id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rna_core.attacks.registry import Attack
from rna_core.errors import ConfigError
from rna_core.evaluation import ResultRow, save_distance_analysis, save_transfer_matrix, trial_seed
from rna_core.units import to_pixels

from ..preflight import check_writable_folder
from ..run_folder import read_job_file, write_job_file

RESULTS_DIR = "eval_results"
STATE_FILE = "evaluation.json"
RESULTS_FILE = "results.parquet"
TABLES_FILE = "results.md"
STABILITY_FILE = "stability.md"
UNITS_DIR = "units"
PATHS_DIR = "path_analysis"

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
        ("draws", pa.int32()),  # R scoring draws per example
        ("correct_worst", pa.int64()),  # right under all R draws
        ("correct_vote", pa.int64()),  # the plurality of R draws is right
    ]
)


@dataclass(frozen=True)
class Unit:
    """One (attack with its settings, protocol, trial, shard [first, stop)) of an evaluation."""

    attack: str
    settings_hash: str
    protocol: str
    trial: int
    first: int
    stop: int

    @property
    def unit_id(self) -> str:
        return f"{self.attack}-{self.settings_hash}_{self.protocol}_t{self.trial}_{self.first}-{self.stop}"


def read_state(out_dir: Path) -> dict[str, Any] | None:
    return read_job_file(str(out_dir), STATE_FILE)


def write_state(out_dir: Path, data: Mapping[str, Any]) -> None:
    write_job_file(str(out_dir), dict(data), name=STATE_FILE)


def check_output_folder(out_dir: Path, fingerprint: str) -> None:
    """Refuse a folder that holds another evaluation: its finished units would be taken for ours.

    A unit's file name says which attack, protocol, trial and shard it holds, not which weights,
    data or seed; the folder's `evaluation.json` fingerprint says that. So a folder of another
    model (e.g. an `--out` reused) or a folder jobs/evaluate.py did not write is a ConfigError.
    """
    check_writable_folder(str(out_dir), "the output folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    try:
        state = read_state(out_dir)
    except (OSError, ValueError, ConfigError):
        raise ConfigError(
            f"{out_dir / STATE_FILE} is unreadable; delete the folder {out_dir} or choose another --out"
        ) from None
    if state is None:
        raise ConfigError(f"{out_dir} exists but was not written by jobs/evaluate.py; choose another --out")
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{out_dir} holds the evaluation of {state.get('source', 'another model')} (fingerprint "
            f"{state.get('fingerprint')}), "
            f"not of this model, data and seed (fingerprint {fingerprint}); choose another --out or delete that folder"
        )


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
        "unit_id": unit.unit_id,
        "attack": unit.attack,
        "settings": json.dumps(attack.settings, sort_keys=True),
        "protocol": unit.protocol,
        "trial": unit.trial,
        "seed": trial_seed(seed, unit.trial),
        "first": unit.first,
        "stop": unit.stop,
        "n": int(result["n"]),
        "correct": int(result["correct"]),
        "seconds": float(result["seconds"]),
        "draws": int(result["draws"]),
        "correct_worst": int(result["worst"]),
        "correct_vote": int(result["vote"]),
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
        raise ConfigError(
            f"{unit_path(out_dir, unit)} is not the result of unit {unit.unit_id}; delete it and run again"
        )
    return rows[0]


def clean_temporaries(out_dir: Path) -> None:
    """Temporary files of a driver killed between writing and renaming (never a result)."""
    for p in (out_dir / UNITS_DIR).glob(".*.tmp") if (out_dir / UNITS_DIR).is_dir() else []:
        p.unlink(missing_ok=True)


def gather_rows(plan: Any, run_id: str) -> list[ResultRow]:
    """The result rows of a plan (pipelines.evaluation.plan.EvalPlan): each (attack, protocol,
    trial) summed over its shards."""
    totals: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0, 0])
    for unit in plan.units:
        r = read_unit(plan.out_dir, unit)
        if r["draws"] != plan.options.inference_draws:
            raise ConfigError(
                f"{unit_path(plan.out_dir, unit)} scored {r['draws']} inference draws, this evaluation "
                f"{plan.options.inference_draws}; delete it and run again"
            )
        acc = totals[(unit.attack, unit.protocol, unit.trial)]
        for i, key in enumerate(("correct", "n", "seconds", "correct_worst", "correct_vote")):
            acc[i] += r[key]
    by_name = {a.name: a for a in plan.attacks}
    rows = []
    for attack_name, protocol, t in plan.groups:
        correct, n, seconds, worst, vote = totals[(attack_name, protocol, t)]
        rows.append(
            ResultRow.make(
                run_id=run_id,
                **plan.row_meta,
                attack=attack_name,
                protocol=protocol,
                eps=to_pixels(by_name[attack_name].eps),
                trial=t,
                seed=trial_seed(plan.options.seed, t),
                n=int(n),
                correct=int(correct),
                seconds=float(seconds),
                draws=plan.options.inference_draws,
                correct_worst=int(worst),
                correct_vote=int(vote),
            )
        )
    return rows


def paths_settings(plan: Any) -> dict[str, Any]:
    """What the path analysis of a plan depends on (stored beside its files)."""
    o = plan.options
    return {
        "attack": o.path_attack,
        "limit": min(o.path_analysis, len(plan.dataset)),
        "seed": o.seed,
        "batch_size": o.batch_size,
        "weights": plan.source.weights_digest,
        "data": plan.data_digest,
    }


def paths_done(plan: Any) -> bool:
    f = plan.out_dir / PATHS_DIR / "settings.json"
    return f.is_file() and json.loads(f.read_text()) == paths_settings(plan)


def save_paths(plan: Any, result: Mapping[str, Any]) -> None:
    """Path-analysis files, written into a temporary folder and renamed (whole or not at all)."""
    final = plan.out_dir / PATHS_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{PATHS_DIR}.", dir=plan.out_dir))
    try:
        attack = plan.options.path_attack
        save_distance_analysis(result["distance"], tmp, attack=attack)
        save_transfer_matrix(result["matrix"], tmp, attack=attack)
        (tmp / "settings.json").write_text(json.dumps(paths_settings(plan), indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "PATHS_DIR",
    "RESULTS_DIR",
    "RESULTS_FILE",
    "STABILITY_FILE",
    "STATE_FILE",
    "TABLES_FILE",
    "UNITS_DIR",
    "Unit",
    "check_output_folder",
    "clean_temporaries",
    "done_units",
    "gather_rows",
    "paths_done",
    "paths_settings",
    "read_state",
    "read_unit",
    "save_paths",
    "write_state",
    "write_unit",
]
