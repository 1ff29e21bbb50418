"""The per-worker function of the training job: the rna_core epoch loop under DDP (Ray Train).

Each Ray Train worker builds the model, optimizer, scheduler and its shard of the data, resumes
from `ray.train.get_checkpoint()` when there is one, and runs `rna_core.training.train_epoch` once
per epoch with the seeded step streams of `rna_core.distributed` (one attack path and one update
path per step for all ranks by default; see that module for the DDP decisions). After every
epoch: BatchNorm statistics are averaged over ranks; every `train.eval_every` epochs the held-out
slice is evaluated (`clean_acc`, `pgd<k>_acc`, batches spread over ranks), and the validation
split when `data.val_size` > 0; an epoch that beats the kept one on a selection
(`rna_core.selection`) has its weights written to `<run folder>/selected_<which>/`; rank 0 writes
the checkpoint and logs to MLflow, and every rank reports to Ray. At the end the last epoch's
weights (the result) and each selected epoch's get the final evaluation
(`rna_core.evaluation.training_metrics`: what `jobs/evaluate.py` computes under the same names).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn as nn

from rna_core.builders import effective_train_config, model_from_config
from rna_core.checkpoint import load_checkpoint
from rna_core.config import Config, unflatten
from rna_core.data import BatchIterator, ImageTensorDataset, load_split, training_splits
from rna_core.determinism import apply_backend_settings
from rna_core.distributed import (
    all_gather_text,
    all_reduce_max,
    all_reduce_sum,
    average_buffers,
    epoch_shard_indices,
    mix_seed,
    per_worker_batch_size,
    seeded_steps,
    state_digest,
    step_streams,
    wrap_ddp,
)
from rna_core.evaluation import (
    FINAL_INFERENCE_DRAWS,
    FINAL_SEED,
    Measure,
    epoch_measures,
    evaluate_measures,
    final_measures,
    pgd_metric,
)
from rna_core.evaluation.training_metrics import pgd_attack
from rna_core.optim import apply_config_on_resume, build_optimizer, build_scheduler
from rna_core.selection import BestEpoch, Criterion, selection_criterion, selections_of, split_metric
from rna_core.speed import optimizer_state_like_params, resolve_speed, use_channels_last
from rna_core.training import train_epoch

from . import tracking
from .checkpoints import CHECKPOINT_FILE, read_selected, selected_dir, write_checkpoint_dir, write_selected
from .data_inputs import log_inputs, metric_dataset, training_inputs
from .epoch_log import EpochLog, pause_after_log
from .system_metrics import start_monitor, stop_monitor
from .worker_console import device_line, format_epoch_line, quiet_report_logging, say, speed_line

INPUT_EXAMPLE_ROWS = 2  # held-out images that go with the MLflow model as its input example


class HeldOut:
    """The evaluations of one worker: held-out slice, validation split, ranks, device."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world: int,
        device: torch.device,
        held_out: ImageTensorDataset,
        val_split: ImageTensorDataset | None,
    ):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.held_out, self.val_split = held_out, val_split

    def measure(
        self, model: nn.Module, measures: list[Measure], seed: int, split: str = "test", inference_draws: int = 1
    ) -> dict[str, float]:
        data = self.val_split if split == "val" else self.held_out
        return evaluate_measures(
            model,
            data,
            measures,
            batch_size=self.cfg.data.eval_batch_size,
            seed=seed,
            strategy=self.cfg.train.sampling,
            device=self.device,
            rank=self.rank,
            world=self.world,
            inference_draws=inference_draws,
        )


