"""How adversarial examples transfer between paths (the paper's Figure 5(c) and beyond).

- :func:`accuracy_vs_distance`: attack path A, infer with paths B that differ from A in exactly d
  random units (layers, or tied groups of layers), for each d. d = 0 is the white-box bound.
- :func:`transfer_matrix`: attack each of a handful of paths, infer with each of them.
Both save as Parquet and CSV (long format) and as PNG plots (matplotlib's Agg canvas directly, so
a notebook's pyplot backend is left alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from ..attacks.registry import Attack, resolve_attack
from ..errors import ConfigError
from ..paths import Path, path_units, random_layers, sample_path, set_path
from .protocols import eval_mode
from .seeds import unit_seed

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def path_at_distance(model: nn.Module, base: Path, d: int, generator: torch.Generator) -> Path:
    """A path that differs from `base` in exactly `d` units, the units and new choices drawn at random."""
    units = path_units(model, varying_only=True)
    if not 0 <= d <= len(units):
        raise ConfigError(f"distance {d} is out of range: the model has {len(units)} random units")
    layers = random_layers(model)
    choices = list(base.choices)
    for j in torch.randperm(len(units), generator=generator)[:d].tolist():
        unit = units[j]
        k = min(layers[i].num_choices for i in unit)
        old = choices[unit[0]]
        c = int(torch.randint(k - 1, (1,), generator=generator).item())
        new = c if c < old else c + 1
        for i in unit:
            choices[i] = new
    return Path(tuple(choices))


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path) -> int:
    set_path(model, path)
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum().item())


def attack_on_path(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, path: Path, seed: int
) -> torch.Tensor:
    """Adversarial examples crafted with the model held on `path` (the transfer protocol's attack)."""
    set_path(model, path)
    return attack(model, x, y, torch.Generator().manual_seed(unit_seed(seed, "attack")))


@dataclass
class DistanceRecord:
    distance: int  # units that differ between attack and inference path
    layers_differ: float  # mean number of differing layers (= distance when nothing is tied)
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def accuracy_vs_distance(
    model: nn.Module,
    batches: Batches,
    attack: str | Attack = "pgd20",
    distances: Sequence[int] | None = None,
    paths_per_distance: int = 1,
    seed: int = 0,
) -> list[DistanceRecord]:
    """Accuracy when attacking path A and inferring with a path d units away, for each d.

    Per batch one attack path A is drawn (uniform) and attacked once; each of
    `paths_per_distance` inference paths per d is drawn at exactly d units from A.
    `distances` defaults to 0 .. number of units.
    """
    attack = resolve_attack(attack)
    if distances is None:
        distances = range(len(path_units(model, varying_only=True)) + 1)
    distances = list(distances)
    stats = {d: [0, 0, 0] for d in distances}  # n, correct, sum of layer differences
    with eval_mode(model):
        for b, (x, y) in enumerate(batches):
            gen = torch.Generator().manual_seed(unit_seed(seed, "distance", b))
            path_a = sample_path(model, "uniform", gen)
            x_adv = attack_on_path(model, x, y, attack, path_a, unit_seed(seed, "distance", b))
            for d in distances:
                for _ in range(paths_per_distance):
                    path_b = path_at_distance(model, path_a, d, gen)
                    s = stats[d]
                    s[0] += int(y.shape[0])
                    s[1] += _correct(model, x_adv, y, path_b)
                    s[2] += path_a.differences(path_b) * int(y.shape[0])
    return [DistanceRecord(d, s[2] / s[0] if s[0] else float("nan"), s[0], s[1]) for d, s in stats.items()]


@dataclass
class TransferMatrix:
    """accuracy[i][j]: examples crafted on paths[i], inferred with paths[j]."""

    paths: list[Path]
    correct: list[list[int]]
    n: int

    @property
    def accuracy(self) -> list[list[float]]:
        return [[c / self.n if self.n else float("nan") for c in row] for row in self.correct]

    def records(self) -> list[dict]:
        acc = self.accuracy
        return [
            {
                "source": str(a),
                "target": str(b),
                "source_index": i,
                "target_index": j,
                "layers_differ": a.differences(b),
                "n": self.n,
                "correct": self.correct[i][j],
                "accuracy": acc[i][j],
            }
            for i, a in enumerate(self.paths)
            for j, b in enumerate(self.paths)
        ]


def transfer_matrix(
    model: nn.Module,
    batches: Batches,
    attack: str | Attack = "pgd20",
    num_paths: int = 4,
    paths: Sequence[Path | str] | None = None,
    seed: int = 0,
) -> TransferMatrix:
    """Accuracy of examples crafted on each of a handful of paths when inferred with each of them.

    `paths` defaults to `num_paths` distinct uniform draws (fewer if the model has fewer paths).
    """
    attack = resolve_attack(attack)
    if paths is None:
        gen = torch.Generator().manual_seed(unit_seed(seed, "matrix-paths"))
        chosen: list[Path] = []
        for _ in range(200 * num_paths):
            p = sample_path(model, "uniform", gen)
            if p not in chosen:
                chosen.append(p)
            if len(chosen) == num_paths:
                break
    else:
        chosen = [Path.parse(p) if isinstance(p, str) else p for p in paths]
    if not chosen:
        raise ConfigError("transfer_matrix needs at least one path")
    correct = [[0] * len(chosen) for _ in chosen]
    n = 0
    with eval_mode(model):
        for b, (x, y) in enumerate(batches):
            n += int(y.shape[0])
            for i, source in enumerate(chosen):
                x_adv = attack_on_path(model, x, y, attack, source, unit_seed(seed, "matrix", b, i))
                for j, target in enumerate(chosen):
                    correct[i][j] += _correct(model, x_adv, y, target)
    return TransferMatrix(chosen, correct, n)


def _write_table(records: list[dict], out_dir: FsPath, stem: str) -> dict[str, str]:
    table = pa.Table.from_pylist(records)
    parquet, csv = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
    pq.write_table(table, parquet)
    pacsv.write_csv(table, csv)
    return {"parquet": str(parquet), "csv": str(csv)}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_distance_analysis(
    records: Sequence[DistanceRecord], out_dir: str | os.PathLike, attack: str = "", stem: str = "accuracy_vs_distance"
) -> dict[str, str]:
    """Write the records as Parquet, CSV and a PNG line plot; returns {kind: path}."""
    out = FsPath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "distance": r.distance,
            "layers_differ": r.layers_differ,
            "n": r.n,
            "correct": r.correct,
            "accuracy": r.accuracy,
        }
        for r in records
    ]
    files = _write_table(rows, out, stem)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r.distance for r in records], [100 * r.accuracy for r in records], marker="o")
    ax.set_xlabel("layers that differ between attack and inference path")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Transfer across paths{': ' + attack if attack else ''}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png)
    files["png"] = str(png)
    return files


def save_transfer_matrix(
    result: TransferMatrix, out_dir: str | os.PathLike, attack: str = "", stem: str = "transfer_matrix"
) -> dict[str, str]:
    """Write the matrix (long format) as Parquet, CSV and a PNG heatmap; returns {kind: path}."""
    out = FsPath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_table(result.records(), out, stem)
    acc = [[100 * v for v in row] for row in result.accuracy]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
    labels = [str(p) for p in result.paths]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("inference path")
    ax.set_ylabel("attack path")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 50 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(f"Transfer matrix{': ' + attack if attack else ''}")
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png)
    files["png"] = str(png)
    return files
