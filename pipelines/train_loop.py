"""The per-worker function of the Ray Train job: the rna_core epoch loop under DDP.

Each Ray Train worker builds the model, optimizer, scheduler and its shard of the data, resumes
from `ray.train.get_checkpoint()` when there is one, and runs `rna_core.training.train_epoch` once
per epoch. After every epoch: BatchNorm statistics are averaged over ranks, the held-out slice
is evaluated (sharded over ranks), and the validation split when `data.val_size` > 0; an epoch
that beats the kept one on a selection (`rna_core.selection`: `val`, and `test` on request)
has its weights written to `<run folder>/selected_<which>/`; rank 0 writes the checkpoint and logs
to MLflow, and every rank reports to Ray. At the end the last epoch's weights (the result) and
each selected epoch's are evaluated on the held-out slice under `transfer` and `eot`, same seeds.

DDP and random paths (the decision this module is built around)
----------------------------------------------------------------
By default (`train.rank_paths: shared`) all ranks run the same attack path and the same update
path in a step: the paths come from one stream seeded at every step with `(seed, step)` alone,
so the global batch trains one sub-network per step, as the official code's `DataParallel` does
(and as a single process with the same seed does: the stream does not depend on the world size).
The PGD random start is data, not a path: it comes from a second generator seeded with
`(seed, rank, step)`, so each rank draws its own noise for its own images. A run is reproducible,
also across a resume (which restarts at an epoch boundary). `train.rank_paths: per_rank` is the
alternative: one generator per rank, seeded with `(seed, rank, step)`, draws that rank's paths
and noise, so W ranks train W sub-networks per step (W paths x B/W images instead of one path x B).

Gradients are the standard DDP average in both cases. `find_unused_parameters=True` is needed
because inactive candidates take no part in the update's forward: DDP marks a locally unused
parameter ready with a zero gradient, so the all-reduce never waits for it (with per-rank paths a
candidate may be used on one rank only and still gets the average), and a parameter no rank used
keeps `grad=None` on every rank. `rna_core.training` then gives those a zero gradient
(`train.inactive_candidates: decay`, the official loops' behaviour: weight decay and momentum
every step) or leaves them to SGD's skip (`skip`). Either way the decision is the same on every
rank, so gradients, and the parameters after every step, are identical on all ranks.

The attack runs on the bare module (`attack_model=ddp.module`): its forwards skip DDP, and its
backward passes are `torch.autograd.grad` with respect to the input only, which never reaches
the parameters' gradient-accumulation hooks, so DDP's reducer only ever sees the update step.

Buffers: `broadcast_buffers=False`. In train mode BatchNorm normalizes with batch statistics,
so running statistics never influence training; every rank accumulates them over its own data
and paths, and they are averaged over ranks at the end of each epoch (before evaluation and
the checkpoint). Broadcasting rank 0's buffers at every forward, DDP's default, would cost a
collective per step and throw away the other ranks' statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path as FsPath
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from rna_core.checkpoint import load_checkpoint, save_checkpoint
from rna_core.builders import effective_train_config, model_from_config
from rna_core.config import Config, TrainConfig, unflatten
from rna_core.data import BatchIterator, ImageTensorDataset, load_dataset
from rna_core.errors import ConfigError
from rna_core.optim import apply_config_on_resume, build_optimizer, build_scheduler
from rna_core.paths import PathSampler
from rna_core.selection import BestEpoch, Criterion, selection_criterion, selections_of, split_metric
from rna_core.speed import use_channels_last
from rna_core.training import evaluate_clean, evaluate_pgd, train_epoch

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
DATA_SEED = 0  # the synthetic task (class patterns) is fixed; train.seed varies the training only
SUBSET_SEED = 0x5E1EC7  # which rows train_limit / eval_limit keep: fixed, so every run sees the same slice
VAL_SEED = 0x7A11D  # which training rows data.val_size holds out: fixed, the same in every run and job
SELECTED_DIR = "selected_{which}"  # beside the epoch checkpoints in the run folder: the selected epoch's weights

EPOCH_METRICS = ("train_loss", "train_acc", "clean_acc", "pgd20_acc", "lr", "epoch_seconds", "images_per_second")
FINAL_METRICS = ("final_clean_acc", "final_pgd20_transfer_acc", "final_eot_pgd_acc")
# The evaluation job's naming, acc_<attack>_<protocol>, logged beside the final_* names.
EVAL_JOB_ALIASES = {
    "final_clean_acc": "acc_natural_transfer",  # clean accuracy on a fresh random path, as evaluate names it
    "final_pgd20_transfer_acc": "acc_pgd20_transfer",
    "final_eot_pgd_acc": "acc_eot_pgd_eot",
}


# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: Config) -> nn.Module:
    """The one place a training run builds its network (so the builder can change in one spot)."""
    return model_from_config(cfg)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash())."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def epoch_shard_indices(n: int, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """Rows of rank `rank` in epoch `epoch`: a global permutation from (seed, epoch), strided.

    Like `DistributedSampler`: the shards are disjoint, of equal length (the `n % world`
    leftover rows of the permutation sit out this epoch, so every rank runs the same number of
    steps), and they mix anew every epoch, so no rank sees only one fixed part of the data.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED)))
    per_rank = n // world
    return perm[rank : per_rank * world : world]


