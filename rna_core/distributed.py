"""Data parallelism with random paths, torch-only: shards, seeded steps, DDP, buffers, digests.

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

Buffers are not broadcast at every forward. In train mode BatchNorm normalizes with batch
statistics, so running statistics never influence training; every rank accumulates them over its
own data and paths, and :func:`average_buffers` averages them at the end of each epoch (before
evaluation and the checkpoint). DDP's default broadcast of rank 0's buffers at every forward
would cost a collective per step and throw away the other ranks' statistics.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .norms import BatchGroupNorm
from .paths import PathSampler
from .quant import RunningRange

SHARED_PATH_STREAM = -0x5A7  # the `rank` slot of the path stream that every rank shares
# Modules whose floating buffers are statistics each rank measures on its own data (averaged per epoch).
MEASURED_STATISTICS = (nn.modules.batchnorm._NormBase, BatchGroupNorm, RunningRange)


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


def step_streams(
    train_cfg: Any, seed: int, rank: int, device: torch.device | str = "cpu"
) -> tuple[PathSampler, torch.Generator | None]:
    """The path sampler and the noise generator of a rank (None: the sampler's generator draws both).

    `train.rank_paths: shared` gives a separate noise generator, so that `seeded_steps` can seed
    the paths from (seed, step) on every rank and the random start from (seed, rank, step). It
    lives on the training `device`: on a GPU the random start is drawn there (seeding a CUDA
    generator waits for nothing), not on one CPU thread and copied over at every step. Paths stay
    on the CPU: their choices are read on the host.
    """
    sampler = PathSampler(train_cfg.sampling, seed=mix_seed(seed, rank))
    return sampler, (torch.Generator(device=device) if train_cfg.rank_paths == "shared" else None)


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
    """DDP with the semantics in the module docstring (unused parameters allowed, buffers local)."""
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


def is_distributed() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average the statistics measured on each rank's data; every other buffer comes from rank 0.

    Measured: the floating buffers of norm layers with running statistics and of quantized layers'
    input ranges (`MEASURED_STATISTICS`); their integer counters come from rank 0. The rest (the
    input standardisation's constant mean and std) is equal on all ranks and is broadcast, not
    averaged: the sum of W equal floats divided by W is not always the value itself (W = 3, 5, 6
    or 7 moved a CIFAR std by one ulp per epoch).
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for sub in module.modules():
        measured = isinstance(sub, MEASURED_STATISTICS)
        for buf in sub.buffers(recurse=False):
            if measured and buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(world)
            else:
                dist.broadcast(buf, src=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (the values themselves without a process group)."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (the values themselves without a process group)."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def _all_reduce(values: list[float], device: torch.device, op: Any) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_gather_text(text: str) -> list[str]:
    """Every rank's `text`, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [text]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    return [str(t) for t in out]


def _digest_update(h: Any, obj: Any) -> None:
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


__all__ = [
    "SHARED_PATH_STREAM",
    "all_gather_text",
    "all_reduce_max",
    "all_reduce_sum",
    "average_buffers",
    "epoch_shard_indices",
    "is_distributed",
    "mix_seed",
    "per_worker_batch_size",
    "seeded_steps",
    "state_digest",
    "step_streams",
    "wrap_ddp",
]
