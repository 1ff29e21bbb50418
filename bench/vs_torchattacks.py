"""Benchmark 3, `vs_torchattacks`: our PGD-20 evaluation vs torchattacks' PGD, same model and batch.

Both sides do the same work: PGD-20 (eps 8/255, step 2/255, random start) on one fixed path of
the model in eval mode, then one scoring forward on that path (protocol `fixed-path`). Ours is
`rna_core.training.evaluate_pgd`; theirs is `torchattacks.PGD` (torchattacks 3.3.0) plus the
scoring forward. Before timing, both attacks run without random start from the same input and
must agree (their projection arithmetic differs slightly: torchattacks clamps `x_adv - x`, we
clamp `x_adv` to the ball, so a gradient sign can flip at a rounding boundary; the check allows
a small fraction of differing pixels). Target: ours not slower (ratio >= 1.0).

    PYTHONPATH=. python bench/vs_torchattacks.py              # ResNet-18, bn,gns:1, batch 32
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torchattacks

from bench.common import (
    add_common_args,
    apply_threads,
    measure_interleaved,
    paired_ratio,
    paired_ratios,
    random_batch,
    report,
    synchronizer,
)
from rna_core import create_model, sample_path, set_path
from rna_core.attacks.pgd import pgd_linf
from rna_core.paths import PathSampler
from rna_core.training import evaluate_pgd

TARGET = 1.0
EPS, STEP = 8 / 255, 2 / 255


def check_agreement(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, max_fraction: float
) -> dict[str, float]:
    """Both PGDs without random start on the current path: same ball, (almost) the same result."""
    ours = pgd_linf(model, x, y, EPS, STEP, steps, use_random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=steps, random_start=False)(x, y)
    differing = ((ours - theirs).abs() > 1e-6).float().mean().item()
    for name, adv in (("ours", ours), ("torchattacks", theirs)):
        assert (adv - x).abs().max().item() <= EPS + 1e-6, f"{name} left the eps ball"
        assert adv.min().item() >= 0 and adv.max().item() <= 1, f"{name} left the [0, 1] box"
    assert differing <= max_fraction, f"the two PGDs differ in {differing:.2%} of pixels (> {max_fraction:.2%})"
    with torch.no_grad():
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(theirs).argmax(1) == y).float().mean().item()
    return {"fraction_of_pixels_differing": differing, "acc_ours": acc_ours, "acc_torchattacks": acc_theirs}


def pgd_cases(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, path, steps: int, seed: int
) -> dict[str, Callable[[], None]]:
    """The two timed calls: torchattacks' PGD + a scoring forward, and our fixed-path PGD evaluation.

    Shared with bench/gpu.py, which runs the same comparison on a GPU when torchattacks is there.
    """
    ours_sampler = PathSampler(f"fixed:{path}", seed=seed)
    atk = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=steps, random_start=True)

    def ours() -> None:
        evaluate_pgd(model, [(x, y)], ours_sampler, protocol="fixed-path", steps=steps)

    def theirs() -> None:
        set_path(model, path)
        adv = atk(x, y)
        with torch.no_grad():
            int((model(adv).argmax(1) == y).sum().item())

    return {"torchattacks": theirs, "ours": ours}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--norm", default="bn,gns:1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-differing", type=float, default=0.01, help="fraction of pixels allowed to differ in the check"
    )
    add_common_args(p, repeats=7, warmup=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    x, y = random_batch(args.batch, args.seed, device)
    torch.manual_seed(args.seed)
    model = create_model(args.model, norm=args.norm).to(device).eval()
    path = sample_path(model, "uniform", torch.Generator().manual_seed(args.seed))
    set_path(model, path)
    agreement = check_agreement(model, x, y, args.pgd_steps, args.max_differing)

    timings = measure_interleaved(
        pgd_cases(model, x, y, path, args.pgd_steps, args.seed),
        args.batch,
        args.repeats,
        args.warmup,
        synchronizer(device),
    )
    value = paired_ratio(timings["torchattacks"], timings["ours"])
    extra = {
        "sizes": f"model={args.model} norm={args.norm} path={path} batch={args.batch} PGD-{args.pgd_steps} "
        f"eval mode device={device}",
        "agreement check (no random start)": ", ".join(f"{k}={v:.4f}" for k, v in agreement.items()),
    }
    return report(
        "vs_torchattacks",
        argv,
        timings,
        "time(torchattacks) / time(ours)",
        value,
        f">= {TARGET}",
        value >= TARGET,
        extra,
        args.json,
        rounds=paired_ratios(timings["torchattacks"], timings["ours"]),
    )


if __name__ == "__main__":
    main()
