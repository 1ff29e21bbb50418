"""Benchmark 8, `norm_layout`: GroupNorm on a channels_last batch: torch's kernel, a contiguous copy, fused.

Why: `rna_core.speed.use_channels_last` routes GroupNorm layers with fewer than
`SMALL_GROUP_CHANNELS` channels per group around torch's channels_last CPU kernel when the batch
is bf16 (that kernel handles about one group per instruction there): with one channel per group
(`gns:1`) through the fused kernel torch.compile builds for `rna_core.speed.ChannelsLastGroupNorm`,
otherwise (or where that kernel cannot be built) through a contiguous copy and back. This times
the three ways (fused: one channel per group only), forward + input gradient, at the
four ResNet-18 stage shapes (batch 128) and several group sizes, interleaved, and prints
time(copy route) / time(fused) (the headline, for `gns:1` at the first stage: above 1 the fused
kernel pays) and time(channels_last kernel) / time(copy route). BatchNorm2d in channels_last is
timed beside them for scale: the fused `gns:1` against it is what RNA's cost over BN comes from.

    PYTHONPATH=. python bench/norm_layout.py --threads 2             # bf16
    PYTHONPATH=. python bench/norm_layout.py --threads 2 --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import copy

import torch
import torch.nn as nn

from bench.common import add_common_args, apply_threads, measure_interleaved, paired_ratio, report
from rna_core import speed
from rna_core.speed import SMALL_GROUP_CHANNELS, ChannelsLastGroupNorm, use_channels_last

STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))  # ResNet-18 (CIFAR): channels, spatial size


def _pass(layer: nn.Module, x: torch.Tensor, via_contiguous: bool) -> None:
    x_req = x.detach().requires_grad_(True)
    out = layer(x_req.contiguous()).contiguous(memory_format=torch.channels_last) if via_contiguous else layer(x_req)
    torch.autograd.grad(out, [x_req], torch.ones_like(out))


def _fused(gn: nn.GroupNorm) -> nn.Module:
    """A copy of `gn` as a model's layer gets it from use_channels_last (the fused route in bf16)."""
    layer = use_channels_last(nn.Sequential(copy.deepcopy(gn)))
    assert isinstance(layer[0], ChannelsLastGroupNorm)
    return layer


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
            if dtype == torch.bfloat16 and d == 1:  # the case ChannelsLastGroupNorm fuses
                cases[f"gn C={channels} D={d} fused"] = lambda gn=_fused(gn), x=x: _pass(gn, x, False)
            rows.append((channels, d))
        bn = nn.BatchNorm2d(channels).to(dtype)
        cases[f"bn C={channels} channels_last"] = lambda bn=bn, x=x: _pass(bn, x, False)
    timings = measure_interleaved(cases, args.batch, args.repeats, args.warmup)
    extra: dict[str, str] = {
        "sizes": f"batch={args.batch} dtype={args.dtype} threads={args.threads}",
        "rule in rna_core.speed": (
            f"bf16/fp16 on CPU: fused when D = 1, via contiguous when 1 < D < {SMALL_GROUP_CHANNELS}"
        ),
    }
    for channels, d in rows:
        cl, via = timings[f"gn C={channels} D={d} channels_last"], timings[f"gn C={channels} D={d} via_contiguous"]
        r = paired_ratio(cl, via)
        extra[f"C={channels} D={d}: channels_last / via_contiguous"] = (
            f"{r:.2f} ({cl.median * 1e3:.1f} vs {via.median * 1e3:.1f} ms)"
        )
        fused = timings.get(f"gn C={channels} D={d} fused")
        if fused is not None:
            bn = timings[f"bn C={channels} channels_last"]
            extra[f"C={channels} D={d}: via_contiguous / fused"] = (
                f"{paired_ratio(via, fused):.2f} ({via.median * 1e3:.1f} vs {fused.median * 1e3:.1f} ms); "
                f"fused / bn {paired_ratio(fused, bn):.2f}"
            )
    head = f"gn C={rows[0][0]} D={rows[0][1]}"
    if f"{head} fused" in timings:
        if not speed.fused_group_norm_active():
            raise SystemExit(f"norm_layout: the fused GroupNorm could not be built: {speed._fused_state['failure']}")
        slow, fast = timings[f"{head} via_contiguous"], timings[f"{head} fused"]
        criterion = "> 1 (the fused kernel pays)"
    else:  # fp32, or the first group size not one channel: the question is whether the copies pay
        slow, fast = timings[f"{head} channels_last"], timings[f"{head} via_contiguous"]
        criterion = "> 1 (the copies pay)"
    value = paired_ratio(slow, fast)
    ratio_name = f"time({slow.name}) / time({fast.name})"
    return report("norm_layout", argv, timings, ratio_name, value, criterion, value > 1, extra, args.json)


if __name__ == "__main__":
    main()
