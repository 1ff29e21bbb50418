"""Result rows (one per model, attack, protocol, trial) and their Parquet file.

One row per (model, attack, protocol, trial): run_id, model, method, dataset, attack, protocol,
eps, trial, seed, n, correct, accuracy, seconds (DESIGN.md's columns: ``correct`` and ``accuracy``
are one inference draw, what papers report), then the randomized-model scores: ``draws`` (R),
``correct_worst`` / ``accuracy_worst`` (right under all R draws) and ``correct_vote`` /
``accuracy_vote`` (the plurality of R draws is right). ``eps`` is in pixels/255 like every eps a
user writes (8.0 means 8/255); it is null for unbounded attacks (DeepFool, CW-L2) and 0 for
``natural``. Files written before the R columns existed (schema version 1) read with them null.
Writing merges with an existing file: a new row replaces an old one with the same key, so a
re-run or a resumed fan-out never duplicates rows.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path as FsPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import ConfigError, DatasetNotFoundError
from ..methods import method_row_label

SCHEMA_TAG = {"kind": "rna-evaluation-results", "version": 2}

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("dataset", pa.string()),
        ("attack", pa.string()),
        ("protocol", pa.string()),
        ("eps", pa.float64()),
        ("trial", pa.int32()),
        ("seed", pa.int64()),
        ("n", pa.int64()),
        ("correct", pa.int64()),
        ("accuracy", pa.float64()),
        ("seconds", pa.float64()),
        ("draws", pa.int32()),
        ("correct_worst", pa.int64()),
        ("accuracy_worst", pa.float64()),
        ("correct_vote", pa.int64()),
        ("accuracy_vote", pa.float64()),
    ],
    metadata={b"rna_core": json.dumps(SCHEMA_TAG).encode()},
)


def method_label(spec: Mapping[str, Any]) -> str:
    """The `method` a result row carries: what tells two evaluated models apart in a paper table.

    Tables group rows by (model, method), so the label names the randomness, not only the
    builder; each method says how (`Method.row_label`): a plain single-norm model is its norm
    ("bn", "gn:32", as the paper's BN/GN rows), an RNA model carries its space ("rna(bn,gns:1)"),
    RPI+RPT its precision set ("rpt(4-16)"). A BN baseline and an RNA model never share a row.
    """
    return method_row_label(spec)


@dataclass(frozen=True)
class ResultRow:
    run_id: str
    model: str
    method: str
    dataset: str
    attack: str
    protocol: str
    eps: float | None
    trial: int
    seed: int
    n: int
    correct: int
    accuracy: float
    seconds: float  # its own scoring plus its share of an attack run that protocols share (run_protocols)
    draws: int | None = None  # R; None in rows written before worst-of-R and vote-of-R existed
    correct_worst: int | None = None
    accuracy_worst: float | None = None
    correct_vote: int | None = None
    accuracy_vote: float | None = None

    @classmethod
    def make(
        cls,
        *,
        n: int,
        correct: int,
        draws: int | None = None,
        correct_worst: int | None = None,
        correct_vote: int | None = None,
        **rest: object,
    ) -> ResultRow:
        """A row with accuracy = correct / n (NaN for an empty evaluation), likewise for worst and vote."""

        def ratio(c: int | None) -> float | None:
            return None if c is None else (c / n if n else math.nan)

        return cls(  # type: ignore[arg-type]
            n=int(n),
            correct=int(correct),
            accuracy=ratio(correct),
            draws=None if draws is None else int(draws),
            correct_worst=None if correct_worst is None else int(correct_worst),
            accuracy_worst=ratio(correct_worst),
            correct_vote=None if correct_vote is None else int(correct_vote),
            accuracy_vote=ratio(correct_vote),
            **rest,
        )

    def score(self, which: str) -> float | None:
        """The accuracy of one score: "one" (one draw), "worst" (worst-of-R) or "vote" (vote-of-R)."""
        return {"one": self.accuracy, "worst": self.accuracy_worst, "vote": self.accuracy_vote}[which]

    def key(self) -> tuple:
        """Identity of a row: two rows with the same key describe the same measurement."""
        eps = None if self.eps is None or math.isnan(self.eps) else round(float(self.eps), 6)
        return (self.run_id, self.model, self.method, self.dataset, self.attack, self.protocol, eps, self.trial)


ROW_FIELDS = [f.name for f in fields(ResultRow)]
ADDED_FIELDS = ("draws", "correct_worst", "accuracy_worst", "correct_vote", "accuracy_vote")  # in version 2
KEY_FIELDS = ("run_id", "model", "method", "dataset", "attack", "protocol", "eps", "trial")


def merge_rows(old: Iterable[ResultRow], new: Iterable[ResultRow]) -> list[ResultRow]:
    """`old` with rows replaced by `new` rows of the same key, then the genuinely new rows."""
    merged: dict[tuple, ResultRow] = {r.key(): r for r in old}
    for r in new:
        merged[r.key()] = r
    return list(merged.values())


def rows_to_table(rows: Iterable[ResultRow]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in ROW_FIELDS}
    for r in rows:
        for name, value in asdict(r).items():
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def table_to_rows(table: pa.Table) -> list[ResultRow]:
    missing = [name for name in ROW_FIELDS if name not in table.column_names]
    if [name for name in missing if name not in ADDED_FIELDS]:
        raise ConfigError(f"not an evaluation results table: columns {', '.join(missing)} are missing")
    for name in missing:  # a version-1 file: no worst-of-R and vote-of-R columns
        table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
    table = table.select(ROW_FIELDS).cast(SCHEMA)
    return [ResultRow(**d) for d in table.to_pylist()]


def write_rows_parquet(rows: Iterable[ResultRow], path: str | os.PathLike, merge: bool = True) -> str:
    """Write `rows` to a Parquet file (merged with the file's rows when `merge`); returns the path.

    Local files are written atomically (temporary file, then rename), so a crash never leaves a
    half-written table; a URI (``s3://...``) is written through pyarrow's filesystems.
    """
    rows = list(rows)
    target = str(path)
    if merge and _exists(target):
        rows = merge_rows(read_rows_parquet(target), rows)
    table = rows_to_table(rows)
    if "://" in target:
        pq.write_table(table, target)
        return target
    out = FsPath(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return str(out)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _exists(target: str) -> bool:
    if "://" in target:
        fs, inner = pafs.FileSystem.from_uri(target)
        return fs.get_file_info(inner).type != pafs.FileType.NotFound
    return os.path.exists(target)


def read_rows_parquet(path: str | os.PathLike) -> list[ResultRow]:
    """Rows of a results file written by :func:`write_rows_parquet`."""
    target = str(path)
    if not _exists(target):
        raise DatasetNotFoundError(f"results file '{target}' does not exist; run an evaluation first or check the path")
    return table_to_rows(pq.read_table(target))
