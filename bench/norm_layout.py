"""Benchmark 8, `norm_layout`: GroupNorm on a channels_last batch, in place vs through a contiguous copy.

Why: `rna_core.speed.use_channels_last` runs GroupNorm layers with fewer than
`SMALL_GROUP_CHANNELS` channels per group on a contiguous copy when the batch is bf16 on a CPU
(the channels_last CPU kernel handles about one group per instruction there), and hands the
result back in channels_last. This times both ways, forward + input gradient, at the four
ResNet-18 stage shapes (batch 128) and several group sizes, interleaved, and prints
time(channels_last kernel) / time(copy, contiguous kernel, copy back): above 1 the copies pay.
BatchNorm2d in channels_last is timed beside them for scale.

    PYTHONPATH=. python bench/norm_layout.py --threads 2             # bf16
    PYTHONPATH=. python bench/norm_layout.py --threads 2 --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from bench.common import add_common_args, apply_threads, measure_interleaved, paired_ratio, report
from rna_core.speed import SMALL_GROUP_CHANNELS

STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))  # ResNet-18 (CIFAR): channels, spatial size


def _pass(layer: nn.Module, x: torch.Tensor, via_contiguous: bool) -> None:
    x_req = x.detach().requires_grad_(True)
    out = layer(x_req.contiguous()).contiguous(memory_format=torch.channels_last) if via_contiguous else layer(x_req)
    torch.autograd.grad(out, [x_req], torch.ones_like(out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--group-channels", default="1,2,4,8,16,32", help="channels per group to time")
    p.add_argument("--stages", type=int, default=len(STAGES), help="how many of the ResNet-18 stages")
    add_common_args(p, repeats=5, warmup=1)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    cases, rows = {}, []
    for channels, size in STAGES[: args.stages]:
        x = (torch.randn(args.batch, channels, size, size, generator=gen) * 2 + 0.5).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        for d in (int(v) for v in args.group_channels.split(",")):
            if channels % d:
                continue
            gn = nn.GroupNorm(channels // d, channels).to(dtype)
            cases[f"gn C={channels} D={d} channels_last"] = lambda gn=gn, x=x: _pass(gn, x, False)
            cases[f"gn C={channels} D={d} via_contiguous"] = lambda gn=gn, x=x: _pass(gn, x, True)
            rows.append((channels, d))
        bn = nn.BatchNorm2d(channels).to(dtype)
        cases[f"bn C={channels} channels_last"] = lambda bn=bn, x=x: _pass(bn, x, False)
    timings = measure_interleaved(cases, args.batch, args.repeats, args.warmup)
    extra: dict[str, str] = {
        "sizes": f"batch={args.batch} dtype={args.dtype} threads={args.threads}",
        "rule in rna_core.speed": f"via contiguous when bf16/fp16 on CPU and D < {SMALL_GROUP_CHANNELS}",
    }
    for channels, d in rows:
        cl, via = timings[f"gn C={channels} D={d} channels_last"], timings[f"gn C={channels} D={d} via_contiguous"]
        r = paired_ratio(cl, via)
        extra[f"C={channels} D={d}: channels_last / via_contiguous"] = (
            f"{r:.2f} ({cl.median * 1e3:.1f} vs {via.median * 1e3:.1f} ms)"
        )
    first_cl, first_via = (
        timings[f"gn C={rows[0][0]} D={rows[0][1]} channels_last"],
        timings[f"gn C={rows[0][0]} D={rows[0][1]} via_contiguous"],
    )
    value = paired_ratio(first_cl, first_via)
    return report(
        "norm_layout",
        argv,
        timings,
        f"time({first_cl.name}) / time({first_via.name})",
        value,
        "> 1 (the copies pay for gns:1)",
        value > 1,
        extra,
        args.json,
    )


if __name__ == "__main__":
    main()
