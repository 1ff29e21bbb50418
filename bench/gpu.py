"""Benchmark 6, `gpu`: ResNet-18 PGD-10 adversarial training throughput on a lent GPU.

Measures images/s of rna_core's blackbox PGD-10 training step (the paper's recipe: ResNet-18,
RNA space `bn,gns:1`, batch 128) in fp32 and with bf16 autocast + channels_last, side by side
(interleaved blocks of steps), the FLOPs of a step (counted by torch's FlopCounterMode) and the
model-FLOPs utilisation (MFU) they imply, and the projected wall time of the paper's 200-epoch
recipe on CIFAR-10 (50,000 training images; plus a PGD-20 evaluation of 1,000 images per epoch).

Batches come from an in-memory uint8 dataset already on the device, augmented there (random
crop + flip), as the training job does. Only torch, numpy and rna_core are needed (no Ray,
MLflow or attack libraries), so it runs on a bare GPU machine:

    bash bench/gpu.sh                                   # = PYTHONPATH=. python3 bench/gpu.py
    PYTHONPATH=. python bench/gpu.py --device cpu --tiny   # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.common import (
    command_line,
    machine,
    measure_interleaved,
    median_interval,
    paired_ratio,
    paired_ratios,
    report,
    synchronizer,
)
from bench.gpu_checks import run_checks
from rna_core import create_model
from rna_core.config import AttackConfig, TrainConfig
from rna_core.data import BatchIterator, make_synthetic
from rna_core.determinism import apply_backend_settings
from rna_core.distributed import seeded_steps, step_streams
from rna_core.optim import build_optimizer
from rna_core.paths import PathSampler
from rna_core.speed import AutocastForward, as_channels_last, use_channels_last
from rna_core.training import evaluate_pgd, train_step

CIFAR_TRAIN_IMAGES = 50_000
# Dense bf16 tensor-core peaks (vendor figures, FLOP/s). MFU is quoted against these for every
# variant, fp32 included (its convolutions run on TF32 tensor cores, whose peak is half of this).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}

VARIANTS = {
    # name: (norm, channels_last, amp_bf16), explicit (never `auto`)
    "fp32": ("bn,gns:1", False, False),
    "bf16_cl": ("bn,gns:1", True, True),
    "bn_fp32": ("bn", False, False),
    "bn_bf16_cl": ("bn", True, True),
}


@dataclass
class Sizes:
    model: str
    batch: int
    pgd_steps: int
    steps_per_call: int
    repeats: int
    warmup: int
    dataset_size: int
    eval_batch: int


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.tiny:
        return Sizes("small_cnn", 8, 2, 1, 1, 1, 32, 8)
    return Sizes(
        args.model, args.batch, args.pgd_steps, args.steps_per_call, args.repeats, args.warmup, args.dataset_size, 256
    )


def peak_for_name(name: str) -> float | None:
    """The bf16 peak of a GPU from its name, matching whole model tokens ("L4" is not "L40S")."""
    tokens = {t.upper() for t in re.findall(r"[A-Za-z0-9]+", name)}
    hits = [value for key, value in PEAK_BF16_FLOPS.items() if key in tokens]
    return hits[0] if len(hits) == 1 else None


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


class PartialReport:
    """The JSON of a run written after every stage, so an error late in a lent GPU window keeps the
    results measured before it; optional parts that fail are recorded under "errors", the rest runs."""

    def __init__(self, path: str | None, argv: list[str] | None):
        self.path = path
        self.data: dict[str, Any] = {
            "bench": "gpu",
            "complete": False,
            "command": command_line("bench/gpu.py", sys.argv[1:] if argv is None else list(argv)),
            "machine": machine(),
            "checks": {},
            "extra": {},
            "errors": {},
        }

    def put(self, section: str, key: str, value: Any) -> None:
        self.data[section][key] = value
        self.flush()

    def optional(self, part: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except Exception as exc:  # recorded, and the run goes on without this part
            self.put("errors", part, f"{type(exc).__name__}: {exc}")
            print(f"gpu.py: {part} failed ({type(exc).__name__}: {exc}); going on without it", file=sys.stderr)
            return default

    def flush(self) -> None:
        if not self.path:
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, target)


class Variant:
    """A model, optimizer, sampler and endless batch stream for one speed setting."""

    def __init__(self, name: str, sizes: Sizes, device: torch.device, seed: int):
        norm, channels_last, amp = VARIANTS[name]
        self.name = name
        self.cfg = TrainConfig(
            mode="blackbox", attack=AttackConfig(steps=sizes.pgd_steps), channels_last=channels_last, amp_bf16=amp
        )
        torch.manual_seed(seed)
        self.model = create_model(sizes.model, norm=norm).to(device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        # The training job's streams: paths on the CPU, the random start on the device, reseeded per step.
        self.sampler, self.noise = step_streams(self.cfg, seed, 0, device)
        data = make_synthetic(sizes.dataset_size, seed=seed)
        self.batches = BatchIterator(
            data, sizes.batch, shuffle=True, seed=seed, drop_last=True, augment=True, device=device
        )
        self._stream = seeded_steps(self._endless(), self.sampler.generator, seed, 0, 0, self.noise)
        self.steps_per_call = sizes.steps_per_call

    def _endless(self):
        epoch = 0
        while True:
            self.batches.set_epoch(epoch)
            yield from self.batches
            epoch += 1

    def step(self) -> None:
        x, y = next(self._stream)
        train_step(self.model, x, y, self.optimizer, self.cfg, self.sampler, noise_generator=self.noise)

    def call(self) -> None:
        for _ in range(self.steps_per_call):
            self.step()


def flops_per_image(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pgd_steps: int) -> float:
    """FLOPs of one training step per image: k attack passes (forward + input-only backward) and
    one update pass (forward + full backward), each counted by FlopCounterMode on a model copy.

    Counted piecewise because FlopCounterMode's module tracker refuses `torch.autograd.grad`;
    `backward(inputs=[x])` runs the same input-only backward.
    """
    m = copy.deepcopy(model).train()

    def count(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    def attack_pass() -> None:
        x_req = x.detach().requires_grad_(True)
        F.cross_entropy(m(x_req), y).backward(inputs=[x_req])

    def update_pass() -> None:
        F.cross_entropy(m(x), y).backward()

    return (pgd_steps * count(attack_pass) + count(update_pass)) / x.shape[0]


def eval_batch(variant: Variant, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation batch of about `sizes.eval_batch` images: training batches repeated."""
    x, y = next(variant._stream)
    reps = max(1, sizes.eval_batch // x.shape[0])
    return x.repeat(reps, 1, 1, 1), y.repeat(reps)


def eval_images_per_second(
    variant: Variant, sizes: Sizes, device: torch.device, sync, bf16: bool = False
) -> tuple[float, float]:
    """PGD-20 evaluation (transfer protocol, eval mode) throughput and accuracy on one eval batch.

    fp32 by default (what evaluations run); `bf16`: the same weights in channels_last with the
    forward under bf16 autocast (`AutocastForward`; loss, gradient and the attack's steps fp32).
    """
    x, y = eval_batch(variant, sizes)
    model: torch.nn.Module = variant.model
    if bf16:
        model = AutocastForward(use_channels_last(copy.deepcopy(variant.model)))
        x = as_channels_last(x)
    evaluate_pgd(model, [(x, y)], PathSampler("uniform", seed=1), steps=20)  # warm-up
    sync()
    start = time.perf_counter()
    correct, n = evaluate_pgd(model, [(x, y)], PathSampler("uniform", seed=2), steps=20)
    sync()
    variant.model.train()
    return x.shape[0] / (time.perf_counter() - start), correct / max(n, 1)


def vs_torchattacks(variant: Variant, sizes: Sizes, sync, repeats: int) -> str:
    """Benchmark 3 on this device: torchattacks' PGD-20 vs ours, same model, path and eval batch.

    torchattacks is not on the bare GPU machines: carry its wheel (see bench/gpu.sh) to get this
    line; without it the line says so and nothing else changes.
    """
    try:
        from bench.vs_torchattacks import pgd_cases
    except ImportError as exc:
        return f"skipped ({exc.name or 'torchattacks'} not importable; carry the wheel, see bench/gpu.sh)"
    from rna_core import sample_path, set_path

    x, y = eval_batch(variant, sizes)
    model = variant.model.eval()
    path = sample_path(model, "uniform", torch.Generator().manual_seed(0))
    set_path(model, path)
    t = measure_interleaved(pgd_cases(model, x, y, path, 20, 0), x.shape[0], repeats, 1, sync)
    model.train()
    low, high, coverage = median_interval(paired_ratios(t["torchattacks"], t["ours"]))
    return (
        f"time(torchattacks) / time(ours) = {paired_ratio(t['torchattacks'], t['ours']):.3f} "
        f"[{low:.3f}, {high:.3f} at {coverage:.0%}] (PGD-20 fixed path, eval mode, fp32, batch {x.shape[0]}; "
        "target >= 1.0; "
        f"{t['ours'].items_per_second:.1f} vs {t['torchattacks'].items_per_second:.1f} images/s)"
    )


def _torchvision_version() -> str:
    try:
        import torchvision

        return torchvision.__version__
    except ImportError:
        return "absent"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small_cnn, batch 8, PGD-2, one step per call (CPU test)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--steps-per-call", type=int, default=30, help="training steps in one timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per variant first")
    p.add_argument("--dataset-size", type=int, default=8192, help="synthetic images held on the device")
    p.add_argument("--variants", default="fp32,bf16_cl,bn_bf16_cl", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=200, help="epochs of the projected recipe")
    p.add_argument("--eval-images", type=int, default=1000, help="images PGD-20-evaluated per epoch in the projection")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (0 = from the GPU's name)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="train.deterministic=true's backend settings (default: the job's default, cuDNN autotuning on)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; matters for --device cpu)"
    )
    p.add_argument("--no-checks", action="store_true", help="skip the correctness checks (bench/gpu_checks.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="result file, written after every stage and complete at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu.py: --device cuda but torch sees no GPU; pass --device cpu --tiny to try it on CPU")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"gpu.py: unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    sizes = sizes_from(args)
    partial = PartialReport(args.json, argv)
    if not args.no_checks:  # correctness first: quick, and what a short window must not lose
        run_checks(device, sizes.model, min(sizes.batch, 32), lambda k, v: partial.put("checks", k, v))
    backend = apply_backend_settings(args.deterministic)  # what the training job's workers set
    backend_text = f"train.deterministic={str(args.deterministic).lower()}: " + ", ".join(
        f"{k}={v}" for k, v in backend.items()
    )
    sync = synchronizer(device)
    variants = {n: Variant(n, sizes, device, args.seed) for n in names}
    first = variants[names[0]]
    x0, y0 = next(first._stream)
    flops = partial.optional("flop count", lambda: flops_per_image(first.model, x0, y0, sizes.pgd_steps), 0.0)
    timings = measure_interleaved(
        {n: v.call for n, v in variants.items()}, sizes.batch * sizes.steps_per_call, sizes.repeats, sizes.warmup, sync
    )
    for name, t in timings.items():
        partial.put("extra", f"{name} images/s", f"{t.items_per_second:.1f}")
    eval_ips, eval_acc = partial.optional(
        "PGD-20 eval (fp32)", lambda: eval_images_per_second(first, sizes, device, sync), (0.0, 0.0)
    )
    eval16_ips, eval16_acc = partial.optional(
        "PGD-20 eval (bf16 forward)", lambda: eval_images_per_second(first, sizes, device, sync, bf16=True), (0.0, 0.0)
    )
    peak = peak_flops(device, args.peak_tflops)
    best = max(timings.values(), key=lambda t: t.items_per_second if t.name in ("fp32", "bf16_cl") else 0.0)
    extra: dict[str, object] = {
        "software": f"torchvision={_torchvision_version()} cuda={torch.version.cuda} "
        f"cudnn={torch.backends.cudnn.version()}",
        "sizes": f"model={sizes.model} batch={sizes.batch} PGD-{sizes.pgd_steps} steps/call={sizes.steps_per_call} "
        f"repeats={sizes.repeats} device={device}",
        "backend settings (as the training job sets them)": backend_text,
        "GFLOP per image per training step": f"{flops / 1e9:.2f}",
    }
    for name, t in timings.items():
        achieved = t.items_per_second * flops
        mfu = f", MFU {achieved / peak:.1%} of {peak / 1e12:.4g} TFLOP/s peak" if peak else ", MFU n/a (unknown peak)"
        extra[f"{name}"] = f"{t.items_per_second:.1f} images/s, {achieved / 1e12:.3g} TFLOP/s{mfu}"
    train_s = args.epochs * CIFAR_TRAIN_IMAGES / best.items_per_second
    eval_s = args.epochs * args.eval_images / eval_ips if eval_ips > 0 else float("nan")
    extra["PGD-20 eval (fp32)"] = f"{eval_ips:.1f} images/s"
    if eval_ips > 0 and eval16_ips > 0:
        extra["PGD-20 eval (bf16 forward)"] = (
            f"{eval16_ips:.1f} images/s, {eval16_ips / eval_ips:.2f}x fp32; accuracy on the eval batch "
            f"{eval16_acc:.3f} vs fp32 {eval_acc:.3f} (same weights and seeds; one batch, untrained model: speed only)"
        )
    extra["vs_torchattacks on this device"] = partial.optional(
        "vs_torchattacks", lambda: vs_torchattacks(first, sizes, sync, sizes.repeats), "failed (see errors)"
    )
    extra[f"projected {args.epochs}-epoch recipe ({best.name})"] = (
        f"{(train_s + eval_s) / 3600:.2f} h (training {train_s / 3600:.2f} h + per-epoch PGD-20 eval of "
        f"{args.eval_images} images {eval_s / 3600:.2f} h; {backend_text})"
    )
    for key, value in extra.items():
        partial.put("extra", key, value)
    rounds: list[float] | None = None
    if "fp32" in timings and "bf16_cl" in timings:
        rounds = paired_ratios(timings["fp32"], timings["bf16_cl"])
        value, ratio_name = paired_ratio(timings["fp32"], timings["bf16_cl"]), "time(fp32) / time(bf16_cl)"
    else:
        value, ratio_name = 1.0, f"time({names[0]}) / time({names[0]})"
    if "bf16_cl" in timings and "bn_bf16_cl" in timings:
        extra["RNA overhead time(bf16_cl) / time(bn_bf16_cl)"] = (
            f"{paired_ratio(timings['bf16_cl'], timings['bn_bf16_cl']):.3f}"
        )
    extra["device checks"] = partial.data["checks"]
    if partial.data["errors"]:
        extra["errors (optional parts)"] = partial.data["errors"]
    result = report(
        "gpu",
        argv,
        timings,
        ratio_name,
        value,
        "> 1 (bf16+channels_last pays)",
        value > 1.0,
        extra,
        args.json,
        rounds=rounds,
    )
    partial.data = {**result, "complete": True}
    partial.flush()
    return result


if __name__ == "__main__":
    main()