def per_worker_batch_size(global_batch: int, world: int) -> int:
    """`data.batch_size` is the global batch (the paper's 128 whatever the worker count)."""
    return max(1, global_batch // world)


SHARED_PATH_STREAM = -0x5A7  # the `rank` slot of the path stream that every rank shares


def step_streams(train_cfg: TrainConfig, seed: int, rank: int) -> tuple[PathSampler, torch.Generator | None]:
    """The path sampler and the noise generator of a rank (None: the sampler's generator draws both).

    `train.rank_paths: shared` gives a separate noise generator, so that `seeded_steps` can seed
    the paths from (seed, step) on every rank and the random start from (seed, rank, step).
    """
    sampler = PathSampler(train_cfg.sampling, seed=mix_seed(seed, rank))
    return sampler, (torch.Generator() if train_cfg.rank_paths == "shared" else None)


def seeded_steps(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
    seed: int,
    rank: int,
    first_step: int,
    noise_generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the batches, reseeding the step's generators before each one.

    Without `noise_generator` (per-rank paths), `generator` draws the step's paths and its PGD
    random start and is seeded from (seed, rank, global step). With it (shared paths), `generator`
    draws the paths only and is seeded from (seed, global step), the same on every rank, and
    `noise_generator` is seeded from (seed, rank, global step). What step k does is a function of
    (seed, rank, k) alone: reproducible, and unchanged by a resume.
    """
    step = first_step
    for batch in batches:
        if noise_generator is None:
            generator.manual_seed(mix_seed(seed, rank, step))
        else:
            generator.manual_seed(mix_seed(seed, SHARED_PATH_STREAM, step))
            noise_generator.manual_seed(mix_seed(seed, rank, step))
        yield batch
        step += 1


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP with the semantics in the module docstring (unused params allowed, buffers local)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 renames broadcast_buffers to forward_sync_buffers (same meaning for False here:
    # buffers are still synced once at construction, which is harmless, ranks start identical).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}
    else:
        no_buffer_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        **no_buffer_sync,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating buffers (BN running stats) over ranks; integer ones come from rank 0."""
    if not _distributed():
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


def _digest_update(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest_update(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _digest_update(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def state_digest(state: nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 of a module's state_dict (parameters and buffers) or of any nested state dict.

    Bit-exact: two replicas agree only if every tensor is identical, which is what DDP promises.
    """
    h = hashlib.sha256()
    _digest_update(h, state.state_dict() if isinstance(state, nn.Module) else state)
    return h.hexdigest()


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def eval_shard(dataset: ImageTensorDataset, rank: int, world: int) -> ImageTensorDataset:
    """Rows rank::world of the held-out slice (no trimming: evaluation has no per-step collective)."""
    return dataset.subset(torch.arange(rank, len(dataset), world))


def evaluate_sharded(
    model: nn.Module,
    held_out: ImageTensorDataset,
    cfg: Config,
    rank: int,
    world: int,
    device: torch.device,
    seed: int,
    protocols: tuple[str, ...] = ("clean", "transfer"),
    strategy: str | None = None,
) -> dict[str, float]:
    """Accuracy on the held-out slice, each rank scoring its share; counts summed over ranks.

    `protocols`: "clean", and PGD protocols of `rna_core.training.evaluate_pgd` ("transfer",
    "eot", "fixed-path"). Paths come from a generator seeded with (seed, rank, protocol), apart
    from the training stream, with `strategy` (default: train.sampling). Returns {protocol:
    accuracy} plus "n".
    """
    shard = eval_shard(held_out, rank, world)
    t = cfg.train
    counts: list[float] = []
    for i, protocol in enumerate(protocols):
        batches = BatchIterator(shard, cfg.data.eval_batch_size, shuffle=False, seed=0, device=device)
        sampler = PathSampler(strategy or t.sampling, seed=mix_seed(seed, rank, 0xE7A1, i))
        if protocol == "clean":
            correct, n = evaluate_clean(model, batches, sampler)
        else:
            correct, n = evaluate_pgd(
                model, batches, sampler, protocol=protocol, eps=t.attack.eps, step_size=t.attack.step_size,
                steps=t.eval_pgd_steps, eot_iter=t.eot_iter,
            )
        counts += [float(correct), float(n)]
    totals = _all_reduce(counts, device)
    out = {p: totals[2 * i] / max(totals[2 * i + 1], 1.0) for i, p in enumerate(protocols)}
    out["n"] = totals[1] if totals else 0.0
    return out


def fixed_subset(dataset: ImageTensorDataset, limit: int) -> ImageTensorDataset:
    """`limit` rows picked by a fixed seed (the same in every run and job), kept in file order.

    Not simply the first rows: dataset files may be sorted by class (the offline CIFAR Parquet
    copies are), and the first 1000 rows would then be one class. 0 (or more rows than there
    are) means the whole dataset.
    """
    if not limit or limit >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return dataset.subset(perm[:limit].sort().values)


def load_split(cfg: Config, split: str) -> ImageTensorDataset:
    """Training data (`train_limit` rows, after `val_size` rows are held out) or the held-out
    slice (`eval_limit` test rows), see fixed_subset and training_splits."""
    if split == "train":
        return training_splits(cfg)[0]
    d = cfg.data
    ds = load_dataset(d.dataset, split, data_dir=d.data_dir, download=False, synthetic_size=d.synthetic_size, seed=DATA_SEED)
    return fixed_subset(ds, d.eval_limit)


def validation_rows(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows) of a training file of `n` rows, both in file order.

    A fixed permutation (VAL_SEED) picks the `val_size` validation rows, so they are spread over
    the classes of a class-sorted file, the same in every run, and disjoint from the rest.
    """
    if not 0 <= val_size < n:
        raise ConfigError(f"data.val_size ({val_size}) must be smaller than the training set ({n} images); lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[:val_size].sort().values, perm[val_size:].sort().values


def training_splits(cfg: Config) -> tuple[ImageTensorDataset, ImageTensorDataset | None]:
    """(rows to train on, validation split or None) of the training file: never overlapping.

    `data.val_size` rows are held out first (validation_rows); `data.train_limit` then keeps a
    fixed subset of the rest. With val_size 0 the training rows are those of earlier versions.
    """
    d = cfg.data
    full = load_dataset(d.dataset, "train", data_dir=d.data_dir, download=False, synthetic_size=d.synthetic_size, seed=DATA_SEED)
    if d.val_size <= 0:
        return fixed_subset(full, d.train_limit), None
    val_idx, train_idx = validation_rows(len(full), d.val_size)
    return fixed_subset(full.subset(train_idx), d.train_limit), full.subset(val_idx)


def say(line: str) -> None:
    """Print one line from a worker exactly once.

    Ray Train patches `print` in workers to also go through its logger, and tees when another
    library has wrapped `sys.stdout`: plain prints then reach the driver twice (or not at all
    at WARNING level). Writing to the process's own stdout bypasses both.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def format_epoch_line(run_name: str, epoch: int, epochs: int, m: Mapping[str, float]) -> str:
    """One readable progress line per epoch."""
    parts = [f"[{run_name}] epoch {epoch}/{epochs}", f"loss {m['train_loss']:.4f}", f"train_acc {m['train_acc']:.3f}"]
    if "clean_acc" in m:
        parts.append(f"clean_acc {m['clean_acc']:.3f}")
    if "pgd20_acc" in m:
        parts.append(f"pgd20_acc {m['pgd20_acc']:.3f}")
    if "val_pgd20_acc" in m:
        parts.append(f"val_pgd20_acc {m['val_pgd20_acc']:.3f}")
    parts += [f"lr {m['lr']:.4g}", f"{m['images_per_second']:.0f} img/s", f"{m['epoch_seconds']:.1f}s"]
    return "  ".join(parts)


def write_checkpoint_dir(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    cfg: Config,
    extra: Mapping[str, Any],
) -> FsPath:
    """`checkpoint.pt` (rna_core format) plus `meta.json` (epoch, run id: readable without torch)."""
    d = FsPath(directory)
    save_checkpoint(d / CHECKPOINT_FILE, model, optimizer, scheduler, epoch=epoch, config=cfg, extra=dict(extra))
    (d / META_FILE).write_text(json.dumps({"epoch": epoch, **{k: v for k, v in extra.items() if k != "metrics"}, "metrics": dict(extra.get("metrics", {}))}, indent=1))
    return d / CHECKPOINT_FILE


def selection_scores(
    model: nn.Module,
    criterion: Criterion,
    best: Mapping[str, BestEpoch],
    held_out: ImageTensorDataset,
    val_split: ImageTensorDataset | None,
    cfg: Config,
    rank: int,
    world: int,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Per-epoch scores of the selections whose measure is not already evaluated every epoch.

    RNA's measure (PGD under transfer) is the `pgd20_acc` / `val_pgd20_acc` of every evaluation
    epoch; RPI+RPT's (PGD at its lowest precision) is evaluated here, on the split it selects on.
    """
    out: dict[str, float] = {}
    if criterion.metric == "pgd20_acc":
        return out
    for w, record in best.items():
        split = val_split if w == "val" else held_out
        acc = evaluate_sharded(model, split, cfg, rank, world, device, mix_seed(seed, 1 + (w == "val")),
                               (criterion.protocol,), strategy=criterion.strategy)
        out[record.metric] = acc[criterion.protocol]
    return out


def selected_dir(storage_path: str, run_name: str, which: str) -> str:
    """Folder (local path or URI) of a run's selected checkpoint: `<run folder>/selected_<which>`."""
    return f"{storage_path.rstrip('/')}/{run_name}/{SELECTED_DIR.format(which=which)}"


def write_selected(directory: str, model: nn.Module, epoch: int, cfg: Config, extra: Mapping[str, Any]) -> None:
    """The selected epoch's weights (no optimizer state) as `checkpoint.pt` + `meta.json`.

    Local folders are written file by file atomically; an object-store URI gets both files
    uploaded from a temporary folder (an object appears whole or not at all).
    """
    if "://" not in directory:
        write_checkpoint_dir(directory, model, None, None, epoch, cfg, extra)
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        write_checkpoint_dir(tmp, model, None, None, epoch, cfg, extra)
        fs, path = pafs.FileSystem.from_uri(directory)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


def read_selected(directory: str) -> dict[str, Any]:
    """The payload of a selected checkpoint (see write_selected), read with weights_only=True."""
    from rna_core.checkpoint import read_checkpoint

    if "://" not in directory:
        return read_checkpoint(FsPath(directory) / CHECKPOINT_FILE)
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="rna-selected-") as tmp:
        fs, path = pafs.FileSystem.from_uri(directory)
        pafs.copy_files(f"{path}/{CHECKPOINT_FILE}", f"{tmp}/{CHECKPOINT_FILE}", source_filesystem=fs)
        return read_checkpoint(FsPath(tmp) / CHECKPOINT_FILE)


# ----------------------------------------------------------------------------- the worker function


def _quiet_report_logging() -> None:
    """Ray Train 2.60 logs every `report` (all metrics, every rank) at INFO on the console.

    Our one line per epoch says the same, readably. The logger is Ray-internal (named after its
    file), so this is best effort: if Ray moves it, the lines simply come back.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    internal = getattr(train_context, "logger", None)
    if isinstance(internal, logging.Logger):
        internal.setLevel(logging.WARNING)



def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `loop_config` is built by `pipelines.trainer` (plain, picklable data).

    Keys: config (flattened Config), run_name, mlflow (RunRef dict or None), and optionally
    fail_after_epoch (test hook for FailureConfig: the last rank raises after that epoch, once).
    Returns (from rank 0, as `Result.return_value`) the final metrics and run facts.
    """
    import ray.train
    import ray.train.torch

    from pipelines import tracking

    _quiet_report_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = unflatten(loop_config["config"])
    run_name = loop_config.get("run_name", "run")
    run_ref = tracking.RunRef.from_dict(loop_config["mlflow"]) if loop_config.get("mlflow") else None
    fail_after = loop_config.get("fail_after_epoch")
    train_cfg = effective_train_config(cfg)
    seed = cfg.train.seed

    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(seed)  # weight init; DDP also broadcasts rank 0's weights at construction
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)

    criterion = selection_criterion(cfg, model)
    best = {w: BestEpoch(w, split_metric(w, criterion)) for w in selections_of(cfg)}  # model selection (rna_core.selection)

    start_epoch, resumed = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            payload = load_checkpoint(FsPath(ckpt_dir) / CHECKPOINT_FILE, model, optimizer, scheduler)
        start_epoch = int(payload["epoch"])
        for w, record in (payload.get("extra") or {}).get("selection", {}).items():
            if w in best and record.get("metric") == best[w].metric:
                best[w] = BestEpoch.from_dict(record)
        apply_config_on_resume(optimizer, scheduler, train_cfg, start_epoch)  # --set train.lr/epochs on resume
        resumed = {
            "epoch": start_epoch,
            "optimizer_digest": state_digest(optimizer.state_dict()),
            "scheduler_last_epoch": int(scheduler.last_epoch),
            "checkpoint": checkpoint.path,
        }
        if rank == 0:
            say(f"[{run_name}] resuming after epoch {start_epoch} from {checkpoint.path}")

    if train_cfg.channels_last:
        use_channels_last(model)  # before DDP, so its buckets see the final parameter layout
    ddp_model = wrap_ddp(model, device) if world > 1 else model

    train_full, val_split = training_splits(cfg)
    held_out = load_split(cfg, "test")
    batch = per_worker_batch_size(cfg.data.batch_size, world)
    steps_per_epoch = -(-(len(train_full) // world) // batch)
    sampler, noise_generator = step_streams(train_cfg, seed, rank)

    client = tracking.client_for(run_ref.tracking_uri) if (rank == 0 and run_ref) else None
    epochs = cfg.train.epochs
    last_metrics: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        shard = train_full.subset(epoch_shard_indices(len(train_full), rank, world, seed, epoch))
        batches = BatchIterator(
            shard, batch, shuffle=False, seed=mix_seed(seed, rank, 0xA06) % (1 << 31), epoch=epoch,
            augment=cfg.data.augment, device=device,
        )
        lr = float(optimizer.param_groups[0]["lr"])
        stats = train_epoch(
            ddp_model, seeded_steps(batches, sampler.generator, seed, rank, epoch * steps_per_epoch, noise_generator),
            optimizer, train_cfg, sampler, attack_model=model, noise_generator=noise_generator,
        )
        scheduler.step()
        average_buffers(model)
        loss_sum, correct_sum, images = _all_reduce(
            [stats["train_loss"] * stats["images"], stats["train_acc"] * stats["images"], stats["images"]], device
        )
        (seconds,) = _all_reduce([stats["epoch_seconds"]], device, op="max")
        done = epoch + 1
        metrics: dict[str, float] = {
            "epoch": float(done),
            "train_loss": loss_sum / max(images, 1.0),
            "train_acc": correct_sum / max(images, 1.0),
            "lr": lr,
            "epoch_seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else 0.0,
        }
        if done % max(1, cfg.train.eval_every) == 0 or done == epochs:
            t0 = time.perf_counter()
            acc = evaluate_sharded(model, held_out, cfg, rank, world, device, mix_seed(seed, done))
            metrics.update(clean_acc=acc["clean"], pgd20_acc=acc["transfer"])
            if val_split is not None:
                vacc = evaluate_sharded(model, val_split, cfg, rank, world, device, mix_seed(seed, done, 0x7A1))
                metrics.update(val_clean_acc=vacc["clean"], val_pgd20_acc=vacc["transfer"])
            metrics.update(selection_scores(model, criterion, best, held_out, val_split, cfg, rank, world, device, mix_seed(seed, done, 0x5E1)))
            metrics["eval_seconds"] = time.perf_counter() - t0
            for w, record in best.items():
                if record.offer(done, metrics[record.metric]) and rank == 0:
                    write_selected(
                        selected_dir(cfg.ray.storage_path, run_name, w), model, done, cfg,
                        {"selected_on": w, "selection_metric": record.metric, "selection_score": record.score,
                         "selection_criterion": criterion.description, "mlflow_run_id": run_ref.run_id if run_ref else None,
                         "run_name": run_name, "metrics": metrics},
                    )
        last_metrics = metrics

        with tempfile.TemporaryDirectory(prefix="rna-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_dir(
                    tmp, model, optimizer, scheduler, done, cfg,
                    {"mlflow_run_id": run_ref.run_id if run_ref else None, "run_name": run_name,
                     "world_size": world, "metrics": metrics, "selection": {w: b.to_dict() for w, b in best.items()}},
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if client is not None:
                    tracking.log_metrics(client, run_ref.run_id, metrics, step=done)
                say(format_epoch_line(run_name, done, epochs, metrics))
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{done:04d}")

        if fail_after is not None and done == int(fail_after) and start_epoch < done and rank == world - 1:
            raise RuntimeError(f"injected failure after epoch {done} (fail_after_epoch test hook)")

    # Final evaluation on the held-out slice: clean, PGD-20 transfer (the paper's), EOT-PGD.
    t0 = time.perf_counter()
    acc = evaluate_sharded(model, held_out, cfg, rank, world, device, mix_seed(seed, 0xF1AA1), ("clean", "transfer", "eot"))
    final = {
        "final_clean_acc": acc["clean"],
        "final_pgd20_transfer_acc": acc["transfer"],
        "final_eot_pgd_acc": acc["eot"],
        "final_eval_images": acc["n"],
        "final_eval_seconds": time.perf_counter() - t0,
    }
    final.update({alias: final[key] for key, alias in EVAL_JOB_ALIASES.items()})
    selected = {}
    for w, record in best.items():  # the same final evaluation (same seed) of each selected epoch's weights
        if record.epoch is None:
            continue
        where = selected_dir(cfg.ray.storage_path, run_name, w)
        chosen = build_model(cfg).to(device)
        chosen.load_state_dict(read_selected(where)["model"])
        sacc = evaluate_sharded(chosen, held_out, cfg, rank, world, device, mix_seed(seed, 0xF1AA1), ("clean", "transfer", "eot"))
        final.update({
            f"{w}_selected_epoch": float(record.epoch), f"{w}_selected_score": record.score,
            f"{w}_selected_final_clean_acc": sacc["clean"], f"{w}_selected_final_pgd20_transfer_acc": sacc["transfer"],
            f"{w}_selected_final_eot_pgd_acc": sacc["eot"],
        })
        selected[w] = {"epoch": record.epoch, "metric": record.metric, "score": record.score, "checkpoint": f"{where}/{CHECKPOINT_FILE}",
                       "criterion": criterion.description}

    digest = state_digest(model)
    digests = [digest]
    if _distributed():
        digests = [None] * world
        dist.all_gather_object(digests, digest)
    if rank == 0 and client is not None:
        tracking.log_metrics(client, run_ref.run_id, {**final, "replicas_in_sync": float(len(set(digests)) == 1)}, step=epochs)
    if rank == 0:
        say(
            f"[{run_name}] final ({int(acc['n'])} held-out images): clean {final['final_clean_acc']:.3f}  "
            f"pgd20 (transfer) {final['final_pgd20_transfer_acc']:.3f}  eot-pgd {final['final_eot_pgd_acc']:.3f}"
        )
        for w, info in selected.items():
            say(
                f"[{run_name}] selected on {w} (epoch {info['epoch']}, {info['metric']} {info['score']:.3f}): "
                f"clean {final[f'{w}_selected_final_clean_acc']:.3f}  pgd20 (transfer) "
                f"{final[f'{w}_selected_final_pgd20_transfer_acc']:.3f}  eot-pgd {final[f'{w}_selected_final_eot_pgd_acc']:.3f}"
                + ("  [selected on the test set: biased upward]" if w == "test" else "")
            )
    return {
        "final": final,
        "selected": selected,
        "last_epoch": last_metrics,
        "epochs_done": epochs,
        "start_epoch": start_epoch,
        "resumed": resumed,
        "state_digests": digests,
        "world_size": world,
    }


__all__ = [
    "CHECKPOINT_FILE",
    "EPOCH_METRICS",
    "EVAL_JOB_ALIASES",
    "FINAL_METRICS",
    "META_FILE",
    "average_buffers",
    "build_model",
    "effective_train_config",
    "epoch_shard_indices",
    "evaluate_sharded",
    "fixed_subset",
    "format_epoch_line",
    "mix_seed",
    "per_worker_batch_size",
    "read_selected",
    "seeded_steps",
    "selected_dir",
    "state_digest",
    "step_streams",
    "training_splits",
    "validation_rows",
    "write_selected",
    "train_loop_per_worker",
    "wrap_ddp",
]
