"""Benchmark 7, `eval_precision`: evaluation attacks with the model's forward in bf16 vs fp32.

Same trained checkpoint, same images, same seeds: every (attack, protocol) unit of
`rna_core.evaluation.evaluate_batch` runs once with the model in fp32 and once with its forward
under bf16 autocast (`rna_core.speed.evaluation_forward`, what `eval.forward_precision=bf16` runs:
the weights in channels_last; losses, input gradients and the attack's steps stay fp32),
interleaved batch by batch (A B, B A, ...). Reported per
unit: the speed ratio time(fp32) / time(bf16) (median of the per-batch ratios, with CPU time)
and the accuracy difference in points.

Why: attacks stay fp32 by default; bf16 forwards would be allowed only where the robust
accuracy they report is within 0.5 points of fp32's on 1,000 images (issue 20). A lower bf16
number would mean bf16 makes attacks stronger, a higher one that it masks gradients.

    PYTHONPATH=. python bench/eval_precision.py --checkpoint RUN/checkpoint.pt --data-dir DIR \\
        --limit 1000 --batch 250 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import Headline, Timing, apply_threads, report
from rna_core.attacks.registry import get_attack
from rna_core.builders import model_from_config
from rna_core.checkpoint import checkpoint_config, load_checkpoint, read_checkpoint
from rna_core.data import load_dataset
from rna_core.evaluation.protocols import evaluate_batch
from rna_core.evaluation.runner import make_batches
from rna_core.evaluation.seeds import batch_seed
from rna_core.speed import evaluation_forward

MAX_POINTS = 0.5  # the line for letting evaluations run bf16 forwards


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by jobs/train.py")
    p.add_argument("--data-dir", required=True, help="folder with test.parquet (e.g. the offline CIFAR-10 copy)")
    p.add_argument("--limit", type=int, default=1000, help="test images (a fixed seeded subset)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--units", default="pgd20:transfer,eot_pgd:eot", help="attack:protocol pairs")
    p.add_argument("--eot-iter", type=int, default=4, help="eot_pgd's gradient draws per step (its default is 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    payload = read_checkpoint(args.checkpoint)
    cfg = checkpoint_config(payload)
    if cfg is None:
        raise SystemExit(
            f"eval_precision: {args.checkpoint} holds no config; pass a checkpoint written by jobs/train.py"
        )
    model = model_from_config(cfg)
    load_checkpoint(args.checkpoint, model)
    model.eval()
    fast = evaluation_forward(copy.deepcopy(model), "bf16").eval()
    test = load_dataset(cfg.data.dataset, "test", data_dir=args.data_dir)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0x5E1EC7))
    test = test.subset(perm[: args.limit].sort().values)  # the Parquet rows are sorted by class
    batches = make_batches(test, args.batch, None, torch.device("cpu"))
    units = [u.split(":") for u in args.units.split(",") if u.strip()]
    attacks = {a: (get_attack(a, eot_iter=args.eot_iter) if a == "eot_pgd" else get_attack(a)) for a, _ in units}

    timings: dict[str, Timing] = {}
    counts: dict[str, dict[str, int]] = {}
    for attack, protocol in units:
        key = f"{attack}:{protocol}"
        t32, t16 = Timing(f"fp32 {key}", 0), Timing(f"bf16 {key}", 0)
        c = counts[key] = {"fp32": 0, "bf16": 0, "n": 0}
        for b, (x, y) in enumerate(batches):
            seed = batch_seed(args.seed, b)
            order = [("fp32", model, x, t32), ("bf16", fast, x, t16)]
            for name, m, xb, timing in order if b % 2 == 0 else order[::-1]:
                start, cpu = time.perf_counter(), time.process_time()
                c[name] += evaluate_batch(
                    m, xb, y, attacks[attack], protocol, seed, eot_iter=args.eot_iter, strategy=cfg.train.sampling
                ).correct  # one inference draw
                timing.seconds.append(time.perf_counter() - start)
                timing.cpu_seconds.append(time.process_time() - cpu)
            c["n"] += int(y.shape[0])
            t32.items = t16.items = args.batch
        timings[t32.name], timings[t16.name] = t32, t16
        print(f"  {key}: fp32 {c['fp32']}/{c['n']}, bf16 {c['bf16']}/{c['n']}", flush=True)

    headlines, extra, within = [], {}, True
    for attack, protocol in units:
        key = f"{attack}:{protocol}"
        c = counts[key]
        diff = 100 * (c["bf16"] - c["fp32"]) / max(c["n"], 1)
        within &= abs(diff) <= MAX_POINTS
        extra[f"accuracy {key}"] = (
            f"fp32 {100 * c['fp32'] / c['n']:.1f}%, bf16 {100 * c['bf16'] / c['n']:.1f}% "
            f"(bf16 - fp32 = {diff:+.1f} points on {c['n']} images; line +-{MAX_POINTS})"
        )
        headlines.append(
            Headline(f"speed {key}", timings[f"fp32 {key}"], timings[f"bf16 {key}"], "> 1", lambda v: v > 1)
        )
    extra["sizes"] = (
        f"checkpoint={args.checkpoint} model={cfg.model.name} norm={cfg.model.norm} images={len(test)} "
        f"batch={args.batch} eot_iter={args.eot_iter} threads={args.threads}"
    )
    first = units[0][0] + ":" + units[0][1]
    value = statistics.median(a / b for a, b in zip(timings[f"fp32 {first}"].seconds, timings[f"bf16 {first}"].seconds))
    return report(
        "eval_precision",
        argv,
        timings,
        f"time(fp32 {first}) / time(bf16 {first})",
        value,
        f"accuracy within {MAX_POINTS} points for every unit",
        within,
        extra,
        args.json,
        headlines=headlines,
    )


if __name__ == "__main__":
    main()
