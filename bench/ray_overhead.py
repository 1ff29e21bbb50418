"""Benchmark 4, `ray_overhead`: what running the epoch loop under Ray Train costs.

Part A: one adversarial-training epoch through Ray Train with 1 worker (cpus_per_worker=2, so 2
torch threads) vs the plain rna_core loop (`train_epoch`) in this process with 2 threads, on the
same data, model, batch, attack and seeds. Two numbers, reported apart because they answer
different questions:
  * per-epoch overhead: the `epoch_seconds` metric measured INSIDE the Ray worker (its second,
    warm epoch) vs the plain loop's warm epoch. Target: at most 1.10x.
  * end to end: the wall time of `TorchTrainer.fit()` (worker start-up, data load, 2 epochs,
    the loop's held-out evaluations, checkpoints) vs 2 plain epochs. Reported, no target: the
    fixed cost is paid once per job, not per epoch.
Part B: 2 workers (1 CPU each, DDP over gloo) vs 1 worker (1 CPU), per-epoch, reported.

Cases are interleaved (A B / B A) as in bench/common.py. No MLflow (mlflow=None in the loop
config): this measures Ray Train, not tracking.

    PYTHONPATH=. python bench/ray_overhead.py            # full size (~3-4 min on 2 cores)
    PYTHONPATH=. python bench/ray_overhead.py --tiny     # seconds: for tests
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import Timing, add_common_args, apply_threads, paired_ratio, paired_ratios, report
from rna_core.config import Config, config_from_dict, flatten

TARGET = 1.10


def bench_config(args: argparse.Namespace, workers: int, cpus: float, storage: str) -> Config:
    """The job every case runs (Ray and plain alike): synthetic data, small_cnn, PGD-k blackbox."""
    return config_from_dict(
        {
            "model": {"name": args.model, "method": "rna", "norm": "bn,gns:1"},
            "data": {
                "dataset": "synthetic",
                "synthetic_size": args.images,
                "batch_size": args.batch,
                "eval_batch_size": 64,
                "augment": False,
                "train_limit": args.images,
                "eval_limit": args.eval_images,
            },
            "train": {
                "epochs": args.epochs,
                "mode": "blackbox",
                "schedule": "constant",
                "seed": args.seed,
                "eval_pgd_steps": 2,
                "eval_every": 1000,
                "eot_iter": 1,
                "attack": {"steps": args.pgd_steps},
            },
            "ray": {
                "num_workers": workers,
                "cpus_per_worker": cpus,
                "use_gpu": "false",
                "address": "local",
                "storage_path": storage,
                "checkpoints_to_keep": 1,
            },
            "mlflow": {"experiment": "bench"},
        }
    )


def plain_epochs(cfg: Config, threads: int) -> list[float]:
    """`cfg.train.epochs` epochs of the plain loop, built exactly as the Ray worker builds them."""
    from rna_core.builders import effective_train_config
    from rna_core.builders import model_from_config as build_model
    from rna_core.data import BatchIterator, load_split
    from rna_core.distributed import epoch_shard_indices, mix_seed, seeded_steps, step_streams
    from rna_core.optim import build_optimizer, build_scheduler
    from rna_core.training import train_epoch

    torch.set_num_threads(threads)
    train_cfg = effective_train_config(cfg)
    seed = cfg.train.seed
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    data = load_split(cfg, "train")
    sampler, noise = step_streams(train_cfg, seed, 0)
    steps = -(-len(data) // cfg.data.batch_size)
    out = []
    for epoch in range(cfg.train.epochs):
        shard = data.subset(epoch_shard_indices(len(data), 0, 1, seed, epoch))
        batches = BatchIterator(
            shard,
            cfg.data.batch_size,
            shuffle=False,
            seed=mix_seed(seed, 0, 0xA06) % (1 << 31),
            epoch=epoch,
            augment=cfg.data.augment,
        )
        stats = train_epoch(
            model,
            seeded_steps(batches, sampler.generator, seed, 0, epoch * steps, noise),
            optimizer,
            train_cfg,
            sampler,
            noise_generator=noise,
        )
        scheduler.step()
        out.append(float(stats["epoch_seconds"]))
    return out


def ray_fit(cfg: Config, name: str) -> tuple[float, float, dict[str, Any]]:
    """(fit wall seconds, epoch_seconds of the last epoch measured in the worker, last metrics)."""
    from pipelines.cluster import DeviceChoice
    from pipelines.train import build_trainer

    trainer = build_trainer(
        cfg, name, {"config": flatten(cfg), "run_name": name, "mlflow": None}, DeviceChoice(False, "bench")
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.error:
        raise result.error
    return wall, float(result.metrics["epoch_seconds"]), dict(result.metrics)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, repeats=3, warmup=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for tests (numbers meaningless)")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="per fit; the last (warm) epoch is compared")
    parser.add_argument("--eval-images", type=int, default=64, help="held-out slice the loop evaluates")
    parser.add_argument("--scaling-repeats", type=int, default=1, help="rounds of part B (2 vs 1 workers); 0 skips it")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.batch, args.pgd_steps, args.eval_images = 64, 32, 1, 16
        args.repeats, args.warmup = 1, 0
        args.scaling_repeats = min(args.scaling_repeats, 0)  # each Ray fit costs ~20 s of start-up: tests skip part B
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    apply_threads(args.threads)
    load_at_start = " ".join(f"{v:.2f}" for v in os.getloadavg())

    import ray

    from pipelines.cluster import ensure_ray

    storage = tempfile.mkdtemp(prefix="rna-bench-ray-")
    cfg_ray1 = bench_config(args, 1, 2.0, storage)
    t0 = time.perf_counter()
    ensure_ray(cfg_ray1)  # the same start-up a training job gets (address local: a private instance)
    ray_start = time.perf_counter() - t0
    try:
        n_img = args.images
        ray_epoch, plain_epoch = Timing("ray_1w_2cpu_epoch", n_img), Timing("plain_2threads_epoch", n_img)
        ray_wall, plain_wall = (
            Timing("ray_1w_2cpu_fit_wall", n_img * args.epochs),
            Timing("plain_2threads_all_epochs", n_img * args.epochs),
        )
        digests: dict[str, float] = {}
        for _ in range(args.warmup):  # untimed: imports, allocator, first worker spawn
            plain_epochs(cfg_ray1, 2)
        for r in range(args.repeats):
            order = ["ray", "plain"] if r % 2 == 0 else ["plain", "ray"]
            for case in order:
                if case == "ray":
                    wall, epoch_s, metrics = ray_fit(cfg_ray1, f"ray1-{r}")
                    ray_wall.seconds.append(wall)
                    ray_epoch.seconds.append(epoch_s)
                    digests["ray_train_loss"] = metrics["train_loss"]
                else:
                    start = time.perf_counter()
                    epochs = plain_epochs(cfg_ray1, 2)
                    plain_wall.seconds.append(time.perf_counter() - start)
                    plain_epoch.seconds.append(epochs[-1])

        # Part B: 2 workers x 1 CPU vs 1 worker x 1 CPU (per-epoch, in the workers).
        cfg_w1, cfg_w2 = bench_config(args, 1, 1.0, storage), bench_config(args, 2, 1.0, storage)
        w1, w2 = Timing("ray_1w_1cpu_epoch", n_img), Timing("ray_2w_1cpu_epoch", n_img)
        w1_wall, w2_wall = Timing("ray_1w_1cpu_fit_wall", n_img), Timing("ray_2w_1cpu_fit_wall", n_img)
        for r in range(args.scaling_repeats):
            for k in [1, 2] if r % 2 == 0 else [2, 1]:
                wall, epoch_s, _ = ray_fit(cfg_w1 if k == 1 else cfg_w2, f"w{k}-{r}")
                (w1 if k == 1 else w2).seconds.append(epoch_s)
                (w1_wall if k == 1 else w2_wall).seconds.append(wall)
    finally:
        ray.shutdown()

    per_epoch = paired_ratio(ray_epoch, plain_epoch)
    end_to_end = paired_ratio(ray_wall, plain_wall)
    fixed = [w - 2 * e for w, e in zip(ray_wall.seconds, ray_epoch.seconds)] if args.epochs == 2 else []
    speedup = paired_ratio(w1, w2) if w1.seconds else float("nan")
    extra = {
        "ray_start_seconds (ray.init, not in any timing)": f"{ray_start:.2f}",
        "end-to-end ratio fit()/plain (2 epochs; startup, evals, checkpoints included; no target)": f"{end_to_end:.3f}",
        "fixed cost per fit estimate (fit wall - epochs x worker epoch), s": ", ".join(f"{f:.1f}" for f in fixed)
        or "n/a",
        "2 workers vs 1 (1 CPU each) per-epoch speedup (epoch 1w / epoch 2w)": f"{speedup:.3f}",
        "2 workers vs 1 fit-wall speedup": f"{paired_ratio(w1_wall, w2_wall):.3f}" if w1_wall.seconds else "skipped",
        "timings part B": "; ".join(t.summary() for t in (w1, w2, w1_wall, w2_wall)) if w1.seconds else "skipped",
        "setup": f"{args.model}, {args.images} synthetic images, batch {args.batch}, PGD-{args.pgd_steps} blackbox, "
        f"{args.epochs} epochs per fit, held-out {args.eval_images}",
        "load_average_at_start (1/5/15 min)": load_at_start,
    }
    return report(
        "ray_overhead",
        argv,
        {t.name: t for t in (ray_epoch, plain_epoch, ray_wall, plain_wall)},
        "ray_1w_epoch/plain_epoch",
        per_epoch,
        f"<= {TARGET:.2f}",
        per_epoch <= TARGET,
        extra,
        args.json,
        rounds=paired_ratios(ray_epoch, plain_epoch),
    )


if __name__ == "__main__":
    main()
