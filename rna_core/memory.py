"""How much device memory one evaluation task needs, measured from the model itself.

An attack step holds one autograd graph of the model at the evaluation batch (EOT recomputes its
draws one at a time: `LogitAverage`), so a task's peak is the model's weights plus what that graph
saves, and the graph grows linearly with the batch. We measure it on the CPU at two tiny batches
(the storages the graph saves, each counted once, the weights apart) and extrapolate. On a GPU the
activations' gradients live beside the graph during the backward, the caching allocator keeps
slack, and each process holds a CUDA context: `ALLOCATOR_SLACK` and `CUDA_CONTEXT_BYTES` cover those.

`eval.gpus_per_task` left unset sizes GPU tasks from this estimate: a WRN-34-10 evaluation at batch
256 plans about 9 GiB a task, so a 24 GB GPU takes two of them, where the old fixed 0.25 put four
on it and ran out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

GIB = 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context plus cuDNN/cuBLAS handles and workspaces, per process
ALLOCATOR_SLACK = 1.5  # activation gradients during the backward, and the caching allocator's fragmentation
USABLE_FRACTION = 0.9  # of a GPU's memory the tasks may plan on (the driver of a local run, other processes)
MAX_TASKS_PER_GPU = 4  # more tasks than this on one GPU only queue kernels behind each other


@dataclass(frozen=True)
class TaskMemory:
    """Bytes of one evaluation task: weights, plus a graph of `fixed + per_example * batch`."""

    weights: int
    fixed: int
    per_example: int

    def graph_bytes(self, batch: int) -> int:
        return self.fixed + self.per_example * batch

    def peak_bytes(self, batch: int) -> int:
        """What a GPU task at `batch` should plan on (see the module docstring)."""
        return int(self.weights + ALLOCATOR_SLACK * self.graph_bytes(batch) + CUDA_CONTEXT_BYTES)

    def largest_batch(self, device_bytes: float) -> int:
        """The largest batch whose task fits `device_bytes` alone (0 if not even one example does)."""
        room = (USABLE_FRACTION * device_bytes - self.weights - CUDA_CONTEXT_BYTES) / ALLOCATOR_SLACK - self.fixed
        return max(0, int(room // max(1, self.per_example)))


def saved_graph_bytes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the storages autograd saves for one forward of `x` (a storage saved twice counts once;
    storages in `exclude`, the weights, not at all), plus the output's."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    sizes.setdefault(out.untyped_storage().data_ptr(), out.untyped_storage().nbytes())
    return sum(sizes.values())


def measure_task_memory(
    model: nn.Module,
    input_shape: tuple[int, ...] = (3, 32, 32),
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batches: tuple[int, int] = (2, 4),
) -> TaskMemory:
    """Measure `model`'s graph at two small batches on its current device (the CPU is enough) and
    fit `fixed + per_example * batch`. `forward` is what the attack differentiates (e.g. the bf16
    evaluation forward); by default the model itself."""
    forward = forward or model
    params = [*model.parameters(), *model.buffers()]
    exclude = {p.untyped_storage().data_ptr() for p in params}
    weights = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p for p in params}.values())
    device = params[0].device if params else torch.device("cpu")
    small, large = batches
    measured = []
    for batch in (small, large):
        x = torch.zeros(batch, *input_shape, device=device, requires_grad=True)
        measured.append(saved_graph_bytes(forward, x, exclude))
    per_example = max(0, (measured[1] - measured[0]) // (large - small))
    fixed = max(0, measured[0] - per_example * small)
    return TaskMemory(weights=weights, fixed=fixed, per_example=per_example)


def tasks_per_gpu(memory: TaskMemory, batch: int, gpu_bytes: float, most: int = MAX_TASKS_PER_GPU) -> int:
    """How many tasks at `batch` share one GPU of `gpu_bytes`; ConfigError when not even one fits."""
    need = memory.peak_bytes(batch)
    count = int(USABLE_FRACTION * gpu_bytes // need)
    if count < 1:
        fits = memory.largest_batch(gpu_bytes)
        hint = f"lower eval.batch_size (--batch-size) to {fits} or less" if fits else "the model alone does not fit"
        raise ConfigError(
            f"one evaluation task at batch {batch} needs about {need / GIB:.1f} GiB, more than "
            f"{USABLE_FRACTION:.0%} of eval.gpu_memory_gb={gpu_bytes / GIB:g}: {hint}, or set eval.gpu_memory_gb "
            "to the GPUs' real memory"
        )
    return min(most, count)


def gpu_fraction(count: int) -> float:
    """Ray's GPU request for `count` tasks per GPU, rounded down to Ray's 1e-4 resolution so that
    `count` of them fit one GPU."""
    return math.floor(10_000 / count) / 10_000


__all__ = [
    "ALLOCATOR_SLACK",
    "CUDA_CONTEXT_BYTES",
    "MAX_TASKS_PER_GPU",
    "TaskMemory",
    "gpu_fraction",
    "measure_task_memory",
    "saved_graph_bytes",
    "tasks_per_gpu",
]
