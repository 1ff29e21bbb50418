"""Benchmark 1, `at_step`: what RNA costs in one adversarial training step, and what bf16 gains.

Images/s of one blackbox PGD-10 adversarial training step (rna_core.training.train_step) of a
model whose norm layers are RandomNorm over a random space (default `bn,gns:1`, the paper's), vs
the same model with plain BatchNorm. Target: RNA costs at most 1.10x the BatchNorm step.

With `--amp-bf16` and/or `--channels-last` both steps run with those settings, and the same two
steps in fp32 (contiguous) are timed beside them, interleaved: headline `bf16_step` is
time(fp32 step) / time(bf16 step) of the RNA space (target >= 3.0x), `bf16_step_base` the same
for the plain norm. Without the flags every case is fp32 whatever the device's `auto` would pick.

    PYTHONPATH=. python bench/at_step.py                       # ResNet-18, batch 32, CPU, fp32
    PYTHONPATH=. python bench/at_step.py --batch 128 --threads 2 --amp-bf16 --channels-last
    PYTHONPATH=. python bench/at_step.py --device cuda --batch 128 --repeats 10 --amp-bf16 --channels-last
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    Headline,
    add_common_args,
    apply_threads,
    measure_interleaved,
    paired_ratio,
    paired_ratios,
    random_batch,
    report,
    synchronizer,
)
from rna_core import create_model
from rna_core.config import AttackConfig, TrainConfig
from rna_core.optim import build_optimizer
from rna_core.paths import PathSampler
from rna_core.training import train_step

TARGET = 1.10
BF16_TARGET = 3.0
FP32 = "fp32 "  # name prefix of the fp32 reference cases


def make_step(model_name: str, norm: str, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int):
    """A closure running one train_step on a fresh model with `norm` (same init seed for all)."""
    torch.manual_seed(seed)
    model = create_model(model_name, norm=norm).to(x.device)
    optimizer = build_optimizer(model, cfg)
    sampler = PathSampler(cfg.sampling, seed=seed)

    def step() -> None:
        train_step(model, x, y, optimizer, cfg, sampler)

    return step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--space", default="bn,gns:1", help="the RNA random space")
    p.add_argument("--base", default="bn", help="the plain norm it is compared with")
    p.add_argument("--also", default="", help="extra norm specs to time beside them, ';'-separated (e.g. 'gns:1')")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="steps in channels_last (plus fp32 references)")
    p.add_argument("--amp-bf16", action="store_true", help="steps with bf16 autocast (plus fp32 references)")
    add_common_args(p, repeats=7, warmup=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    x, y = random_batch(args.batch, args.seed, device)
    cfg = TrainConfig(
        mode="blackbox",
        attack=AttackConfig(steps=args.pgd_steps),
        channels_last=str(args.channels_last).lower(),  # explicit: the bench never runs on `auto`
        amp_bf16=str(args.amp_bf16).lower(),
    )
    fast = args.channels_last or args.amp_bf16
    fp32 = replace(cfg, channels_last="false", amp_bf16="false")
    norms = [args.space, args.base] + [n for n in args.also.split(";") if n.strip()]
    cases = {f"norm={n}": make_step(args.model, n, x, y, cfg, args.seed) for n in norms}
    if fast:
        cases.update(
            {f"{FP32}norm={n}": make_step(args.model, n, x, y, fp32, args.seed) for n in (args.space, args.base)}
        )
    timings = measure_interleaved(cases, args.batch, args.repeats, args.warmup, synchronizer(device))
    rna, base = timings[f"norm={args.space}"], timings[f"norm={args.base}"]
    value = paired_ratio(rna, base)
    extra = {
        "sizes": f"model={args.model} batch={args.batch} PGD-{args.pgd_steps} device={device} "
        f"channels_last={args.channels_last} amp_bf16={args.amp_bf16}",
    }
    for name, t in timings.items():
        if name not in (rna.name, base.name) and not name.startswith(FP32):
            extra[f"{name} / {base.name}"] = f"{paired_ratio(t, base):.3f}"
    headlines = []
    if fast:
        rna32, base32 = timings[f"{FP32}norm={args.space}"], timings[f"{FP32}norm={args.base}"]
        extra[f"fp32 RNA/BN: {rna32.name} / {base32.name}"] = f"{paired_ratio(rna32, base32):.3f}"

        def reach(v: float) -> bool:
            return v >= BF16_TARGET

        headlines = [
            Headline("bf16_step", rna32, rna, f">= {BF16_TARGET}", reach),
            Headline("bf16_step_base", base32, base, f">= {BF16_TARGET}", reach),
        ]
    return report(
        "at_step",
        argv,
        timings,
        f"time({rna.name}) / time({base.name})",
        value,
        f"<= {TARGET}",
        value <= TARGET,
        extra,
        args.json,
        rounds=paired_ratios(rna, base),
        headlines=headlines,
    )


if __name__ == "__main__":
    main()