def selection_scores(
    model: nn.Module, criterion: Criterion, best: Mapping[str, BestEpoch], held: HeldOut, seed: int
) -> dict[str, float]:
    """Per-epoch scores of the selections whose measure is not already evaluated every epoch.

    RNA's measure (PGD under transfer) is the `pgd<k>_acc` / `val_pgd<k>_acc` of every evaluation
    epoch; RPI+RPT's (PGD at its lowest precision) is evaluated here, on the split it selects on.
    """
    out: dict[str, float] = {}
    if criterion.metric == pgd_metric(held.cfg.train.eval_pgd_steps):
        return out
    measure = Measure(criterion.metric, pgd_attack(held.cfg.train), criterion.protocol, criterion.strategy)
    for w, record in best.items():
        acc = held.measure(model, [measure], mix_seed(seed, 1 + (w == "val")), split=w)
        out[record.metric] = acc[criterion.metric]
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `loop_config` is built by the launcher (plain, picklable data).

    Keys: config (flattened Config), run_name, mlflow (RunRef dict or None), and optionally
    fail_after_epoch (test hook for FailureConfig: the last rank raises after that epoch, once).
    Returns (from rank 0, as `Result.return_value`) the final metrics and run facts.
    """
    quiet_report_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = unflatten(loop_config["config"])
    run_name = loop_config.get("run_name", "run")
    run_ref = tracking.RunRef.from_dict(loop_config["mlflow"]) if loop_config.get("mlflow") else None
    fail_after = loop_config.get("fail_after_epoch")
    train_cfg = effective_train_config(cfg)
    seed = cfg.train.seed

    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    backend = apply_backend_settings(cfg.train.deterministic)  # before any kernel runs (cuBLAS reads its env once)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(seed)  # weight init; DDP also broadcasts rank 0's weights at construction
    model = model_from_config(cfg).to(device)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)

    criterion = selection_criterion(cfg, model)
    best = {w: BestEpoch(w, split_metric(w, criterion)) for w in selections_of(cfg)}

    # The layout before any state is loaded, so a resumed optimizer's momentum matches its weights.
    speed = resolve_speed(train_cfg, device)  # train.amp_bf16 / channels_last `auto` decided for this device
    if speed.channels_last:
        use_channels_last(model)  # rewrites param.data in place: the optimizer keeps the same parameters

    start_epoch, resumed, resumed_extra = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            payload = load_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, model, optimizer, scheduler)
        optimizer_state_like_params(optimizer)
        start_epoch, resumed_extra = int(payload["epoch"]), payload.get("extra")
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

    ddp_model = wrap_ddp(model, device) if world > 1 else model

    train_full, val_split = training_splits(cfg)
    held = HeldOut(cfg, rank, world, device, load_split(cfg, "test"), val_split)
    batch = per_worker_batch_size(cfg.data.batch_size, world)
    steps_per_epoch = -(-(len(train_full) // world) // batch)
    sampler, noise_generator = step_streams(train_cfg, seed, rank, device)
    per_epoch = epoch_measures(cfg.train)

    client = tracking.client_for(run_ref.tracking_uri) if (rank == 0 and run_ref) else None
    if rank == 0:
        say(f"[{run_name}] {device_line(device, world)}")
        say(f"[{run_name}] {speed_line(cfg, speed)}")
        if device.type == "cuda":
            say(f"[{run_name}] backend: " + ", ".join(f"{k}={v}" for k, v in backend.items()))
        if client is not None:
            resolved = {**speed.params(), "resolved.device": str(device)}
            resolved.update({f"resolved.backend.{k}": v for k, v in backend.items()})
            tracking.log_new_params(client, run_ref.run_id, resolved)
    epoch_log = EpochLog(client, run_ref.run_id if run_ref else None)  # rank 0's; see pipelines.epoch_log
    if resumed is not None:
        epoch_log.backfill(start_epoch, resumed_extra)  # reported, then killed before it was logged
    inputs = training_inputs(cfg, train_full, val_split, held.held_out) if client is not None else []
    if client is not None:  # which rows it trains, selects and is scored on (pipelines.data_inputs)
        log_inputs(client, run_ref.run_id, inputs)
    epochs = cfg.train.epochs
    last_metrics: dict[str, float] = {}
    monitor = None  # system metrics (pipelines.system_metrics): from the end of the first epoch on
    try:
        for epoch in range(start_epoch, epochs):
            shard = train_full.subset(epoch_shard_indices(len(train_full), rank, world, seed, epoch))
            batches = BatchIterator(
                shard,
                batch,
                shuffle=False,
                seed=mix_seed(seed, rank, 0xA06) % (1 << 31),
                epoch=epoch,
                augment=cfg.data.augment,
                device=device,
            )
            lr = float(optimizer.param_groups[0]["lr"])
            steps = seeded_steps(batches, sampler.generator, seed, rank, epoch * steps_per_epoch, noise_generator)
            stats = train_epoch(
                ddp_model, steps, optimizer, train_cfg, sampler, attack_model=model, noise_generator=noise_generator
            )
            scheduler.step()
            average_buffers(model)
            loss_sum, correct_sum, images = all_reduce_sum(
                [stats["train_loss"] * stats["images"], stats["train_acc"] * stats["images"], stats["images"]], device
            )
            (seconds,) = all_reduce_max([stats["epoch_seconds"]], device)
            done = epoch + 1
            # Robust accuracy first: MLflow's compare view opens on the first metric a run logs.
            metrics: dict[str, float] = {}
            if done % max(1, cfg.train.eval_every) == 0 or done == epochs:
                t0 = time.perf_counter()
                acc = held.measure(model, per_epoch, mix_seed(seed, done))
                metrics.update({m.name: acc[m.name] for m in reversed(per_epoch)})  # pgd<k>_acc, clean_acc
                if val_split is not None:
                    vacc = held.measure(model, per_epoch, mix_seed(seed, done, 0x7A1), split="val")
                    metrics.update({f"val_{m.name}": vacc[m.name] for m in reversed(per_epoch)})
                metrics.update(selection_scores(model, criterion, best, held, mix_seed(seed, done, 0x5E1)))
                metrics["epoch_eval_seconds"] = time.perf_counter() - t0  # final: eval_seconds, as the evaluation job
            metrics.update(
                {
                    "epoch": float(done),
                    "train_loss": loss_sum / max(images, 1.0),
                    "train_acc": correct_sum / max(images, 1.0),
                    "lr": lr,
                    "epoch_seconds": seconds,
                    "images_per_second": images / seconds if seconds > 0 else 0.0,
                }
            )
            for w, record in best.items():
                if record.metric in metrics and record.offer(done, metrics[record.metric]) and rank == 0:
                    extra = {
                        "selected_on": w,
                        "selection_metric": record.metric,
                        "selection_score": record.score,
                        "selection_criterion": criterion.description,
                        "mlflow_run_id": run_ref.run_id if run_ref else None,
                        "run_name": run_name,
                        "metrics": metrics,
                    }
                    write_selected(selected_dir(cfg.ray.storage_path, run_name, w), model, done, cfg, extra)
            last_metrics = metrics
            logged = report_epoch(
                cfg, run_name, run_ref, epoch_log, model, optimizer, scheduler, best, done, world, metrics
            )
            pause_after_log(done, logged)  # test hook (kill drills); no-op unless its variable is set
            if monitor is None:  # after the first logged epoch (see pipelines.system_metrics)
                monitor = start_monitor(cfg, run_ref, ctx.get_node_rank(), ctx.get_local_rank())

            if fail_after is not None and done == int(fail_after) and start_epoch < done and rank == world - 1:
                raise RuntimeError(f"injected failure after epoch {done} (fail_after_epoch test hook)")

        final, selected = final_evaluation(model, cfg, best, criterion, held, run_name)
        digests = all_gather_text(state_digest(model))
        if rank == 0:
            epoch_log.log_final(epochs, {**final, "replicas_in_sync": float(len(set(digests)) == 1)})
    finally:
        stop_monitor(monitor)
    example = held.held_out.head(INPUT_EXAMPLE_ROWS).images.float().div(255.0).numpy()
    return {
        "final": final,
        "selected": selected,
        "last_epoch": last_metrics,
        "epochs_done": epochs,
        "start_epoch": start_epoch,
        "resumed": resumed,
        "state_digests": digests,
        "world_size": world,
        "speed": speed.params(),
        "input_example": example,  # for the MLflow model's signature (pipelines.logged_model)
        "eval_dataset": dict(metric_dataset(inputs)),  # the held-out slice's MLflow dataset
    }


def report_epoch(
    cfg: Config,
    run_name: str,
    run_ref: tracking.RunRef | None,
    epoch_log: EpochLog,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    best: Mapping[str, BestEpoch],
    done: int,
    world: int,
    metrics: dict[str, float],
) -> bool:
    """Rank 0 writes the epoch checkpoint; every rank reports to Ray; then rank 0 logs the metrics (only once
    the checkpoint is persisted: pipelines.epoch_log) and prints the line. Whether this call logged them."""
    with tempfile.TemporaryDirectory(prefix="rna-ckpt-") as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            write_checkpoint_dir(
                tmp,
                model,
                optimizer,
                scheduler,
                done,
                cfg,
                {
                    "mlflow_run_id": run_ref.run_id if run_ref else None,
                    "run_name": run_name,
                    "world_size": world,
                    "metrics": metrics,
                    "selection": {w: b.to_dict() for w, b in best.items()},
                },
            )
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{done:04d}")
    if ray.train.get_context().get_world_rank() != 0:
        return False
    logged = epoch_log.log(done, metrics)
    say(format_epoch_line(run_name, done, cfg.train.epochs, metrics, pgd_metric(cfg.train.eval_pgd_steps)))
    return logged


def final_evaluation(
    model: nn.Module, cfg: Config, best: Mapping[str, BestEpoch], criterion: Criterion, held: HeldOut, run_name: str
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The last epoch's final metrics, and those of each selected epoch's weights (same seed)."""
    measures = final_measures(cfg.train)
    t0 = time.perf_counter()
    acc = held.measure(model, measures, FINAL_SEED, inference_draws=FINAL_INFERENCE_DRAWS)
    names = [k for k in acc if k != "n"]  # each measure's one-draw, worst-of-R and vote-of-R accuracy
    final: dict[str, float] = {k: acc[k] for k in names}
    final.update(eval_images=acc["n"], eval_seconds=time.perf_counter() - t0)
    selected: dict[str, dict[str, Any]] = {}
    for w, record in best.items():
        if record.epoch is None:
            continue
        where = selected_dir(cfg.ray.storage_path, run_name, w)
        chosen = model_from_config(cfg).to(held.device)
        chosen.load_state_dict(read_selected(where)["model"])
        sacc = held.measure(chosen, measures, FINAL_SEED, inference_draws=FINAL_INFERENCE_DRAWS)
        final.update({f"{w}_selected_epoch": float(record.epoch), f"{w}_selected_score": record.score})
        final.update({f"{w}_selected_{k}": sacc[k] for k in names})
        selected[w] = {
            "epoch": record.epoch,
            "metric": record.metric,
            "score": record.score,
            "checkpoint": f"{where}/{CHECKPOINT_FILE}",
            "criterion": criterion.description,
        }
    if held.rank == 0:
        names = [m.name for m in measures]  # the one-draw numbers in the log line
        say(f"[{run_name}] final ({int(acc['n'])} held-out images): " + "  ".join(f"{n} {final[n]:.3f}" for n in names))
        for w, info in selected.items():
            say(
                f"[{run_name}] selected on {w} (epoch {info['epoch']}, {info['metric']} {info['score']:.3f}): "
                + "  ".join(f"{n} {final[f'{w}_selected_{n}']:.3f}" for n in names)
                + ("  [selected on the test set: biased upward]" if w == "test" else "")
            )
    return final, selected


__all__ = [
    "HeldOut",
    "final_evaluation",
    "format_epoch_line",
    "report_epoch",
    "selection_scores",
    "train_loop_per_worker",
]
