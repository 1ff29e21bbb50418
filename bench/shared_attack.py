"""Benchmark 9, `shared_attack`: one attack run for the protocols that score it two ways, vs one run each.

`transfer`, `transfer-raw` and `fixed-path` attack the same path with the same generator; they
differ only in how the output is scored (and, under `transfer`, in the fill of examples an attack
hands back unperturbed, which runs after the attack). `rna_core.evaluation.run_protocols` runs the
attack once for all of them (`share_attacks=True`, what `evaluate_model` and the Ray tasks do); this
times that against one attack per protocol (`share_attacks=False`), interleaved, on the same
model, images and seeds, and checks that both give the same result rows. The target follows from
the separate runs' own times per protocol: sharing can save at most every shared protocol's run but
the dearest one's (for attacks that hand examples back clean, `transfer` also pays the fill).

    PYTHONPATH=. python bench/shared_attack.py --threads 2
    PYTHONPATH=. python bench/shared_attack.py --threads 2 --attacks pgd20,cw_l2 --protocols transfer,fixed-path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import rna_core
from bench.common import add_common_args, apply_threads, measure_interleaved, paired_ratio, paired_ratios, report
from rna_core.evaluation import evaluate_model
from rna_core.evaluation.protocols import SHARED_ATTACK


def _rows_key(rows: list) -> list[tuple]:
    return [(r.attack, r.protocol, r.trial, r.n, r.correct, r.correct_worst, r.correct_vote) for r in rows]


def _ideal_ratio(alone_rows: list, shared: list[str]) -> float:
    """time(each protocol alone) / time(the shared protocols at the cost of the dearest of them).

    From the separate runs' own row times: sharing saves every shared protocol's attack but the
    dearest one's, whose time (the transfer fill included, which only `transfer` runs) stays.
    """
    total = sum(r.seconds for r in alone_rows)
    by_attack: dict[tuple[str, int], list[float]] = {}
    kept = 0.0
    for r in alone_rows:
        if r.protocol in shared:
            by_attack.setdefault((r.attack, r.trial), []).append(r.seconds)
        else:
            kept += r.seconds
    kept += sum(max(v) for v in by_attack.values())
    return total / kept if kept > 0 else 1.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--norm", default="bn,gns:1", help="a random space (RNA's by default)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--attacks", default="pgd20", help="comma-separated attacks (natural is left out)")
    p.add_argument("--protocols", default="transfer,fixed-path", help=f"comma-separated; shared: {SHARED_ATTACK}")
    add_common_args(p, repeats=3, warmup=0)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    torch.manual_seed(args.seed)
    model = rna_core.create_model(args.model, norm=args.norm).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.images, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.images, args.batch)]
    attacks, protocols = args.attacks.split(","), args.protocols.split(",")
    common = dict(attacks=attacks, protocols=protocols, seed=args.seed, include_natural=False, progress=False)
    rows: dict[bool, list] = {}

    def run(share: bool) -> None:
        rows[share] = evaluate_model(model, batches, share_attacks=share, **common)

    timings = measure_interleaved(
        {"one attack per protocol": lambda: run(False), "shared attack": lambda: run(True)},
        args.images,
        args.repeats,
        args.warmup,
    )
    alone, shared = timings["one attack per protocol"], timings["shared attack"]
    same = _rows_key(rows[False]) == _rows_key(rows[True])
    value = paired_ratio(alone, shared)
    sharing = [q for q in protocols if q in SHARED_ATTACK]
    ideal = _ideal_ratio(rows[False], sharing if len(sharing) > 1 else [])
    extra = {
        "sizes": f"model={args.model} norm={args.norm} images={args.images} batch={args.batch} threads={args.threads}",
        "attacks x protocols": f"{args.attacks} x {args.protocols}",
        "rows equal (n, correct, worst, vote per attack, protocol, trial)": "yes" if same else "NO",
        "attack runs per batch, alone -> shared": f"{len(protocols)} -> {len(protocols) - len(sharing) + 1}"
        if len(sharing) > 1
        else f"{len(protocols)} (nothing shared)",
        "ideal ratio (from the separate runs' own times per protocol)": round(ideal, 3),
    }
    target = f">= {0.8 * ideal:.2f} (0.8 x the {ideal:.2f} that the separate runs' own times allow; rows equal)"
    return report(
        "shared_attack",
        argv,
        timings,
        f"time({alone.name}) / time({shared.name})",
        value,
        target,
        same and value >= 0.8 * ideal,
        extra,
        args.json,
        rounds=paired_ratios(alone, shared),
    )


if __name__ == "__main__":
    main()
